"""Request and response models of the adapters API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from app.schemas import RequestModel, ResponseModel

LABEL_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"
LABEL_DESCRIPTION = (
    "Up to 40 letters, digits, '-' or '_', part of the adapter name "
    "`ft:<base>:<owner>:<name>:<adapter id>` (default `import`)."
)


class AdapterView(ResponseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    base_model: str
    job_id: str | None = Field(description="The job that trained it; null for an imported one.")
    sha256: str = Field(description="sha256 of adapter_model.safetensors.")
    size_bytes: int
    rank: int
    created_at: datetime
    loaded: bool = Field(
        False,
        description="Loaded in this api process's inference engine now (each api replica has "
        "its own).",
    )
    last_used_at: datetime | None = Field(None, description="The last generation that used it.")
    request_count: int = Field(0, description="Generations that used it.")


class AdapterList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[AdapterView]
    has_more: bool


class AdapterDeleted(ResponseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: Literal[True] = True


class AdapterImport(RequestModel):
    """Import a PEFT LoRA adapter archive from a URL."""

    url: str = Field(
        min_length=1,
        max_length=4096,
        description="An http(s):// URL of a .zip or .tar.gz holding adapter_config.json and "
        "adapter_model.safetensors (at the root or in one top-level folder).",
    )
    base_model: str = Field(
        min_length=1, max_length=200, description="A name from GET /models the adapter fits."
    )
    name: str | None = Field(None, pattern=LABEL_PATTERN, description=LABEL_DESCRIPTION)
