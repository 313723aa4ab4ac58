"""auto hyperparameters and measured throughput

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 22:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.db

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("auto_hyperparameters", sa.JSON(), nullable=True))
    op.create_table(
        "throughput",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("accelerator", sa.String(length=20), nullable=False),
        sa.Column("device_name", sa.String(length=200), nullable=False),
        sa.Column("processes", sa.Integer(), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("trained_tokens", sa.Integer(), nullable=False),
        sa.Column("tokens_per_second", sa.Float(), nullable=False),
        sa.Column("job_seconds", sa.Float(), nullable=False),
        sa.Column("created_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_throughput_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_throughput")),
    )
    with op.batch_alter_table("throughput", schema=None) as batch_op:
        batch_op.create_index(
            "ix_throughput_accelerator_base_model", ["accelerator", "base_model"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_throughput_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_throughput_job_id"), ["job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("throughput", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_throughput_job_id"))
        batch_op.drop_index(batch_op.f("ix_throughput_created_at"))
        batch_op.drop_index("ix_throughput_accelerator_base_model")
    op.drop_table("throughput")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("auto_hyperparameters")
