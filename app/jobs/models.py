"""SQL tables of a job, its event log and its metric points, and measured training speed."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    VALIDATING = "validating"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATUSES = frozenset({JobStatus.VALIDATING, JobStatus.RUNNING})


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[JobStatus] = mapped_column(
        Enum(
            JobStatus, native_enum=False, length=20, values_callable=lambda e: [m.value for m in e]
        ),
        index=True,
    )
    base_model: Mapped[str] = mapped_column(String(200))
    dataset_url: Mapped[str] = mapped_column(Text)
    validation_url: Mapped[str | None] = mapped_column(Text)
    suffix: Mapped[str | None] = mapped_column(String(64))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Names of the hyperparameters asked as "auto": "auto" in `hyperparameters` until the worker
    # resolves them from the dataset, numbers after. Null on jobs from before "auto" existed.
    auto_hyperparameters: Mapped[list[str] | None] = mapped_column(JSON)
    lora: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The adapter or checkpoint the job starts from (app/jobs/parents.py); None: a fresh LoRA.
    parent: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # How the adapter learns (app/jobs/schemas.py Method); None on jobs made before methods.
    method: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    @property
    def method_type(self) -> str:
        return str((self.method or {}).get("type", "supervised"))

    # The frozen base model's weights in training (QLoRA): "4bit" (NF4), "8bit", or None (as
    # loaded). The adapter is a plain LoRA either way and serves on the unquantized base.
    quantization: Mapped[str | None] = mapped_column(String(8))
    distributed: Mapped[str | None] = mapped_column(String(8))

    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    dataset: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    # After training: eval loss of the base model and of the adapter on held-out rows, and sample
    # generations of both (worker/evaluation.py). Null until the job has succeeded.
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Where the job's terminal state is POSTed, and the secret its signature is made with
    # (app/webhooks/). The secret is needed to sign, so it is stored as given.
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_secret: Mapped[str | None] = mapped_column(String(128))
    # Idempotency-Key of the request that created the job, with a hash of that request's body:
    # a retry with the same key and body gets this job back instead of a second one.
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    queue: Mapped[str] = mapped_column(String(64), default="training", server_default="training")
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def fine_tuned_model(self) -> str:
        """The name of the adapter this job makes: `ft:<base>:<owner>:<suffix>:<job id>`."""
        return f"ft:{self.base_model}:{self.owner}:{self.suffix or ''}:{self.id}"

    def checkpoint_model(self, step: int) -> str:
        """The name of a checkpoint as a model: `<fine-tuned model>:ckpt-step-<step>`."""
        return f"{self.fine_tuned_model}:ckpt-step-{step}"


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobCheckpoint(Base):
    """A training checkpoint in the artifact store: LoRA weights plus optimizer, scheduler and
    RNG state, enough to resume the job from `step` or to generate with it."""

    __tablename__ = "job_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    path: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobMetric(Base):
    __tablename__ = "job_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    train_loss: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    tokens_per_second: Mapped[float | None] = mapped_column(Float)
    # Reinforcement: the grader's mean reward of the step's answers, and its spread.
    reward_mean: Mapped[float | None] = mapped_column(Float)
    reward_std: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Throughput(Base):
    """Training speed a worker measured on a job that succeeded: what plans estimate time from,
    per accelerator class and base model."""

    __tablename__ = "throughput"
    __table_args__ = (Index("ix_throughput_accelerator_base_model", "accelerator", "base_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    accelerator: Mapped[str] = mapped_column(String(20))  # rocm, cuda or cpu
    device_name: Mapped[str] = mapped_column(String(200))
    processes: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(200))
    trained_tokens: Mapped[int] = mapped_column(Integer)
    tokens_per_second: Mapped[float] = mapped_column(Float)
    # From the claim to success: model loading, validation, training and saving.
    job_seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
