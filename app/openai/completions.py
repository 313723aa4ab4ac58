"""/v1/chat/completions and /v1/completions over the inference engine.

`model` is a base model or a fine-tuned model name (app/inference/targets.py); generation is the
same engine call as the native POST /generate.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool

from app.db import unit_of_work
from app.deps import CurrentOwner, SettingsDep
from app.errors import InvalidRequest, openai_error_body
from app.inference.engine import (
    Generation,
    GenerationResult,
    InferenceEngine,
    StreamItem,
    TextDelta,
)
from app.inference.limits import check_max_new_tokens
from app.inference.schemas import Usage
from app.inference.streaming import stream_response
from app.inference.targets import Target, record_use, resolve_model
from app.openai.common import OpenAIRequest, unsupported
from app.settings import Settings

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])
DEFAULT_MAX_TOKENS = 256
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ContentPart(OpenAIRequest):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIRequest):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(OpenAIRequest):
    include_usage: bool = False
    # As at OpenAI, chat chunks carry random `obfuscation` padding unless this is false.
    include_obfuscation: bool = True


# Fields of OpenAI's requests that tuneserve takes only at a value that asks for nothing it does
# not do (what a client that sets every field sends), each with what to do instead.
NO_OP_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((1,), "only one choice per request (n=1) is supported"),
    "best_of": ((1,), "only one candidate per request (best_of=1) is supported"),
    "frequency_penalty": ((0,), "penalties are not supported; leave it out or at 0"),
    "presence_penalty": ((0,), "penalties are not supported; leave it out or at 0"),
    "logit_bias": (({},), "logit_bias is not supported; leave it out"),
    "logprobs": ((False, 0), "log probabilities are not returned; leave it out"),
    "top_logprobs": ((0,), "log probabilities are not returned; leave it out"),
    "echo": ((False,), "echo is not supported; prepend the prompt yourself"),
    "suffix": (("",), "suffix (insertion) is not supported"),
    "tools": (([],), "tools (function calling) are not supported"),
    "tool_choice": (("none",), 'tools are not supported; leave it out or "none"'),
    "store": ((False,), "completions are not stored; leave it out or false"),
    "modalities": ((["text"],), 'only text output; leave it out or ["text"]'),
    "service_tier": (("auto", "default"), 'one tier only; leave it out, "auto" or "default"'),
}


class SamplingRequest(OpenAIRequest):
    """The parameters chat and text completions share. Fields of OpenAI's request that are not
    here are refused by name (400 unsupported_parameter), never ignored."""

    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # 0 keeps the likeliest token only
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # End-user identifiers for abuse monitoring: written to the api's log with each completion.
    user: str | None = Field(None, max_length=256)
    n: int | None = Field(None, ge=1, le=128)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or any(not 1 <= len(s) <= 100 for s in stops)):
            raise ValueError("give up to 4 stop sequences of 1 to 100 characters")
        return stops or None

    def end_user(self) -> str | None:
        return self.user

    def check_supported(self) -> None:
        for name, (no_ops, instead) in NO_OP_VALUES.items():
            value = getattr(self, name, None)
            if value is not None and value not in no_ops:
                raise unsupported(name, f"{name}: {instead}.")


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    safety_identifier: str | None = Field(None, max_length=256)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # no tools run, so none run in parallel
    store: bool | None = None
    modalities: list[str] | None = None
    service_tier: str | None = Field(None, max_length=32)

    def end_user(self) -> str | None:
        return self.safety_identifier or self.user

    def check_supported(self) -> None:
        super().check_supported()
        if self.response_format and self.response_format.get("type") != "text":
            raise unsupported(
                "response_format", 'response_format: only {"type": "text"} is supported.'
            )
        for index, message in enumerate(self.messages):
            if message.role not in ROLES:
                raise InvalidRequest(
                    f"messages[{index}].role: {message.role!r} is not supported; use system, "
                    "developer, user or assistant.",
                    code="invalid_value",
                    detail={"field": f"messages[{index}].role"},
                )


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(min_length=1)
    best_of: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("give one prompt: a string, or a list of one string")
            value = value[0]
        if not 1 <= len(value) <= 200_000:
            raise ValueError("the prompt must be 1 to 200000 characters")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class _Choice(BaseModel):
    index: int = 0
    finish_reason: str
    logprobs: None = None


class ChatChoice(_Choice):
    message: AssistantMessage


class TextChoice(_Choice):
    text: str


class _Completion(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class ChatCompletion(_Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class TextCompletion(_Completion):
    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]


def _target(settings: Settings, owner: str, model: str) -> Target:
    with unit_of_work() as session:
        return resolve_model(session, settings, owner=owner, model=model)


def _generation(
    body: SamplingRequest,
    target: Target,
    settings: Settings,
    *,
    max_tokens: int | None,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
) -> Generation:
    body.check_supported()
    chat_limit = getattr(body, "max_completion_tokens", None)
    max_tokens_field = "max_completion_tokens" if chat_limit else "max_tokens"
    wanted = check_max_new_tokens(
        max_tokens or min(DEFAULT_MAX_TOKENS, settings.max_new_tokens_limit),
        settings,
        field=max_tokens_field,
    )
    return Generation(
        base_model=target.base_model,
        adapter_key=target.adapter_key,
        adapter_path=target.adapter_path,
        prompt=prompt,
        messages=messages,
        max_new_tokens=wanted,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stop if isinstance(body.stop, list) else None,
        seed=body.seed,
    )


def _usage(result: GenerationResult) -> Usage:
    return Usage.counted(result.prompt_tokens, result.completion_tokens)


# One event of a stream: `data: <chunk as JSON>`, and last `data: [DONE]`.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {"type": "string", "contentMediaType": "application/json"},
            ]
        }
    },
}


def _streamed(what: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": f"The {what}; with `stream: true`, server-sent events in OpenAI's "
            "chunk format, ending with `data: [DONE]`.",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        }
    }


def _stream_error(message: str) -> str:
    return json.dumps(openai_error_body(500, "internal_error", message))


OBFUSCATION_BLOCK = 64


def _padding(chunk: dict[str, Any]) -> str:
    """Random characters that round the chunk's size up to a whole block (and one more block
    at random), so that sizes on the wire do not tell the text: OpenAI's stream obfuscation."""
    size = len(json.dumps(chunk)) + len(', "obfuscation": ""')
    missing = -size % OBFUSCATION_BLOCK + OBFUSCATION_BLOCK * secrets.randbelow(2)
    return secrets.token_urlsafe(missing)[:missing] if missing else ""


