"""Every SQL query of the jobs domain: the api's, and the workers' and scheduler's as jobs run."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Row, delete, func, or_, select, update
from sqlalchemy.orm import Session

from app.adapters.models import Adapter
from app.errors import NotFound
from app.jobs.models import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Job,
    JobCheckpoint,
    JobMetric,
    JobStatus,
    Throughput,
)
from app.pages import newest_first
from app.webhooks.models import WebhookDelivery


def get_job(session: Session, *, owner: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.owner != owner:
        raise NotFound(f"No job {job_id!r}. GET /jobs lists your jobs.", code="job_not_found")
    return job


def get_job_by_idempotency_key(session: Session, *, owner: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


def job_status(session: Session, job_id: str) -> JobStatus | None:
    """The status as it is in SQL now (None: no such job), without loading the row."""
    return session.scalar(select(Job.status).where(Job.id == job_id))


def count_in_flight(session: Session, *, owner: str) -> int:
    """Jobs of the owner that are queued or running (not yet in a terminal status)."""
    query = select(func.count()).where(Job.owner == owner, Job.status.not_in(TERMINAL_STATUSES))
    return session.scalar(query) or 0


def list_jobs(
    session: Session,
    *,
    owner: str,
    limit: int,
    after: str | None,
    status: JobStatus | None,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Job], bool]:
    """Newest first; `after` is the id of the last job of the previous page; `metadata`: only
    jobs with each of these key/value pairs."""
    query = select(Job).where(Job.owner == owner)
    if status is not None:
        query = query.where(Job.status == status)
    for key, value in (metadata or {}).items():
        query = query.where(Job.metadata_[key].as_string() == value)
    return newest_first(session, query, Job, owner=owner, after=after, limit=limit, noun="job")


def adapters_by_job(session: Session, job_ids: list[str]) -> dict[str, Adapter]:
    if not job_ids:
        return {}
    adapters = session.scalars(select(Adapter).where(Adapter.job_id.in_(job_ids)))
    return {adapter.job_id: adapter for adapter in adapters if adapter.job_id}


def webhook_deliveries_by_job(
    session: Session, job_ids: list[str]
) -> dict[str, list[WebhookDelivery]]:
    found: dict[str, list[WebhookDelivery]] = {}
    if not job_ids:
        return found
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id.in_(job_ids))
        .order_by(WebhookDelivery.created_at)
    )
    for delivery in rows:
        found.setdefault(delivery.job_id, []).append(delivery)
    return found


def list_metrics(session: Session, job_id: str) -> list[JobMetric]:
    return list(
        session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.id))
    )


def list_checkpoints(session: Session, job_id: str) -> list[JobCheckpoint]:
    query = (
        select(JobCheckpoint)
        .where(JobCheckpoint.job_id == job_id)
        .order_by(JobCheckpoint.step.desc())
    )
    return list(session.scalars(query))


def latest_device(
    session: Session, *, queue: str | None = None, accelerator: str | None = None
) -> dict[str, Any] | None:
    """The device facts a worker recorded on the newest job of the queue or accelerator class."""
    kind = Job.device["kind"].as_string()
    query = select(Job.device).where(kind.is_not(None))
    if queue is not None:
        query = query.where(Job.queue == queue)
    if accelerator is not None:
        query = query.where(kind == accelerator)
    device = session.scalar(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(1))
    return device if isinstance(device, dict) else None


def recent_throughput(
    session: Session, *, accelerator: str, base_model: str, limit: int
) -> list[Throughput]:
    """The newest speed measurements of jobs on this accelerator class and base model."""
    query = (
        select(Throughput)
        .where(Throughput.accelerator == accelerator, Throughput.base_model == base_model)
        .order_by(Throughput.created_at.desc(), Throughput.id.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


# --- what workers and the scheduler read and write while jobs run ------------------------------


def claim_state(session: Session, job_id: str) -> Row[int, JobStatus, str | None] | None:
    """(attempt, status, worker) of a job about to be claimed; None when it is gone."""
    query = select(Job.attempt, Job.status, Job.worker).where(Job.id == job_id)
    return session.execute(query).one_or_none()


def stop_signals(
    session: Session, job_id: str
) -> Row[JobStatus, str | None, datetime | None] | None:
    """(status, worker, cancel_requested_at): what tells a running job's worker to stop."""
    query = select(Job.status, Job.worker, Job.cancel_requested_at).where(Job.id == job_id)
    return session.execute(query).one_or_none()


