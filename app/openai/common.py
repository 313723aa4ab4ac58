"""Shapes shared by the /v1 routes: epoch timestamps, list pages, cursors, request models."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from app.errors import InvalidRequest


class OpenAIRequest(BaseModel):
    """Request bodies refuse unknown fields, as OpenAI's API does."""

    model_config = ConfigDict(extra="forbid")


class Page(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


def page(data: list[Any], has_more: bool) -> Page:
    return Page(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


def epoch(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def unsupported(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, code="unsupported_parameter", detail={"field": param})
