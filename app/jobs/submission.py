"""Submitting a job: the one path the native and the OpenAI-compatible routes share."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.db import unit_of_work
from app.jobs import plan, service
from app.jobs.parents import resolve_parent
from app.jobs.reward_models import check_reward_models
from app.jobs.schemas import CreateJobRequest, JobPlan
from app.settings import Settings


def submit_job(
    session: Session,
    *,
    owner: str,
    request: CreateJobRequest,
    settings: Settings,
    idempotency_key: str | None = None,
) -> service.JobSubmission:
    """Resolve the adapter it starts from (if any) and the reward models its grader names,
    refuse a job that cannot fit its device (400 job_does_not_fit), then store it queued and
    enqueue it once the caller commits (service.create_job: idempotency, limits, dataset
    URLs)."""
    # Its own short session: on SQLite the request's session must not hold a transaction while
    # the fit check opens another.
    with unit_of_work() as reading:
        request, parent = resolve_parent(reading, owner=owner, request=request, settings=settings)
        check_reward_models(reading, owner=owner, request=request, settings=settings)
    plan.check_fits(owner=owner, request=request, settings=settings)
    return service.create_job(
        session,
        owner=owner,
        request=request,
        settings=settings,
        idempotency_key=idempotency_key,
        parent=parent,
    )


def plan_submission(*, owner: str, request: CreateJobRequest, settings: Settings) -> JobPlan:
    """The plan of the job this request would submit (POST /jobs/plan, dry_run)."""
    with unit_of_work() as session:
        request, _ = resolve_parent(session, owner=owner, request=request, settings=settings)
        check_reward_models(session, owner=owner, request=request, settings=settings)
    return plan.plan_job(owner=owner, request=request, settings=settings)
