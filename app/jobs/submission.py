"""Submitting a job: the one path the native and the OpenAI-compatible routes share."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.db import unit_of_work
from app.errors import InvalidRequest
from app.jobs import plan, service
from app.jobs.parents import resolve_parent
from app.jobs.reward_models import check_reward_models
from app.jobs.schemas import CreateJobRequest, Distributed, JobPlan, LoraType, Quantization
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
    check_levers(request)
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
    check_levers(request)
    return plan.plan_job(owner=owner, request=request, settings=settings)


def check_levers(request: CreateJobRequest) -> None:
    """Refuse the combinations of memory levers that cannot train.

    400 distributed_unsupported: AdaLoRA sharded (FSDP): its rank allocation reads each
    module's whole singular values, which FSDP holds in shares (it fails at the first step).

    400 quantization_unsupported: DoRA on an 8-bit base (PEFT's DoRA dequantizes bitsandbytes'
    8-bit layers in a way their next forward pass does not survive: with PEFT 0.21 and
    bitsandbytes 0.50 training fails at its second step, fresh or from a DoRA parent).

    The request is the effective one, so a parent adapter's DoRA counts too. Every method
    trains on 4bit and 8bit bases (all five tried here)."""
    if request.distributed is Distributed.FSDP and request.lora.type is LoraType.ADALORA:
        raise InvalidRequest(
            'lora.type "adalora" does not train sharded (FSDP reads each module\'s singular '
            'values in shares): use "distributed": "ddp", or "quantization": "4bit" to fit one '
            "device.",
            code="distributed_unsupported",
            detail={"field": "distributed"},
        )
    if request.quantization is Quantization.INT8 and request.lora.use_dora:
        raise InvalidRequest(
            'quantization "8bit" does not train DoRA adapters (lora.use_dora, or an adapter '
            'trained with it): use "4bit", or no quantization.',
            code="quantization_unsupported",
            detail={"field": "quantization"},
        )
