"""POST /generate: text from a base model or one of its adapters, whole or streamed.

With `stream: true` the answer is server-sent events: the request is prepared (and any error
answered as JSON with its status) before the stream starts; the engine stream is read in worker
threads, and a client that goes away cancels the generation (see `_ServerSentEvents`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from app.adapters.repository import resolve_adapter
from app.base_models.registry import get_base_model
from app.db import unit_of_work
from app.deps import CurrentOwner, SettingsDep
from app.errors import InvalidRequest, error_body
from app.inference.engine import (
    Generation,
    GenerationResult,
    GenerationStream,
    InferenceEngine,
    StreamItem,
    TextDelta,
)
from app.inference.schemas import GenerateChunk, GenerateRequest, GenerateResponse, Usage
from app.settings import Settings

logger = logging.getLogger(__name__)
router = APIRouter(tags=["inference"])

STREAM_DESCRIPTION = (
    "The generation as JSON; with `stream: true`, server-sent events instead (`text/event-"
    "stream`), each `data: <JSON>` and a blank line. First "
    '`{"object": "generation.chunk", "text": "<next piece>"}` messages as the text is '
    'generated (they add up to the whole text), then one `{"object": "generation", ...}` '
    "message, the same as the JSON answer (finish_reason, usage), then `data: [DONE]`. An "
    'error after the stream started is one `data: {"error": {...}}` message (no `[DONE]`). '
    "Errors found before (unknown adapter, context length) are JSON answers with their status."
)

# One event of the stream (before Open API 3.2's itemSchema, `schema` describes each event).
SSE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "anyOf": [
                            GenerateChunk.model_json_schema(),
                            {"$ref": "#/components/schemas/GenerateResponse"},
                            {"$ref": "#/components/schemas/ErrorBody"},
                        ]
                    },
                },
            ]
        }
    },
}


@router.post(
    "/generate",
    response_model=GenerateResponse,
    summary="Generate text",
    responses={
        200: {
            "description": STREAM_DESCRIPTION,
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        }
    },
)
async def generate(
    body: GenerateRequest, request: Request, owner: CurrentOwner, settings: SettingsDep
) -> GenerateResponse | StreamingResponse:
    """Text from a base model or an adapter. `stream: true` answers server-sent events as the
    text is generated; see the 200 answer's `text/event-stream`."""
    generation = _generation(body, owner, settings)
    engine: InferenceEngine = request.app.state.engine
    if not body.stream:
        return _response(await run_in_threadpool(engine.generate, generation), generation)
    cancelled = threading.Event()
    stream = await run_in_threadpool(engine.stream, generation, cancelled)  # 4xx raise here
    events = _ServerSentEvents(stream, cancelled, generation)
    return StreamingResponse(
        events.messages(),
        media_type="text/event-stream",
        # Proxies must pass each message on as it comes, not cache or buffer the stream.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        # Also runs when the client went away while a message was being sent.
        background=BackgroundTask(events.stop),
    )


def _generation(body: GenerateRequest, owner: str, settings: Settings) -> Generation:
    """The request checked against the limits, its adapter and base model resolved."""
    if body.max_new_tokens > settings.max_new_tokens_limit:
        raise InvalidRequest(
            f"max_new_tokens: at most {settings.max_new_tokens_limit} "
            "(TUNESERVE_MAX_NEW_TOKENS_LIMIT).",
            code="max_new_tokens_too_large",
            detail={"field": "max_new_tokens"},
        )
    adapter_key = adapter_path = None
    with unit_of_work() as session:
        if body.adapter is not None:
            adapter = resolve_adapter(session, owner=owner, reference=body.adapter)
            adapter_key, adapter_path = adapter.id, adapter.path
            base_model = get_base_model(settings, adapter.base_model)
        else:
            base_model = get_base_model(settings, body.base_model)
    return Generation(
        base_model=base_model,
        adapter_key=adapter_key,
        adapter_path=adapter_path,
        prompt=body.prompt,
        messages=[m.model_dump(mode="json") for m in body.messages] if body.messages else None,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop if isinstance(body.stop, list) or body.stop is None else [body.stop],
        seed=body.seed,
    )


def _response(result: GenerationResult, generation: Generation) -> GenerateResponse:
    return GenerateResponse(
        text=result.text,
        finish_reason=result.finish_reason,
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
        adapter=generation.adapter_key,
        base_model=generation.base_model.name,
    )


class _ServerSentEvents:
    """An engine stream as server-sent events.

    Each item is read in a worker thread. When the client goes away, Starlette cancels
    `messages()` while it waits for an item: the wait is abandoned at once, `cancelled` stops the
    generation within a token, and closing the stream (shielded from the cancellation) waits for
    its thread and frees the engine for the next request. (Gone while a message was being sent,
    the response's background task, `stop()`, does the same.)

    The threads come from a limiter of the stream's own, not the default pool: requests that
    wait for the engine lock may hold all of that, and the stream holding the lock must move.
    """

    def __init__(
        self, stream: GenerationStream, cancelled: threading.Event, generation: Generation
    ) -> None:
        self._stream = stream
        self._cancelled = cancelled
        self._generation = generation
        self._threads = anyio.CapacityLimiter(3)  # a read, an abandoned read, a close

    async def messages(self) -> AsyncIterator[str]:
        try:
            while (item := await self._read()) is not None:
                yield _event(item, self._generation)
            yield "data: [DONE]\n\n"
        except Exception as error:  # the status line is sent: report the error in the stream
            logger.exception("streamed generation failed")
            message = f"Internal error ({type(error).__name__}) during generation; see logs."
            yield f"data: {json.dumps(error_body('internal_error', message))}\n\n"
        finally:
            with anyio.CancelScope(shield=True):
                await self.stop()

    async def stop(self) -> None:
        """End the generation if it still runs (within a token) and free the engine; idempotent."""
        self._cancelled.set()
        await anyio.to_thread.run_sync(self._stream.close, limiter=self._threads)

    async def _read(self) -> StreamItem | None:
        return await anyio.to_thread.run_sync(
            next, self._stream, None, abandon_on_cancel=True, limiter=self._threads
        )


def _event(item: StreamItem, generation: Generation) -> str:
    if isinstance(item, TextDelta):
        return f"data: {GenerateChunk(text=item.text).model_dump_json()}\n\n"
    return f"data: {_response(item, generation).model_dump_json()}\n\n"
