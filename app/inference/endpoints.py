"""POST /generate: text from a base model or one of its adapters."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from app.adapters.repository import resolve_adapter
from app.base_models.registry import get_base_model
from app.db import unit_of_work
from app.deps import CurrentOwner, SettingsDep
from app.errors import InvalidRequest
from app.inference.engine import Generation, InferenceEngine
from app.inference.schemas import GenerateRequest, GenerateResponse, Usage

router = APIRouter(tags=["inference"])


@router.post("/generate", response_model=GenerateResponse, summary="Generate text")
async def generate(
    body: GenerateRequest, request: Request, owner: CurrentOwner, settings: SettingsDep
) -> GenerateResponse:
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
    engine: InferenceEngine = request.app.state.engine
    result = await run_in_threadpool(
        engine.generate,
        Generation(
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
        ),
    )
    return GenerateResponse(
        text=result.text,
        finish_reason=result.finish_reason,
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
        adapter=adapter_key,
        base_model=base_model.name,
    )
