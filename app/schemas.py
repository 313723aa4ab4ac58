"""Base classes shared by request and response models."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RequestModel(BaseModel):
    """Request bodies forbid unknown fields: a typo is a 422, never a silent default."""

    model_config = ConfigDict(extra="forbid")


class ResponseModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def _is_none(value: Any) -> bool:
    return value is None


def absent_if_none(description: str | None = None) -> Any:
    """An optional answer field left out, never `null`, when it has no value."""
    return Field(None, exclude_if=_is_none, description=description)
