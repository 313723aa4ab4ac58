"""The job figures /metrics reports, read from SQL in three aggregate queries (no job rows)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, SQLColumnExpression, case, extract, func, select
from sqlalchemy.orm import Session

from app.jobs.models import TERMINAL_STATUSES, Job, JobStatus


@dataclass(frozen=True)
class Durations:
    """Durations of the finished jobs of one status: `buckets` counts the jobs of at most each
    bound (cumulative, in the order of the bounds asked for)."""

    count: int
    total_seconds: float
    buckets: list[int]


@dataclass(frozen=True)
class JobStats:
    jobs: dict[tuple[JobStatus, str], int]  # (status, queue) -> jobs
    durations: dict[JobStatus, Durations]  # terminal statuses that have finished jobs
    tokens_per_second: float  # of the running jobs together, as last reported
    trained_tokens: int  # by the jobs that succeeded


def job_stats(session: Session, *, duration_bounds: Sequence[float]) -> JobStats:
    counted = session.execute(
        select(Job.status, Job.queue, func.count()).group_by(Job.status, Job.queue)
    ).all()
    jobs = {(JobStatus(status), str(queue)): int(count) for status, queue, count in counted}

    # From the start of training, or from submission for jobs that never started (cancelled or
    # failed while queued).
    started = func.coalesce(Job.started_at, Job.created_at)
    seconds = _seconds_between(session, started, Job.finished_at)
    finished = session.execute(
        select(
            Job.status,
            func.count(),
            func.sum(seconds),
            func.sum(Job.progress["trained_tokens"].as_integer()),
            *(func.sum(case((seconds <= bound, 1), else_=0)) for bound in duration_bounds),
        )
        .where(Job.status.in_(TERMINAL_STATUSES), Job.finished_at.is_not(None))
        .group_by(Job.status)
    ).all()
    durations, trained_tokens = {}, 0
    for status, count, total, tokens, *buckets in finished:
        durations[JobStatus(status)] = Durations(
            count=int(count),
            total_seconds=float(total or 0),
            buckets=[int(bucket or 0) for bucket in buckets],
        )
        if status == JobStatus.SUCCEEDED:
            trained_tokens = int(tokens or 0)

    tokens_per_second = session.scalar(
        select(func.sum(Job.progress["tokens_per_second"].as_float())).where(
            Job.status == JobStatus.RUNNING
        )
    )
    return JobStats(
        jobs=jobs,
        durations=durations,
        tokens_per_second=float(tokens_per_second or 0),
        trained_tokens=trained_tokens,
    )


def _seconds_between(
    session: Session, start: SQLColumnExpression[Any], end: SQLColumnExpression[Any]
) -> ColumnElement[Any]:
    """`end - start` in seconds, computed by the database (SQLite stores datetimes as text)."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return extract("epoch", end - start)
