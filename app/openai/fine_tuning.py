"""/v1/fine_tuning/jobs: OpenAI's fine-tuning API over app/jobs.

Jobs are created, read and cancelled by app/jobs/service.py; this module only maps shapes:
OpenAI's hyperparameters (numbers, or "auto" which stays native "auto" until the worker resolves
it) onto the native ones, and native jobs, events and checkpoints onto OpenAI's objects.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field, ValidationError

from app.deps import CurrentOwner, SessionDep, SettingsDep
from app.errors import InvalidRequest, NotFound, TuneserveError
from app.jobs import auto, repository, service
from app.jobs.events import list_events_newest_first
from app.jobs.models import Job, JobCheckpoint, JobEvent, JobStatus
from app.jobs.schemas import CreateJobRequest
from app.jobs.submission import submit_job
from app.openai.common import OpenAIRequest, Page, epoch, page, unsupported
from app.schemas import absent_if_none

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["openai"])

# learning_rate_multiplier 1 is tuneserve's base learning rate (that of "auto" at batch 8).
BASE_LEARNING_RATE: float = auto.BASE_LEARNING_RATE
STATUSES = {JobStatus.VALIDATING: "validating_files"}
EVENT_ID = re.compile(r"^ftevent-(?P<job>[0-9a-f]+)-(?P<seq>[0-9]{1,9})$")
CHECKPOINT_ID = re.compile(r"^ftckpt-[0-9a-f]+$")

Auto = Literal["auto"]


class OpenAIHyperparameters(OpenAIRequest):
    n_epochs: Auto | int | None = None
    batch_size: Auto | int | None = None
    learning_rate_multiplier: Auto | float | None = None


class Supervised(OpenAIRequest):
    hyperparameters: OpenAIHyperparameters | None = None


class DpoHyperparameters(OpenAIHyperparameters):
    beta: Auto | float | None = None


class Dpo(OpenAIRequest):
    hyperparameters: DpoHyperparameters | None = None


class ReinforcementHyperparameters(OpenAIHyperparameters):
    # Answers written per prompt: num_generations = 4 x compute_multiplier (at least 2).
    compute_multiplier: Auto | float | None = None
    eval_interval: Auto | int | None = None
    eval_samples: Auto | int | None = None
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = None


class Reinforcement(OpenAIRequest):
    grader: dict[str, Any]  # validated as the native grader (app/graders)
    hyperparameters: ReinforcementHyperparameters | None = None


class Method(OpenAIRequest):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: Reinforcement | None = None


class CreateFineTuningJob(OpenAIRequest):
    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=4096)
    validation_file: str | None = Field(None, max_length=4096)
    hyperparameters: OpenAIHyperparameters | None = None
    method: Method | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None


class JobErrorObject(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    estimated_finish: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    # Left out for a method OpenAI's API has no name for (orpo, a native-only method).
    method: dict[str, Any] | None = absent_if_none()
    seed: int
    trained_tokens: int | None
    result_files: list[str] = Field(default_factory=list)
    error: JobErrorObject | None
    metadata: dict[str, str] | None
    integrations: list[Any] = Field(default_factory=list)
    user_provided_suffix: str | None


class FineTuningEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


# --- requests ----------------------------------------------------------------------------------


def _hyperparameters(body: CreateFineTuningJob) -> OpenAIHyperparameters:
    if body.method is None:
        return body.hyperparameters or OpenAIHyperparameters()
    if body.hyperparameters is not None:
        raise InvalidRequest(
            f"Give hyperparameters in method.{body.method.type}.hyperparameters or at the top "
            "level, not both.",
            detail={"field": "hyperparameters"},
        )
    chosen = {
        "supervised": body.method.supervised,
        "dpo": body.method.dpo,
        "reinforcement": body.method.reinforcement,
    }[body.method.type]
    return (chosen.hyperparameters if chosen else None) or OpenAIHyperparameters()


# Answers GRPO writes per prompt at compute_multiplier 1 (tuneserve's num_generations default).
GENERATIONS_PER_COMPUTE = 4


def _reinforcement(body: CreateFineTuningJob, chosen: OpenAIHyperparameters) -> dict[str, Any]:
    settings = body.method.reinforcement if body.method else None
    if settings is None:
        raise InvalidRequest(
            'method.reinforcement: give the grader, e.g. {"grader": {"type": '
            '"string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": '
            '"{{item.answer}}", "operation": "eq"}}.',
            detail={"field": "method.reinforcement"},
        )
    native: dict[str, Any] = {"grader": settings.grader}
    if isinstance(chosen, ReinforcementHyperparameters):
        for name, asks in (
            ("eval_interval", chosen.eval_interval not in (None, auto.AUTO)),
            ("eval_samples", chosen.eval_samples not in (None, auto.AUTO)),
            ("reasoning_effort", chosen.reasoning_effort not in (None, "default")),
        ):
            if asks:
                raise unsupported(
                    f"method.reinforcement.hyperparameters.{name}",
                    f"{name} is not supported: tuneserve evaluates a reinforcement job once, "
                    "after training, on held-out prompts (base model against adapter), and its "
                    'models have no reasoning effort. Leave it out or "auto".',
                )
        if isinstance(chosen.compute_multiplier, float | int):
            native["num_generations"] = max(
                2, round(GENERATIONS_PER_COMPUTE * chosen.compute_multiplier)
            )
    return {"type": "reinforcement", "reinforcement": native}


def _method(body: CreateFineTuningJob, chosen: OpenAIHyperparameters) -> dict[str, Any]:
    """The native method: supervised, dpo with its beta ("auto" or omitted: the default), or
    reinforcement with its grader."""
    if body.method is None or body.method.type == "supervised":
        return {"type": "supervised"}
    if body.method.type == "reinforcement":
        return _reinforcement(body, chosen)
    beta = chosen.beta if isinstance(chosen, DpoHyperparameters) else None
    return {"type": "dpo", "dpo": {} if beta in (None, auto.AUTO) else {"beta": beta}}


def native_request(body: CreateFineTuningJob) -> CreateJobRequest:
    """The native job request an OpenAI one stands for ("auto" or omitted = native "auto")."""
    if body.integrations:
        raise unsupported("integrations", "integrations (e.g. wandb) are not supported.")
    chosen = _hyperparameters(body)
    hyperparameters: dict[str, Any] = {}
    if isinstance(chosen.n_epochs, int):
        hyperparameters["n_epochs"] = chosen.n_epochs
    if isinstance(chosen.batch_size, int):
        hyperparameters["batch_size"] = chosen.batch_size
    if isinstance(chosen.learning_rate_multiplier, float | int):
        hyperparameters["learning_rate"] = BASE_LEARNING_RATE * chosen.learning_rate_multiplier
    if body.seed is not None:
        hyperparameters["seed"] = body.seed
    try:
        # A fine-tuned model (ft:…, a checkpoint's too) is trained on, as OpenAI allows.
        fine_tuned = body.model.startswith("ft:")
        return CreateJobRequest.model_validate(
            {
                "base_model": None if fine_tuned else body.model,
                "adapter": body.model if fine_tuned else None,
                "dataset_url": body.training_file,
                "validation_url": body.validation_file,
                "suffix": body.suffix,
                "hyperparameters": hyperparameters,
                "method": _method(body, chosen),
                "metadata": body.metadata,
            }
        )
    except ValidationError as exc:
        raise _invalid(exc) from exc


# Native field names as OpenAI's request calls them.
_OPENAI_NAMES = {
    "base_model": "model",
    "adapter": "model",
    "dataset_url": "training_file",
    "validation_url": "validation_file",
    "hyperparameters.learning_rate": "hyperparameters.learning_rate_multiplier",
}


def _invalid(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    field = _OPENAI_NAMES.get(field, field)
    return InvalidRequest(
        f"Invalid request: {field}: {first['msg']}",
        code="invalid_value",
        detail={"field": field},
    )


def _in_openai_terms(exc: TuneserveError) -> TuneserveError:
    """A native error about dataset_url (say) speaks of training_file instead."""
    field = exc.detail.get("field") if isinstance(exc.detail, dict) else None
    if field in _OPENAI_NAMES:
        exc.detail = {**exc.detail, "field": _OPENAI_NAMES[field]}
        exc.message = exc.message.replace(f"{field}:", f"{_OPENAI_NAMES[field]}:", 1)
    return exc


# --- responses ---------------------------------------------------------------------------------


def fine_tuning_job(job: Job) -> FineTuningJob:
    rate = job.hyperparameters["learning_rate"]
    hyperparameters = {  # "auto" until the worker resolves them, as at OpenAI
        "n_epochs": job.hyperparameters["n_epochs"],
        "batch_size": job.hyperparameters["batch_size"],
        "learning_rate_multiplier": rate if rate == auto.AUTO else rate / BASE_LEARNING_RATE,
    }
    progress = job.progress or {}
    eta = progress.get("eta_seconds")
    error = job.error or None
    return FineTuningJob(
        id=job.id,
        created_at=epoch(job.created_at) or 0,
        finished_at=epoch(job.finished_at),
        estimated_finish=(
            int(time.time() + eta) if eta is not None and job.status is JobStatus.RUNNING else None
        ),
        model=job.parent["reference"] if job.parent else job.base_model,
        fine_tuned_model=job.fine_tuned_model if job.status is JobStatus.SUCCEEDED else None,
        organization_id=job.owner,
        status=STATUSES.get(job.status, job.status.value),
        training_file=job.dataset_url,
        validation_file=job.validation_url,
        hyperparameters=hyperparameters,
        method=_openai_method(job, hyperparameters),
        seed=job.hyperparameters["seed"],
        trained_tokens=progress.get("trained_tokens"),
        error=(
            JobErrorObject(
                code=error["code"],
                message=error["message"],
                param=(error.get("detail") or {}).get("field"),
            )
            if error
            else None
        ),
        metadata=job.metadata_,
        user_provided_suffix=job.suffix,
    )


def _openai_method(job: Job, hyperparameters: dict[str, Any]) -> dict[str, Any] | None:
    if job.method_type in ("orpo", "reward_model"):
        return None
    if job.method_type == "dpo":
        beta = (job.method or {}).get("dpo", {}).get("beta")
        return {"type": "dpo", "dpo": {"hyperparameters": {**hyperparameters, "beta": beta}}}
    if job.method_type == "reinforcement":
        settings = (job.method or {})["reinforcement"]
        compute = settings["num_generations"] / GENERATIONS_PER_COMPUTE
        return {
            "type": "reinforcement",
            "reinforcement": {
                "grader": settings["grader"],
                "hyperparameters": {
                    **hyperparameters,
                    "compute_multiplier": compute,
                    "eval_interval": "auto",
                    "eval_samples": "auto",
                    "reasoning_effort": "default",
                },
            },
        }
    return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}


def _event(job: Job, event: JobEvent) -> FineTuningEvent:
    level = {"warning": "warn"}.get(event.level, event.level)
    return FineTuningEvent(
        id=f"ftevent-{job.id.removeprefix('ftjob-')}-{event.seq}",
        created_at=epoch(event.created_at) or 0,
        level=level if level in ("info", "warn", "error") else "info",
        message=event.message,
        data={"type": event.type, **(event.data or {})},
    )


def _checkpoint(job: Job, checkpoint: JobCheckpoint) -> Checkpoint:
    return Checkpoint(
        id=checkpoint.id,
        created_at=epoch(checkpoint.created_at) or 0,
        fine_tuned_model_checkpoint=job.checkpoint_model(checkpoint.step),
        fine_tuning_job_id=job.id,
        step_number=checkpoint.step,
        metrics={"step": checkpoint.step, **(checkpoint.metrics or {})},
    )


# --- routes ------------------------------------------------------------------------------------


@router.post("", response_model=FineTuningJob, summary="Create a fine-tuning job")
def create_job(
    body: CreateFineTuningJob, session: SessionDep, owner: CurrentOwner, settings: SettingsDep
) -> FineTuningJob:
    try:
        request = native_request(body)
        submission = submit_job(session, owner=owner, request=request, settings=settings)
    except TuneserveError as exc:
        raise _in_openai_terms(exc) from None
    return fine_tuning_job(submission.job)


def _metadata_filter(request: Request) -> dict[str, str]:
    # The SDK sends metadata={"k": "v"} as the query parameter metadata[k]=v.
    found = {}
    for name, value in request.query_params.multi_items():
        match = re.fullmatch(r"metadata\[(.{1,64})\]", name)
        if match:
            found[match[1]] = value
    return found


@router.get("", response_model=Page, summary="List fine-tuning jobs, newest first")
def list_jobs(
    request: Request,
    session: SessionDep,
    owner: CurrentOwner,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Page:
    jobs, has_more = repository.list_jobs(
        session,
        owner=owner,
        limit=limit,
        after=after,
        status=None,
        metadata=_metadata_filter(request),
    )
    return page([fine_tuning_job(job) for job in jobs], has_more)


@router.get("/{job_id}", response_model=FineTuningJob, summary="A fine-tuning job")
def retrieve_job(job_id: str, session: SessionDep, owner: CurrentOwner) -> FineTuningJob:
    return fine_tuning_job(repository.get_job(session, owner=owner, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=FineTuningJob, summary="Cancel a job")
def cancel_job(job_id: str, session: SessionDep, owner: CurrentOwner) -> FineTuningJob:
    return fine_tuning_job(service.cancel_job(session, owner=owner, job_id=job_id))


@router.get("/{job_id}/events", response_model=Page, summary="A job's events, newest first")
def job_events(
    job_id: str,
    session: SessionDep,
    owner: CurrentOwner,
    after: Annotated[str | None, Query(max_length=80, description="Last event id seen")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> Page:
    job = repository.get_job(session, owner=owner, job_id=job_id)
    before = None
    if after is not None:
        match = EVENT_ID.match(after)
        if match is None or f"ftjob-{match['job']}" != job.id:
            raise NotFound(f"after: no event {after!r} in job {job_id}.", code="event_not_found")
        before = int(match["seq"])
    events = list_events_newest_first(session, job.id, before=before, limit=limit + 1)
    return page([_event(job, event) for event in events[:limit]], len(events) > limit)


@router.get("/{job_id}/checkpoints", response_model=Page, summary="A job's checkpoints")
def job_checkpoints(
    job_id: str,
    session: SessionDep,
    owner: CurrentOwner,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> Page:
    job = repository.get_job(session, owner=owner, job_id=job_id)
    checkpoints = repository.list_checkpoints(session, job.id)  # newest first
    if after is not None:
        ids = [checkpoint.id for checkpoint in checkpoints]
        if not CHECKPOINT_ID.match(after) or after not in ids:
            raise NotFound(f"after: no checkpoint {after!r} in job {job_id}.")
        checkpoints = checkpoints[ids.index(after) + 1 :]
    shown = [_checkpoint(job, checkpoint) for checkpoint in checkpoints[:limit]]
    return page(shown, len(checkpoints) > limit)
