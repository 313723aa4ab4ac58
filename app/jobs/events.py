"""The append-only event log of a job: every transition and notable step adds one row."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.jobs.models import Job, JobEvent


def append_event(
    session: Session,
    job_id: str,
    type: str,
    message: str,
    *,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> int:
    """Add an event and return its per-job sequence number.

    The number comes from an atomic increment on the job row, so the api and a worker appending
    at the same moment never get the same one.
    """
    seq = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(event_seq=Job.event_seq + 1)
        .returning(Job.event_seq)
    ).scalar_one()
    session.add(
        JobEvent(job_id=job_id, seq=seq, type=type, level=level, message=message, data=data)
    )
    session.flush()
    return seq


def list_events(session: Session, job_id: str, *, after: int, limit: int) -> list[JobEvent]:
    query = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.seq > after)
        .order_by(JobEvent.seq)
        .limit(limit)
    )
    return list(session.scalars(query))


def list_events_newest_first(
    session: Session, job_id: str, *, before: int | None, limit: int
) -> list[JobEvent]:
    """Newest first, from just before seq `before` (from the newest when None)."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if before is not None:
        query = query.where(JobEvent.seq < before)
    return list(session.scalars(query.order_by(JobEvent.seq.desc()).limit(limit)))