def beat(session: Session, *, job_id: str, worker_id: str, now: datetime) -> None:
    """The claimed job's heartbeat; nothing when another worker holds the claim now."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.worker == worker_id).values(heartbeat_at=now)
    )


def record_device(session: Session, job_id: str, facts: dict[str, Any]) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(device=facts))


def record_dataset(
    session: Session, job_id: str, *, dataset: dict[str, Any], hyperparameters: dict[str, Any]
) -> None:
    """The validated dataset's facts and the hyperparameters with "auto" resolved."""
    session.execute(
        update(Job).where(Job.id == job_id).values(dataset=dataset, hyperparameters=hyperparameters)
    )


def save_progress(
    session: Session, job_id: str, *, progress: dict[str, Any], points: list[dict[str, Any]]
) -> None:
    """The job's progress and the metric points since the last save."""
    session.add_all([JobMetric(**point) for point in points])
    if progress:
        session.execute(update(Job).where(Job.id == job_id).values(progress=progress))


def replace_checkpoint(session: Session, checkpoint: JobCheckpoint) -> None:
    """Record a checkpoint; one saved again at the same step (a resumed attempt) replaces it."""
    session.execute(
        delete(JobCheckpoint).where(
            JobCheckpoint.job_id == checkpoint.job_id, JobCheckpoint.step == checkpoint.step
        )
    )
    session.add(checkpoint)
    session.flush()


def prune_checkpoints(session: Session, job_id: str, *, kept: int) -> list[str]:
    """Forget all but the newest `kept` checkpoints; the artifact keys of those forgotten."""
    stale = session.scalars(
        select(JobCheckpoint)
        .where(JobCheckpoint.job_id == job_id)
        .order_by(JobCheckpoint.step.desc())
        .offset(kept)
    ).all()
    for row in stale:
        session.delete(row)
    return [row.path for row in stale]


def latest_checkpoint(session: Session, job_id: str) -> JobCheckpoint | None:
    query = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
    return session.scalars(query.order_by(JobCheckpoint.step.desc()).limit(1)).first()


def forget_metrics_after(session: Session, job_id: str, step: int) -> None:
    """Points past a checkpoint were trained by a lost attempt and will be trained again."""
    session.execute(delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step > step))


def first_attempt_start(session: Session, job_id: str) -> datetime | None:
    """When the job started, if this is its first attempt (a later one's clock started earlier)."""
    started, attempt = session.execute(
        select(Job.started_at, Job.attempt).where(Job.id == job_id)
    ).one()
    return started if attempt == 1 else None


def stale_jobs(session: Session, *, stale_before: datetime) -> list[Job]:
    """Claimed jobs whose worker has not beaten since `stale_before`."""
    query = select(Job).where(
        Job.status.in_(ACTIVE_STATUSES),
        or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before),
    )
    return list(session.scalars(query))


def take_lost_messages(
    session: Session, *, enqueued_before: datetime, now: datetime
) -> dict[str, str]:
    """Queued jobs enqueued before `enqueued_before` (their message was lost), marked enqueued
    now; job id -> queue, to send again."""
    lost = session.execute(
        select(Job.id, Job.queue).where(
            Job.status == JobStatus.QUEUED, Job.enqueued_at < enqueued_before
        )
    ).all()
    if lost:
        ids = [row.id for row in lost]
        session.execute(update(Job).where(Job.id.in_(ids)).values(enqueued_at=now))
    return {row.id: row.queue for row in lost}
