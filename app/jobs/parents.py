"""Starting a job from an adapter: a finished job's, a checkpoint, or an imported one.

The job trains on from the parent's LoRA weights, so SFT on a skill and then more SFT (or, later,
preference tuning) is one chain. The parent must be the owner's and of the same base model; its
LoRA shape (rank, alpha, dropout, target modules, rsLoRA, DoRA) is the job's, so `lora` is not
given with it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.adapters.repository import resolve_adapter
from app.adapters.unpacking import CONFIG
from app.adapters.validation import LoraFacts, parse_config
from app.errors import InvalidRequest, TuneserveError
from app.jobs.schemas import CreateJobRequest, LoraSpec, MethodType
from app.settings import Settings
from app.storage import artifact_store

FIELD = "adapter"


def _about_the_field(exc: TuneserveError) -> TuneserveError:
    if not isinstance(exc.detail, dict) or "field" not in exc.detail:
        exc.detail = {**(exc.detail or {}), "field": FIELD}
    exc.message = f"{FIELD}: {exc.message}"
    return exc


def _lora(facts: LoraFacts, reference: str) -> LoraSpec:
    if not facts.alpha.is_integer():
        raise InvalidRequest(
            f"{FIELD}: {reference!r} has lora_alpha {facts.alpha}; tuneserve trains on from "
            "adapters with a whole-number alpha only.",
            code="adapter_not_trainable",
            detail={"field": FIELD},
        )
    targets = facts.target_modules
    if isinstance(targets, list):
        # PEFT saves every targeted module's path; the kinds (q_proj, …) say the same.
        targets = sorted({name.rsplit(".", 1)[-1] for name in targets})
    return LoraSpec(
        r=facts.rank,
        alpha=int(facts.alpha),
        dropout=facts.dropout,
        target_modules=targets,
        use_rslora=facts.use_rslora,
        use_dora=facts.use_dora,
    )


def lora_facts(settings: Settings, path: str) -> LoraFacts:
    """The LoRA settings of the adapter stored at `path` (its adapter_config.json)."""
    with artifact_store(settings).open(f"{path}/{CONFIG}") as config:
        return parse_config(config.read())


def resolve_parent(
    session: Session, *, owner: str, request: CreateJobRequest, settings: Settings
) -> tuple[CreateJobRequest, dict[str, Any] | None]:
    """The request as it trains (base model and LoRA settings of its parent) and the parent to
    record on the job; the request unchanged, and None, when it starts from a fresh LoRA."""
    if request.adapter is None:
        return request, None
    if "lora" in request.model_fields_set:
        raise InvalidRequest(
            "lora: a job that starts from an adapter keeps that adapter's LoRA settings; leave "
            "lora out, or leave adapter out to train a fresh LoRA.",
            code="lora_with_adapter",
            detail={"field": "lora"},
        )
    try:
        parent = resolve_adapter(session, owner=owner, reference=request.adapter)
    except TuneserveError as exc:
        raise _about_the_field(exc) from None
    if request.base_model is not None and request.base_model != parent.base_model:
        raise InvalidRequest(
            f"{FIELD}: {request.adapter!r} was trained on {parent.base_model}, not "
            f"{request.base_model}; leave base_model out or give {parent.base_model}.",
            code="adapter_base_model_mismatch",
            detail={"field": FIELD},
        )
    try:
        facts = lora_facts(settings, parent.path)
    except TuneserveError as exc:
        raise _about_the_field(exc) from None
    scores = facts.task_type == "SEQ_CLS"
    if scores != (request.method.type is MethodType.REWARD_MODEL):
        parent_kind = "a reward model" if scores else "a generating adapter"
        wanted = "generating adapters" if scores else "reward models"
        raise InvalidRequest(
            f"{FIELD}: {request.adapter!r} is {parent_kind}; a {request.method.type.value} job "
            f"trains on from {wanted} only. Leave adapter out to start from a fresh LoRA.",
            code="adapter_method_mismatch",
            detail={"field": FIELD},
        )
    lora = _lora(facts, request.adapter)
    effective = request.model_copy(update={"base_model": parent.base_model, "lora": lora})
    recorded = {
        "reference": request.adapter,
        "kind": "checkpoint" if parent.id.startswith("ftckpt-") else "adapter",
        "id": parent.id,
        "path": parent.path,
    }
    return effective, recorded
