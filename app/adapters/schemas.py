"""Response models of the adapters API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from app.schemas import ResponseModel


class AdapterView(ResponseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    base_model: str
    job_id: str | None
    sha256: str
    size_bytes: int
    rank: int
    created_at: datetime


class AdapterList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[AdapterView]
    has_more: bool
