"""Request and response models of adapter exports."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, model_validator

from app.schemas import RequestModel, ResponseModel


class ExportFormat(enum.StrEnum):
    MERGED = "merged"
    GGUF = "gguf"


MERGED_PRECISIONS = ("bfloat16", "float16", "float32")
GGUF_PRECISIONS = ("f16", "q8_0", "f32")
DEFAULT_PRECISION = {ExportFormat.MERGED: "bfloat16", ExportFormat.GGUF: "f16"}


class CreateExport(RequestModel):
    format: ExportFormat = Field(
        description="merged: the base model with the adapter merged in, as a Hugging Face "
        "safetensors folder (a .tar); gguf: that model as one GGUF file for llama.cpp and "
        "Ollama, with its tokenizer and chat template, plus an Ollama Modelfile. (The adapter "
        "itself, PEFT's format, is GET /adapters/{id}/download.)"
    )
    precision: str | None = Field(
        None,
        description="merged: bfloat16 (default), float16 or float32; gguf: f16 (default), q8_0 "
        "(8-bit, about half the size) or f32.",
    )

    @model_validator(mode="after")
    def _precision_of_its_format(self) -> CreateExport:
        allowed = MERGED_PRECISIONS if self.format is ExportFormat.MERGED else GGUF_PRECISIONS
        if self.precision is None:
            self.precision = DEFAULT_PRECISION[self.format]
        elif self.precision not in allowed:
            raise ValueError(
                f"precision {self.precision!r} is not one of {', '.join(allowed)} for format "
                f"{self.format.value}"
            )
        return self


class ExportFile(ResponseModel):
    name: str
    bytes: int
    sha256: str
    url: str = Field(description="GET it; Range requests resume a download.")


class ExportView(ResponseModel):
    id: str
    object: Literal["adapter.export"] = "adapter.export"
    adapter_id: str
    format: ExportFormat
    precision: str
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: dict[str, Any] | None = Field(
        None, description="While it runs: stage, and tensors done of total."
    )
    files: list[ExportFile] = Field(default_factory=list)
    error: dict[str, Any] | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ExportList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ExportView]
