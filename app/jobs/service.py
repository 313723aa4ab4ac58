"""What the jobs API does: submit, read, cancel. Flushes only; the caller's unit of work commits."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.adapters.models import Adapter
from app.base_models.registry import get_base_model
from app.datasets.fetch import FetchError, validate_dataset_url
from app.db import after_commit, utcnow
from app.errors import InvalidRequest, NotFound
from app.files.repository import get_file
from app.ids import new_id
from app.jobs import repository
from app.jobs.events import append_event
from app.jobs.models import Job, JobStatus
from app.jobs.schemas import (
    AcceleratorClass,
    AdapterRef,
    CreateJobRequest,
    JobError,
    JobView,
    Progress,
)
from app.jobs.transitions import require_transition
from app.settings import Settings
from worker.celery_app import enqueue_job


class InvalidDatasetUrl(InvalidRequest):
    code = "invalid_dataset_url"


def _check_dataset_url(
    session: Session, *, owner: str, url: str, field: str, settings: Settings
) -> None:
    if url.startswith("file-"):
        try:
            get_file(session, owner=owner, file_id=url)
        except NotFound as exc:
            raise NotFound(
                f"{field}: {exc.message}", code=exc.code, detail={"field": field}
            ) from exc
        return
    try:
        validate_dataset_url(url, allowed_file_dirs=settings.allowed_file_dirs)
    except FetchError as exc:
        raise InvalidDatasetUrl(f"{field}: {exc.message}", detail={"field": field}) from exc


def queue_for(accelerator: AcceleratorClass | None, settings: Settings) -> str:
    return settings.default_queue if accelerator is None else f"training-{accelerator.value}"


def create_job(
    session: Session, *, owner: str, request: CreateJobRequest, settings: Settings
) -> Job:
    base_model = get_base_model(settings, request.base_model)
    _check_dataset_url(
        session, owner=owner, url=request.dataset_url, field="dataset_url", settings=settings
    )
    if request.validation_url is not None:
        _check_dataset_url(
            session,
            owner=owner,
            url=request.validation_url,
            field="validation_url",
            settings=settings,
        )
    job = Job(
        id=new_id("ftjob"),
        owner=owner,
        status=JobStatus.QUEUED,
        base_model=base_model.name,
        dataset_url=request.dataset_url,
        validation_url=request.validation_url,
        suffix=request.suffix,
        hyperparameters=request.hyperparameters.model_dump(mode="json"),
        lora=request.lora.model_dump(mode="json"),
        metadata_=request.metadata,
        queue=queue_for(request.accelerator, settings),
        attempt=0,
        event_seq=0,
        created_at=utcnow(),
        enqueued_at=utcnow(),
    )
    session.add(job)
    session.flush()
    append_event(
        session,
        job.id,
        "job.created",
        f"Job created: fine-tune {base_model.name} on {request.dataset_url}.",
        data={"hyperparameters": job.hyperparameters, "lora": job.lora},
    )
    after_commit(session, lambda: enqueue_job(job.id, job.queue))
    return job


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


def to_view(job: Job, adapter: Adapter | None) -> JobView:
    return JobView(
        id=job.id,
        status=job.status,
        base_model=job.base_model,
        dataset_url=job.dataset_url,
        validation_url=job.validation_url,
        suffix=job.suffix,
        hyperparameters=job.hyperparameters,
        lora=job.lora,
        progress=Progress.model_validate(job.progress) if job.progress else None,
        dataset=job.dataset,
        adapter=AdapterRef(id=adapter.id, name=adapter.name) if adapter else None,
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
    adapters = repository.adapters_by_job(session, [job.id for job in jobs])
    return [to_view(job, adapters.get(job.id)) for job in jobs]
