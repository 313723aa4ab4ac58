"""Every SQL query of the jobs domain."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.adapters.models import Adapter
from app.errors import NotFound
from app.jobs.models import (
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
