"""HTTP routes of the jobs API (thin: parse, call the service, shape the answer)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from app import sse
from app.db import unit_of_work
from app.deps import CurrentOwner, SessionDep, SettingsDep
from app.errors import ErrorBody
from app.jobs import plan, repository, service
from app.jobs.events import list_events
from app.jobs.models import JobStatus
from app.jobs.schemas import (
    CheckpointList,
    CheckpointView,
    CreateJobRequest,
    JobEventList,
    JobEventView,
    JobList,
    JobPlan,
    JobView,
    MetricList,
    MetricPoint,
)
from app.jobs.submission import plan_submission, submit_job

router = APIRouter(prefix="/jobs", tags=["jobs"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Makes retries safe: 1 to 200 printable ASCII characters, unique per "
        "request (a UUID). A repeat of the same request with the same key answers 200 with the "
        "job the first one created and `Idempotent-Replayed: true`; the key on a different "
        "request is a 409 `idempotency_key_reused`.",
    ),
]


@router.post(
    "",
    status_code=201,
    response_model=JobView,
    summary="Submit a fine-tuning job",
    responses={
        200: {
            "model": JobView | JobPlan,
            "description": "A retry with the same Idempotency-Key and body: the job the first "
            "request created, with the header `Idempotent-Replayed: true`. Nothing new is "
            'queued. With `"dry_run": true`: the plan, as POST /jobs/plan answers it.',
        },
        400: {
            "model": ErrorBody,
            "description": "Bad input; `job_does_not_fit`: the job's estimated peak memory does "
            "not fit its device (the message and `detail.suggestion` say what to change).",
        },
        409: {"description": "The Idempotency-Key was used for a different request."},
    },
)
def create_job(
    request: CreateJobRequest,
    response: Response,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobView | JSONResponse:
    """Queue a LoRA fine-tuning job (201). Send an `Idempotency-Key` header to make retries
    safe: the same key with the same body returns the existing job instead of a second one.
    With `"dry_run": true`, answer the job's plan instead (200; nothing is stored or queued)."""
    if request.dry_run:
        found = plan_submission(owner=owner, request=request, settings=settings)
        return JSONResponse(found.model_dump(mode="json"))
    submission = submit_job(
        session, owner=owner, request=request, settings=settings, idempotency_key=idempotency_key
    )
    if submission.replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
        return service.views(session, [submission.job])[0]
    return service.to_view(submission.job, None, show_secret=True)


@router.post("/plan", response_model=JobPlan, summary="Plan a job without running it")
def plan_job(request: CreateJobRequest, owner: CurrentOwner, settings: SettingsDep) -> JobPlan:
    """What the job this body describes would do, computed now from its dataset: rows and
    tokens, rows too long for max_seq_length (by line), the "auto" hyperparameters resolved,
    the steps, the estimated time and peak memory on its target device (and what to change when
    it does not fit), and the loss mask of the first 3 examples. Nothing is stored or queued;
    `dry_run` is ignored here."""
    return plan_submission(owner=owner, request=request, settings=settings)


@router.get("/{job_id}/plan", response_model=JobPlan, summary="A job's plan, computed now")
def job_plan(job_id: str, owner: CurrentOwner, settings: SettingsDep) -> JobPlan:
    """The plan of the request that made this job (its "auto" hyperparameters asked as "auto"
    again), computed now from its dataset, as POST /jobs/plan answers it."""
    # No request session: planning takes seconds and opens its own; SQLite must not see a
    # transaction held open across it.
    with unit_of_work() as session:
        request = service.request_of(repository.get_job(session, owner=owner, job_id=job_id))
    return plan.plan_job(owner=owner, request=request, settings=settings)


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


async def _server_sent(events: AsyncIterator[JobEventView | None]) -> AsyncIterator[str]:
    async for event in events:
        if event is None:
            yield sse.KEEP_ALIVE
        else:
            yield sse.message(event.model_dump_json(), id=event.seq, event=event.type)


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    summary="Follow a job's events live (server-sent events)",
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "One message per event: `id: <seq>`, `event: <type>`, `data: <the "
            "event as JSON, as in GET /jobs/{id}/events>`; a `: keep-alive` comment after 15 s "
            "without one. The stream ends after the job's terminal event (job.succeeded, "
            "job.failed or job.cancelled).",
        }
    },
)
def stream_job_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    owner: CurrentOwner,
    after: Annotated[int, Query(ge=0, le=2**31, description="Send events after this seq")] = 0,
    last_event_id: Annotated[
        int | None,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=2**31,
            description="Resume after this seq (sent by EventSource on reconnect); wins over "
            "`after`.",
        ),
    ] = None,
) -> StreamingResponse:
    """The job's event log as `text/event-stream`: the events so far, then each new one as it
    happens, until the job ends or the client hangs up. Reconnect with `Last-Event-ID` (or
    `after`) to resume without gaps or repeats."""
    repository.get_job(session, owner=owner, job_id=job_id)  # 404 before the stream starts
    events = service.follow_events(
        job_id,
        after=after if last_event_id is None else last_event_id,
        disconnected=request.is_disconnected,
    )
    return sse.event_stream(_server_sent(events))


@router.get(
    "/{job_id}/checkpoints", response_model=CheckpointList, summary="A job's saved checkpoints"
)
def job_checkpoints(job_id: str, session: SessionDep, owner: CurrentOwner) -> CheckpointList:
    """Newest first. Each one resumes the job after a worker dies, and its id works as `adapter`
    in POST /generate."""
    repository.get_job(session, owner=owner, job_id=job_id)
    checkpoints = repository.list_checkpoints(session, job_id)
    return CheckpointList(data=[CheckpointView.model_validate(c) for c in checkpoints])
