"""The only place a job's status changes.

Each change is one conditional UPDATE (`WHERE status IN allowed sources`), so two processes
racing (a worker finishing, a user cancelling, the reaper re-queueing) cannot both win, and each
change appends its event in the same transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import Conflict
from app.jobs.events import append_event
from app.jobs.models import Job, JobStatus

ALLOWED_SOURCES: dict[JobStatus, frozenset[JobStatus]] = {
    # From queued: a claim. From validating/running: a worker taking over the job of a worker
    # process found dead (the caller narrows this with only_from and claimed_by).
    JobStatus.VALIDATING: frozenset({JobStatus.QUEUED, JobStatus.VALIDATING, JobStatus.RUNNING}),
    JobStatus.RUNNING: frozenset({JobStatus.VALIDATING}),
    JobStatus.SUCCEEDED: frozenset({JobStatus.RUNNING}),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED, JobStatus.VALIDATING, JobStatus.RUNNING}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED, JobStatus.VALIDATING, JobStatus.RUNNING}),
    # A job whose worker died goes back to the queue for another attempt.
    JobStatus.QUEUED: frozenset({JobStatus.VALIDATING, JobStatus.RUNNING}),
}

EVENT_TYPES = {
    JobStatus.QUEUED: "job.requeued",
    JobStatus.VALIDATING: "job.claimed",
    JobStatus.RUNNING: "job.training_started",
    JobStatus.SUCCEEDED: "job.succeeded",
    JobStatus.FAILED: "job.failed",
    JobStatus.CANCELLED: "job.cancelled",
}


class IllegalTransition(Conflict):
    code = "illegal_transition"


def transition(
    session: Session,
    job_id: str,
    to: JobStatus,
    message: str,
    *,
    only_from: frozenset[JobStatus] | None = None,
    claimed_by: str | None = None,
    data: dict[str, Any] | None = None,
    level: str = "info",
    values: dict[str, Any] | None = None,
) -> bool:
    """Move job_id to `to` if its current status allows it; False when it did not (lost a race).

    `only_from` narrows the allowed sources further (a worker finishing only from `running`);
    `claimed_by` makes a worker's change apply only while the job is still its own attempt.
    """
    sources = ALLOWED_SOURCES[to] if only_from is None else ALLOWED_SOURCES[to] & only_from
    changes: dict[str, Any] = {"status": to, **(values or {})}
    if to.is_terminal:
        changes.setdefault("finished_at", utcnow())
    conditions = [Job.id == job_id, Job.status.in_(sources)]
    if claimed_by is not None:
        conditions.append(Job.worker == claimed_by)
    result = session.execute(
        update(Job)
        .where(*conditions)
        .values(**changes)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        return False
    append_event(session, job_id, EVENT_TYPES[to], message, level=level, data=data)
    if to.is_terminal:
        from app.webhooks.outbox import record_terminal  # it reads jobs.service's views

        record_terminal(session, job_id, EVENT_TYPES[to])
    return True


def require_transition(
    session: Session, job: Job, to: JobStatus, message: str, **kwargs: Any
) -> None:
    """Like transition(), but a refused change is the caller's error (409)."""
    if not transition(session, job.id, to, message, **kwargs):
        session.refresh(job)
        raise IllegalTransition(
            f"Job {job.id} is {job.status.value}; it cannot become {to.value}.",
            detail={"status": job.status.value},
        )
