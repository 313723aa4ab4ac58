"""HTTP routes of the jobs API (thin: parse, call the service, shape the answer)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import CurrentOwner, SessionDep, SettingsDep
from app.jobs import repository, service
from app.jobs.events import list_events
from app.jobs.models import JobStatus
from app.jobs.schemas import (
    CreateJobRequest,
    JobEventList,
    JobEventView,
    JobList,
    JobView,
    MetricList,
    MetricPoint,
)

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=JobView, summary="Submit a fine-tuning job")
def create_job(
    request: CreateJobRequest, session: SessionDep, owner: CurrentOwner, settings: SettingsDep
) -> JobView:
    job = service.create_job(session, owner=owner, request=request, settings=settings)
    return service.to_view(job, None)


@router.get("", response_model=JobList, summary="List jobs, newest first")
def list_jobs(
    session: SessionDep,
    owner: CurrentOwner,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(max_length=64, description="Last id of the previous page")
    ] = None,
    status: JobStatus | None = None,
) -> JobList:
    jobs, has_more = repository.list_jobs(
        session, owner=owner, limit=limit, after=after, status=status
    )
    return JobList(data=service.views(session, jobs), has_more=has_more)


@router.get("/{job_id}", response_model=JobView, summary="A job with its progress")
def get_job(job_id: str, session: SessionDep, owner: CurrentOwner) -> JobView:
    job = repository.get_job(session, owner=owner, job_id=job_id)
    return service.views(session, [job])[0]


@router.post("/{job_id}/cancel", response_model=JobView, summary="Cancel a job")
def cancel_job(job_id: str, session: SessionDep, owner: CurrentOwner) -> JobView:
    job = service.cancel_job(session, owner=owner, job_id=job_id)
    return service.views(session, [job])[0]


@router.get("/{job_id}/events", response_model=JobEventList, summary="A job's event log")
def job_events(
    job_id: str,
    session: SessionDep,
    owner: CurrentOwner,
    after: Annotated[int, Query(ge=0, le=2**31, description="Return events after this seq")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobEventList:
    repository.get_job(session, owner=owner, job_id=job_id)
    events = list_events(session, job_id, after=after, limit=limit + 1)
    return JobEventList(
        data=[JobEventView.model_validate(event) for event in events[:limit]],
        has_more=len(events) > limit,
    )


@router.get("/{job_id}/metrics", response_model=MetricList, summary="A job's loss curve")
def job_metrics(job_id: str, session: SessionDep, owner: CurrentOwner) -> MetricList:
    repository.get_job(session, owner=owner, job_id=job_id)
    points = repository.list_metrics(session, job_id)
    return MetricList(data=[MetricPoint.model_validate(point) for point in points])
