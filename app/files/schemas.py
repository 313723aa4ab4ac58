"""Response models of the files API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from app.schemas import ResponseModel


class FileView(ResponseModel):
    id: str
    object: Literal["file"] = "file"
    filename: str
    bytes: int
    sha256: str
    purpose: str
    created_at: datetime


class FileList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[FileView]
    has_more: bool


class FileDeleted(ResponseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: Literal[True] = True
