"""The reward models a reinforcement job's graders name (`reward_model` graders): reward-model
jobs' adapters of the same owner and base model, checked when the job is submitted and found
again by the worker when it trains (one deleted in between fails the job by name)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.adapters.repository import resolve_adapter
from app.base_models.registry import get_base_model
from app.errors import InvalidRequest, TuneserveError
from app.graders import Grader, reward_model_names
from app.jobs.parents import lora_facts
from app.jobs.schemas import CreateJobRequest
from app.settings import Settings

FIELD = "method.reinforcement.grader"


def reward_model_paths(
    session: Session, *, owner: str, grader: Grader, base_model: str, settings: Settings
) -> dict[str, str]:
    """Each reward model the grader names (its `model`), as the artifact path of its adapter."""
    paths: dict[str, str] = {}
    for name in reward_model_names(grader):
        try:
            adapter = resolve_adapter(session, owner=owner, reference=name)
            scores = lora_facts(settings, adapter.path).task_type == "SEQ_CLS"
        except TuneserveError as exc:
            exc.message = f"{FIELD}: reward model {name!r}: {exc.message}"
            exc.detail = {**(exc.detail if isinstance(exc.detail, dict) else {}), "field": FIELD}
            raise
        if not scores:
            raise InvalidRequest(
                f"{FIELD}: {name!r} is a generating adapter, not a reward model. Name a job of "
                'method {"type": "reward_model"} (or its adapter).',
                code="grader_model_not_reward_model",
                detail={"field": FIELD},
            )
        if adapter.base_model != base_model:
            raise InvalidRequest(
                f"{FIELD}: reward model {name!r} was trained on {adapter.base_model}; the job "
                f"trains {base_model}, and its reward models must share that base model.",
                code="grader_model_base_mismatch",
                detail={"field": FIELD},
            )
        paths[name] = adapter.path
    return paths


def check_reward_models(
    session: Session, *, owner: str, request: CreateJobRequest, settings: Settings
) -> None:
    """Refuse (4xx naming the grader) a reward_model grader whose model is not the owner's
    reward model of the job's base model."""
    if request.method.reinforcement is None:
        return
    base_model = get_base_model(settings, request.base_model).name
    reward_model_paths(
        session,
        owner=owner,
        grader=request.method.reinforcement.grader,
        base_model=base_model,
        settings=settings,
    )
