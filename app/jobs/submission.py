"""Submitting a job: the one path the native and the OpenAI-compatible routes share."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.jobs import plan, service
from app.jobs.schemas import CreateJobRequest
from app.settings import Settings


def submit_job(
    session: Session,
    *,
    owner: str,
    request: CreateJobRequest,
    settings: Settings,
    idempotency_key: str | None = None,
) -> service.JobSubmission:
    """Refuse a job that cannot fit its device (400 job_does_not_fit), then store it queued and
    enqueue it once the caller commits (service.create_job: idempotency, limits, dataset URLs)."""
    plan.check_fits(owner=owner, request=request, settings=settings)
    return service.create_job(
        session, owner=owner, request=request, settings=settings, idempotency_key=idempotency_key
    )