class _Chunks:
    """Engine stream items as OpenAI chunks: chat (`delta`) or text (`text`)."""

    def __init__(self, body: SamplingRequest, kind: Literal["chat", "text"]) -> None:
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        self.kind = kind
        self.model = body.model
        self.created = int(time.time())
        options = body.stream_options or StreamOptions()
        self.include_usage = options.include_usage
        self.obfuscate = kind == "chat" and options.include_obfuscation
        self.started = False

    def _chunk(self, choice: dict[str, Any] | None, usage: Usage | None = None) -> str:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [] if choice is None else [{"index": 0, "logprobs": None, **choice}],
        }
        if usage is not None:
            chunk["usage"] = usage.model_dump()
        elif self.include_usage and self.kind == "chat":
            chunk["usage"] = None  # chat chunks carry `usage: null` until the last one
        if self.obfuscate:
            chunk["obfuscation"] = _padding(chunk)
        return json.dumps(chunk)

    def _piece(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        if self.kind == "text":
            return {"text": text, "finish_reason": finish_reason}
        return {"delta": {"content": text} if text else {}, "finish_reason": finish_reason}

    def render(self, item: StreamItem) -> list[str]:
        payloads = []
        if self.kind == "chat" and not self.started:
            role = {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            payloads.append(self._chunk(role))
        self.started = True
        if isinstance(item, TextDelta):
            return [*payloads, self._chunk(self._piece(item.text))]
        payloads.append(self._chunk(self._piece("", item.finish_reason.value)))
        if self.include_usage:
            payloads.append(self._chunk(None, _usage(item)))
        return payloads


async def _answer(
    request: Request, body: SamplingRequest, generation: Generation, kind: Literal["chat", "text"]
) -> GenerationResult | StreamingResponse:
    """The whole generation, or (`stream: true`) its chunks as server-sent events."""
    engine: InferenceEngine = request.app.state.engine
    if body.end_user() is not None:
        logger.info("%s completion with %s for end user %r", kind, body.model, body.end_user())
    await run_in_threadpool(record_use, generation.adapter_key)
    if body.stream:
        chunks = _Chunks(body, kind)
        return await stream_response(engine, generation, chunks.render, _stream_error)
    return await run_in_threadpool(engine.generate, generation)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    summary="Chat completion",
    responses=_streamed("chat completion"),
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, owner: CurrentOwner, settings: SettingsDep
) -> ChatCompletion | StreamingResponse:
    target = await run_in_threadpool(_target, settings, owner, body.model)
    generation = _generation(
        body,
        target,
        settings,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        messages=[{"role": ROLES[m.role], "content": m.text()} for m in body.messages],
    )
    result = await _answer(request, body, generation, "chat")
    if isinstance(result, StreamingResponse):
        return result
    return ChatCompletion(
        id=f"chatcmpl-{secrets.token_hex(12)}",
        created=int(time.time()),
        model=body.model,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=result.text),
                finish_reason=result.finish_reason.value,
            )
        ],
        usage=_usage(result),
    )


@router.post(
    "/completions",
    response_model=TextCompletion,
    summary="Text completion",
    responses=_streamed("text completion"),
)
async def completions(
    body: CompletionRequest, request: Request, owner: CurrentOwner, settings: SettingsDep
) -> TextCompletion | StreamingResponse:
    target = await run_in_threadpool(_target, settings, owner, body.model)
    generation = _generation(body, target, settings, max_tokens=body.max_tokens, prompt=body.text())
    result = await _answer(request, body, generation, "text")
    if isinstance(result, StreamingResponse):
        return result
    return TextCompletion(
        id=f"cmpl-{secrets.token_hex(12)}",
        created=int(time.time()),
        model=body.model,
        choices=[TextChoice(text=result.text, finish_reason=result.finish_reason.value)],
        usage=_usage(result),
    )
