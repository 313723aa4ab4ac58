"""metric points of reinforcement jobs carry the grader's mean reward and its spread

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 05:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_metrics", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reward_mean", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("reward_std", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_metrics", schema=None) as batch_op:
        batch_op.drop_column("reward_std")
        batch_op.drop_column("reward_mean")
