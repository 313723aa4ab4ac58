"""What the jobs API does: submit, read, cancel, follow. Flushes only; the caller's unit of work
commits (the live event stream, which outlives any request session, opens its own per read)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import anyio
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.adapters.models import Adapter
from app.base_models.registry import get_base_model
from app.datasets.fetch import FetchError, validate_dataset_url
from app.db import after_commit, unit_of_work, utcnow
from app.errors import InvalidRequest, NotFound, TooManyRequests
from app.files.repository import get_file
from app.idempotency import check_idempotency_key, ensure_same_request, request_hash
from app.ids import new_id
from app.jobs import repository
from app.jobs.auto import AUTO, auto_fields
from app.jobs.events import append_event, list_events
from app.jobs.models import TERMINAL_STATUSES, Job, JobStatus
from app.jobs.schemas import (
    AcceleratorClass,
    AdapterRef,
    CreateJobRequest,
    Evaluation,
    JobError,
    JobEventView,
    JobView,
    Progress,
    WebhookDeliveryView,
    WebhookView,
)
from app.jobs.transitions import EVENT_TYPES, require_transition
from app.outbound import OutboundError, check_url_literal
from app.queue import enqueue_job
from app.settings import Settings
from app.webhooks.models import WebhookDelivery
from app.webhooks.signing import new_secret


class InvalidDatasetUrl(InvalidRequest):
    code = "invalid_dataset_url"


def check_dataset_url(
    session: Session, *, owner: str, url: str, field: str, settings: Settings
) -> None:
    try:
        validate_dataset_url(
            url,
            allowed_file_dirs=settings.allowed_file_dirs,
            allow_private_networks=settings.allow_private_networks,
        )
    except FetchError as exc:
        raise InvalidDatasetUrl(f"{field}: {exc.message}", detail={"field": field}) from exc
    if url.startswith("file-"):
        try:
            get_file(session, owner=owner, file_id=url)
        except NotFound as exc:
            raise NotFound(
                f"{field}: {exc.message}", code=exc.code, detail={"field": field}
            ) from exc


def check_dataset_urls(
    session: Session, *, owner: str, request: CreateJobRequest, settings: Settings
) -> None:
    """The dataset and validation URLs of a job request, as check_dataset_url checks one."""
    check_dataset_url(
        session, owner=owner, url=request.dataset_url, field="dataset_url", settings=settings
    )
    if request.validation_url is not None:
        check_dataset_url(
            session,
            owner=owner,
            url=request.validation_url,
            field="validation_url",
            settings=settings,
        )


def check_webhook_url(url: str | None, settings: Settings) -> None:
    """Refuse a webhook aimed at localhost or a non-public IP literal now; the full check (DNS,
    every address) happens on each delivery."""
    if url is None or settings.allow_private_networks:
        return
    try:
        check_url_literal(url)
    except OutboundError as exc:
        raise InvalidRequest(
            f"webhook_url: {exc} (set TUNESERVE_ALLOW_PRIVATE_NETWORKS=true to allow it)",
            code="invalid_webhook_url",
            detail={"field": "webhook_url"},
        ) from exc


def _check_jobs_in_flight(session: Session, *, owner: str, limit: int) -> None:
    in_flight = repository.count_in_flight(session, owner=owner)
    if in_flight >= limit:
        raise TooManyRequests(
            f"You have {in_flight} jobs queued or running, the most one owner may have "
            "(TUNESERVE_MAX_JOBS_IN_FLIGHT). Submit again when one has finished, or cancel one.",
            code="too_many_jobs",
            headers={"Retry-After": "60"},
        )


def queue_for(accelerator: AcceleratorClass | None, settings: Settings) -> str:
    return settings.default_queue if accelerator is None else f"training-{accelerator.value}"


class JobSubmission(NamedTuple):
    job: Job
    replayed: bool  # True: an earlier request with the same Idempotency-Key created the job


def job_request_hash(request: CreateJobRequest) -> str:
    """The request as validated (defaults filled in), so `{}` and omitted fields hash alike
    (an omitted n_epochs and `"n_epochs": "auto"` too)."""
    # None fields left out: a new optional field does not change the hash of older requests.
    # dry_run is not part of the job (a dry run creates none).
    return request_hash(request.model_dump(mode="json", exclude_none=True, exclude={"dry_run"}))


def _replay(job: Job, *, key: str, request_hash: str) -> JobSubmission:
    ensure_same_request(
        key=key,
        stored_hash=job.request_hash,
        new_hash=request_hash,
        kind="job",
        resource_id=job.id,
    )
    return JobSubmission(job, replayed=True)


def create_job(
    session: Session,
    *,
    owner: str,
    request: CreateJobRequest,
    settings: Settings,
    idempotency_key: str | None = None,
    parent: dict[str, Any] | None = None,
) -> JobSubmission:
    """Store a queued job and enqueue it once the caller commits.

    With an idempotency key, a retry of the same request gets the job the first one created
    (`replayed`, nothing enqueued or stored); the same key on a different request is a 409.
    """
    key = check_idempotency_key(idempotency_key)
    digest = job_request_hash(request)
    if key is not None:
        earlier = repository.get_job_by_idempotency_key(session, owner=owner, key=key)
        if earlier is not None:
            return _replay(earlier, key=key, request_hash=digest)
    _check_jobs_in_flight(session, owner=owner, limit=settings.max_jobs_in_flight)
    base_model = get_base_model(settings, request.base_model)
    check_dataset_urls(session, owner=owner, request=request, settings=settings)
    check_webhook_url(request.webhook_url, settings)
    hyperparameters = request.hyperparameters.model_dump(mode="json")
    job = Job(
        id=new_id("ftjob"),
        owner=owner,
        status=JobStatus.QUEUED,
        base_model=base_model.name,
        dataset_url=request.dataset_url,
        validation_url=request.validation_url,
        suffix=request.suffix,
        hyperparameters=hyperparameters,
        auto_hyperparameters=auto_fields(hyperparameters),
        lora=request.lora.model_dump(mode="json"),
        quantization=request.quantization.value if request.quantization else None,
        distributed=request.distributed.value if request.distributed else None,
        parent=parent,
        method=request.method.model_dump(mode="json", exclude_none=True),
        metadata_=request.metadata,
        webhook_url=request.webhook_url,
        webhook_secret=(request.webhook_secret or new_secret()) if request.webhook_url else None,
        idempotency_key=key,
        request_hash=None if key is None else digest,
        queue=queue_for(request.accelerator, settings),
        attempt=0,
        event_seq=0,
        created_at=utcnow(),
        enqueued_at=utcnow(),
    )
    if key is None:
        _insert(session, job)
    else:
        try:
            # A savepoint, so losing the race on UNIQUE(owner, idempotency_key) to an identical
            # request leaves the request's session usable for reading the winner. The job.created
            # event goes inside too: pysqlite lets the RELEASE of a savepoint that opened the
            # transaction commit it, and the job must never be visible without that event.
            with session.begin_nested():
                _insert(session, job)
        except IntegrityError:
            winner = repository.get_job_by_idempotency_key(session, owner=owner, key=key)
            if winner is None:
                raise
            return _replay(winner, key=key, request_hash=digest)
    after_commit(session, lambda: enqueue_job(job.id, job.queue, settings))
    return JobSubmission(job, replayed=False)


def request_of(job: Job) -> CreateJobRequest:
    """The request that made job, as far as planning goes ("auto" asked again)."""
    hyperparameters = {**job.hyperparameters, **dict.fromkeys(job.auto_hyperparameters or [], AUTO)}
    prefix = "training-"
    accelerator = job.queue[len(prefix) :] if job.queue.startswith(prefix) else None
    return CreateJobRequest.model_validate(
        {
            "base_model": job.base_model,
            "dataset_url": job.dataset_url,
            "validation_url": job.validation_url,
            "hyperparameters": hyperparameters,
            "lora": job.lora,
            "quantization": job.quantization,
            "distributed": job.distributed,
            "method": job.method or {"type": "supervised"},
            "accelerator": accelerator,
        }
    )


def _insert(session: Session, job: Job) -> None:
    session.add(job)
    session.flush()
    append_event(
        session,
        job.id,
        "job.created",
        f"Job created: fine-tune {job.base_model} on {job.dataset_url}.",
        data={"hyperparameters": job.hyperparameters, "lora": job.lora},
    )


def cancel_job(session: Session, *, owner: str, job_id: str) -> Job:
    """Queued jobs are cancelled at once; claimed ones are asked to stop and their worker ends
    them `cancelled` within about one training step."""
    job = repository.get_job(session, owner=owner, job_id=job_id)
    if job.status is JobStatus.QUEUED:
        require_transition(session, job, JobStatus.CANCELLED, "Cancelled before it started.")
    elif job.status in (JobStatus.VALIDATING, JobStatus.RUNNING):
        if job.cancel_requested_at is None:
            job.cancel_requested_at = utcnow()
            append_event(session, job.id, "job.cancel_requested", "Cancel requested; stopping.")
    else:
        require_transition(session, job, JobStatus.CANCELLED, "Cancel requested.")
    session.flush()
    session.refresh(job)
    return job


def to_view(
    job: Job,
    adapter: Adapter | None,
    deliveries: list[WebhookDelivery] | None = None,
    *,
    show_secret: bool = False,
) -> JobView:
    """The job as the API shows it; the webhook secret only when show_secret (the answer to the
    request that created the job)."""
    webhook = None
    if job.webhook_url:
        webhook = WebhookView(
            url=job.webhook_url,
            secret=job.webhook_secret if show_secret else None,
            deliveries=[WebhookDeliveryView.model_validate(d) for d in deliveries or []],
        )
    return JobView(
        id=job.id,
        status=job.status,
        base_model=job.base_model,
        dataset_url=job.dataset_url,
        validation_url=job.validation_url,
        suffix=job.suffix,
        hyperparameters=job.hyperparameters,
        auto_hyperparameters=job.auto_hyperparameters or [],
        lora=job.lora,
        quantization=job.quantization,
        distributed=job.distributed,
        method=job.method or {"type": "supervised"},
        parent=(
            {key: job.parent[key] for key in ("reference", "kind", "id")} if job.parent else None
        ),
        progress=Progress.model_validate(job.progress) if job.progress else None,
        dataset=job.dataset,
        adapter=AdapterRef(id=adapter.id, name=adapter.name) if adapter else None,
        evaluation=Evaluation.model_validate(job.evaluation) if job.evaluation else None,
        webhook=webhook,
        error=JobError.model_validate(job.error) if job.error else None,
        metadata=job.metadata_,
        attempt=job.attempt,
        queue=job.queue,
        worker=job.worker,
        device=job.device,
        cancel_requested=job.cancel_requested_at is not None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def views(session: Session, jobs: list[Job]) -> list[JobView]:
    ids = [job.id for job in jobs]
    adapters = repository.adapters_by_job(session, ids)
    deliveries = repository.webhook_deliveries_by_job(
        session, [job.id for job in jobs if job.webhook_url]
    )
    return [to_view(job, adapters.get(job.id), deliveries.get(job.id)) for job in jobs]


STREAM_POLL_SECONDS = 0.5
STREAM_KEEPALIVE_SECONDS = 15.0
STREAM_BATCH = 500
TERMINAL_EVENT_TYPES = frozenset(EVENT_TYPES[status] for status in TERMINAL_STATUSES)


@dataclass(frozen=True)
class _EventPoll:
    events: list[JobEventView]
    job_over: bool  # the job had ended (or was gone) before these events were read


def _poll_events(job_id: str, after: int) -> _EventPoll:
    # One short unit of work per read: a stream may stay open for hours and must not hold a
    # session (or a pooled connection) while it waits.
    with unit_of_work() as session:
        # Status first: an end seen here has its terminal event in the read below (same commit).
        status = repository.job_status(session, job_id)
        events = list_events(session, job_id, after=after, limit=STREAM_BATCH)
        return _EventPoll(
            events=[JobEventView.model_validate(event) for event in events],
            job_over=status is None or status.is_terminal,
        )


async def follow_events(
    job_id: str,
    *,
    after: int,
    disconnected: Callable[[], Awaitable[bool]],
    poll_seconds: float = STREAM_POLL_SECONDS,
    keepalive_seconds: float = STREAM_KEEPALIVE_SECONDS,
) -> AsyncIterator[JobEventView | None]:
    """Every event of the job after seq `after`, then each new one as it is appended.

    Ends once the job's terminal event has been yielded (at once if it lies at or before
    `after`) or when `disconnected()` says the reader left. Yields None after
    `keepalive_seconds` without an event, for the caller to keep the connection alive. SQL is
    read in a worker thread, so the event loop never waits on it.
    """
    quiet_since = time.monotonic()
    while not await disconnected():
        poll = await anyio.to_thread.run_sync(_poll_events, job_id, after)
        for event in poll.events:
            yield event
            after = event.seq
            if event.type in TERMINAL_EVENT_TYPES:
                return
        batch_full = len(poll.events) == STREAM_BATCH
        if poll.job_over and not batch_full:
            return
        if poll.events:
            quiet_since = time.monotonic()
            if batch_full:
                continue  # more are waiting: read on without sleeping
        elif time.monotonic() - quiet_since >= keepalive_seconds:
            yield None
            quiet_since = time.monotonic()
        await anyio.sleep(poll_seconds)
