"""adapter exports: merged and GGUF files made from an adapter

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 05:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.db import UTCDateTime

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "adapter_exports",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "adapter_id",
            sa.String(64),
            sa.ForeignKey("adapters.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("precision", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("files", sa.JSON(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", UTCDateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_adapter_exports_adapter_id", "adapter_exports", ["adapter_id"])
    op.create_index("ix_adapter_exports_owner", "adapter_exports", ["owner"])


def downgrade() -> None:
    op.drop_index("ix_adapter_exports_owner", table_name="adapter_exports")
    op.drop_index("ix_adapter_exports_adapter_id", table_name="adapter_exports")
    op.drop_table("adapter_exports")
