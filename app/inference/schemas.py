"""Request and response models of POST /generate (and the messages of its stream)."""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import Field, StrictBool, StrictInt, field_validator, model_validator

from app.schemas import RequestModel, ResponseModel


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class Message(RequestModel):
    role: Role
    content: str = Field(..., max_length=200_000)


class GenerateRequest(RequestModel):
    adapter: str | None = Field(
        None,
        max_length=300,
        description="A job id (ftjob-…), adapter id (adapter-…) or adapter name (ft:…); null "
        "for the base model.",
    )
    base_model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Base model when adapter is null (default model).",
    )
    prompt: str | None = Field(
        None, min_length=1, max_length=200_000, description="Raw text to continue."
    )
    messages: list[Message] | None = Field(
        None, min_length=1, max_length=256, description="A chat, rendered with the chat template."
    )
    max_new_tokens: StrictInt = Field(128, ge=1, description="Most tokens to generate.")
    temperature: float = Field(0.0, ge=0, le=2, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(None, description="Up to 4 stop sequences.")
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    stream: StrictBool = Field(
        False,
        description="Answer with server-sent events (`text/event-stream`) as the text is "
        "generated: `generation.chunk` messages, then the `generation`, then `[DONE]`.",
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None:
            if not 1 <= len(stops) <= 4:
                raise ValueError("give 1 to 4 stop sequences, or leave stop out")
            if any(not 1 <= len(stop) <= 100 for stop in stops):
                raise ValueError("stop sequences are 1 to 100 characters")
        return stops

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.adapter is not None and self.base_model is not None:
            raise ValueError("give `adapter` or `base_model`, not both (an adapter has its base)")
        return self


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"


class Usage(ResponseModel):
    """Token counts of one generation (POST /generate and the /v1 completions alike)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def counted(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class GenerateResponse(ResponseModel):
    object: Literal["generation"] = "generation"
    text: str
    finish_reason: FinishReason
    usage: Usage
    adapter: str | None
    base_model: str


class GenerateChunk(ResponseModel):
    """One piece of a streamed generation's text (`stream: true`)."""

    object: Literal["generation.chunk"] = "generation.chunk"
    text: str
