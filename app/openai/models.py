"""/v1/models: the base models and the fine-tuned models (adapters) a key may use."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from app.adapters.repository import all_adapters
from app.base_models.registry import is_available, list_base_models
from app.deps import CurrentOwner, SessionDep, SettingsDep
from app.inference.targets import resolve_model
from app.openai.common import Page, epoch, page

router = APIRouter(prefix="/v1/models", tags=["openai"])
SERVICE_OWNER = "tuneserve"


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


@router.get("", response_model=Page, summary="Models this key may use")
def models(session: SessionDep, owner: CurrentOwner, settings: SettingsDep) -> Page:
    """Base models on disk (or downloadable), then the owner's fine-tuned models, newest first.
    Checkpoints (`ft:…:ckpt-step-N`) are models too; GET /v1/fine_tuning/jobs/{id}/checkpoints
    lists them."""
    found = [
        ModelObject(id=base.name, created=0, owned_by=SERVICE_OWNER)
        for base in list_base_models(settings)
        if is_available(settings, base)
    ]
    adapters = all_adapters(session, owner=owner)
    found += [
        ModelObject(id=adapter.name, created=epoch(adapter.created_at) or 0, owned_by=owner)
        for adapter in adapters
    ]
    return page(found, has_more=False)


@router.get("/{model:path}", response_model=ModelObject, summary="One model")
def model(
    model: str, session: SessionDep, owner: CurrentOwner, settings: SettingsDep
) -> ModelObject:
    target = resolve_model(session, settings, owner=owner, model=model)
    if target.adapter is None:
        return ModelObject(id=model, created=0, owned_by=SERVICE_OWNER)
    return ModelObject(id=model, created=epoch(target.adapter.created_at) or 0, owned_by=owner)
