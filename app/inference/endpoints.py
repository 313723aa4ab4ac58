"""POST /generate: text from a base model or one of its adapters, whole or streamed.

With `stream: true` the answer is server-sent events: the request is prepared (and any error
answered as JSON with its status) before the stream starts; app/inference/streaming.py reads
the engine stream and cancels the generation when the client goes away.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.db import unit_of_work
from app.deps import CurrentOwner, SettingsDep
from app.errors import error_body
from app.inference.engine import (
    Generation,
    GenerationResult,
    InferenceEngine,
    StreamItem,
    TextDelta,
)
from app.inference.limits import check_max_new_tokens
from app.inference.schemas import GenerateChunk, GenerateRequest, GenerateResponse, Usage
from app.inference.streaming import stream_response
from app.inference.targets import record_use, resolve_target
from app.settings import Settings

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
    generation = await run_in_threadpool(_generation, body, owner, settings)
    await run_in_threadpool(record_use, generation.adapter_key)
    engine: InferenceEngine = request.app.state.engine
    if not body.stream:
        return _response(await run_in_threadpool(engine.generate, generation), generation)

    def render(item: StreamItem) -> list[str]:
        if isinstance(item, TextDelta):
            return [GenerateChunk(text=item.text).model_dump_json()]
        return [_response(item, generation).model_dump_json()]

    def render_error(message: str) -> str:
        return json.dumps(error_body("internal_error", message))

    return await stream_response(engine, generation, render, render_error)


def _generation(body: GenerateRequest, owner: str, settings: Settings) -> Generation:
    """The request checked against the limits, its adapter and base model resolved."""
    check_max_new_tokens(body.max_new_tokens, settings, field="max_new_tokens")
    with unit_of_work() as session:
        target = resolve_target(
            session, settings, owner=owner, adapter=body.adapter, base_model=body.base_model
        )
    return Generation(
        base_model=target.base_model,
        adapter_key=target.adapter_key,
        adapter_path=target.adapter_path,
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
        usage=Usage.counted(result.prompt_tokens, result.completion_tokens),
        adapter=generation.adapter_key,
        base_model=generation.base_model.name,
    )
