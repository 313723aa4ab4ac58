"""GET /models: the base models jobs can fine-tune."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import Field

from app.base_models.registry import is_available, list_base_models
from app.deps import SettingsDep
from app.schemas import ResponseModel

router = APIRouter(tags=["models"])


class BaseModelView(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    source: str
    location: str
    revision: str | None
    description: str
    default: bool
    available: bool
    serving: str = Field(
        description='The engine that generates with it: "builtin" (in the api) or "vllm".'
    )


class BaseModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[BaseModelView]


@router.get("/models", response_model=BaseModelList, summary="Base models")
def models(settings: SettingsDep) -> BaseModelList:
    return BaseModelList(
        data=[
            BaseModelView(
                id=model.name,
                source=model.source.value,
                location=model.location,
                revision=model.revision,
                description=model.description,
                default=model.name == settings.default_base_model,
                available=is_available(settings, model),
                serving=model.serving.value,
            )
            for model in list_base_models(settings)
        ]
    )
