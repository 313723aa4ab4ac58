"""What a generation runs on: a base model alone, or a base model with one adapter."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.adapters.repository import ServableAdapter, record_adapter_use, resolve_adapter
from app.base_models.registry import BaseModel, get_base_model, list_base_models
from app.errors import NotFound
from app.settings import Settings


@dataclass(frozen=True)
class Target:
    base_model: BaseModel
    adapter: ServableAdapter | None

    @property
    def adapter_key(self) -> str | None:
        return self.adapter.id if self.adapter else None

    @property
    def adapter_path(self) -> str | None:
        return self.adapter.path if self.adapter else None


def resolve_target(
    session: Session,
    settings: Settings,
    *,
    owner: str,
    adapter: str | None,
    base_model: str | None,
) -> Target:
    """The native API's choice: `adapter` (any reference resolve_adapter takes) or else
    `base_model` (the default when None)."""
    if adapter is None:
        return Target(get_base_model(settings, base_model), None)
    found = resolve_adapter(session, owner=owner, reference=adapter)
    return Target(get_base_model(settings, found.base_model), found)


def resolve_model(session: Session, settings: Settings, *, owner: str, model: str) -> Target:
    """One `model` name (OpenAI's way): a base model's name, or a fine-tuned model or
    checkpoint the owner may use (ft:…, or any adapter reference)."""
    if any(base.name == model for base in list_base_models(settings)):
        return Target(get_base_model(settings, model), None)
    try:
        return resolve_target(session, settings, owner=owner, adapter=model, base_model=None)
    except NotFound as exc:
        raise NotFound(
            f"The model {model!r} does not exist or you do not have access to it. GET "
            "/v1/models lists the models this key may use.",
            code="model_not_found",
            detail={"field": "model"},
        ) from exc


def record_use(adapter_key: str | None) -> None:
    """Count a generation against its adapter (request count, last use); none for a base model."""
    if adapter_key is not None:
        record_adapter_use(adapter_key)
