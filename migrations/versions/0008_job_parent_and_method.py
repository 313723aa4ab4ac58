"""a job may start from an adapter or checkpoint, and has a training method

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 02:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("method", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("method")
        batch_op.drop_column("parent")
