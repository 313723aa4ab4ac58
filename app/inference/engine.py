"""One engine per api process: each base model loaded once, adapters cached (LRU) on top of it.

Generation runs in worker threads (never on the event loop) and one at a time per engine: PEFT
switches the active adapter on the shared model, so two requests must not interleave.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.base_models.loading import load_causal_lm, load_tokenizer
from app.base_models.registry import BaseModel
from app.errors import InvalidRequest
from app.inference.schemas import FinishReason
from app.settings import Settings
from app.storage import artifact_store

logger = logging.getLogger(__name__)
BASE_MODELS_KEPT = 2


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


@dataclass(frozen=True)
class Generation:
    base_model: BaseModel
    adapter_key: str | None  # the adapter id, or None for the base model alone
    adapter_path: str | None  # its key in the artifact store
    prompt: str | None
    messages: list[dict[str, str]] | None
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str] | None
    seed: int | None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass
class LoadedModel:
    model: Any  # a transformers model, wrapped in a PeftModel once an adapter is loaded
    tokenizer: Any
    adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)  # key -> path, LRU order
    context_length: int = 2048


def trim_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """Cut text before the earliest stop sequence; True when one was found."""
    cuts = [text.find(stop) for stop in stops or [] if stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class InferenceEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def _loaded(self, base_model: BaseModel) -> LoadedModel:
        if base_model.name in self._models:
            self._models.move_to_end(base_model.name)
            return self._models[base_model.name]
        while len(self._models) >= BASE_MODELS_KEPT:
            evicted, _ = self._models.popitem(last=False)
            logger.info("unloaded base model %s", evicted)
        import torch

        model = load_causal_lm(self.settings, base_model)
        if torch.cuda.is_available():  # ROCm and CUDA both answer here
            model.to(torch.device("cuda"))  # type: ignore[arg-type]
        model.eval()  # type: ignore[no-untyped-call]
        tokenizer = load_tokenizer(self.settings, base_model)
        context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        loaded = LoadedModel(model=model, tokenizer=tokenizer, context_length=context)
        self._models[base_model.name] = loaded
        return loaded

    def _activate(self, loaded: LoadedModel, key: str | None, path: str | None) -> None:
        from peft import PeftModel

        if key is None or path is None:
            return
        if key in loaded.adapters:
            loaded.adapters.move_to_end(key)
        else:
            store = artifact_store(self.settings)
            path = str(store.cached_dir(path, self.settings.data_dir / "artifact-cache"))
            _require_safetensors(Path(path), key)
            if not isinstance(loaded.model, PeftModel):
                loaded.model = PeftModel.from_pretrained(loaded.model, path, adapter_name=key)
            else:
                loaded.model.load_adapter(path, adapter_name=key)
            loaded.adapters[key] = path
            logger.info("loaded adapter %s", key)
        loaded.model.set_adapter(key)
        while len(loaded.adapters) > self.settings.adapter_cache_size:
            evicted, _ = loaded.adapters.popitem(last=False)
            loaded.model.delete_adapter(evicted)
            logger.info("evicted adapter %s", evicted)

    def _encode(self, loaded: LoadedModel, request: Generation) -> Any:
        tokenizer = loaded.tokenizer
        if request.messages is not None:
            text = tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True, tokenize=False
            )
            encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        else:
            encoded = tokenizer(request.prompt, return_tensors="pt")
        return encoded.to(loaded.model.device)

    def generate(self, request: Generation) -> GenerationResult:
        import torch
        from peft import PeftModel

        with self._lock:
            loaded = self._loaded(request.base_model)
            encoded = self._encode(loaded, request)
            prompt_tokens = int(encoded["input_ids"].shape[1])
            if prompt_tokens == 0:
                raise InvalidRequest("The prompt is empty after tokenization.", code="empty_prompt")
            if prompt_tokens + request.max_new_tokens > loaded.context_length:
                raise ContextLengthExceeded(
                    f"The prompt has {prompt_tokens} tokens and max_new_tokens is "
                    f"{request.max_new_tokens}: together more than the model's context of "
                    f"{loaded.context_length} tokens. Shorten the prompt or lower max_new_tokens.",
                    detail={
                        "prompt_tokens": prompt_tokens,
                        "context_length": loaded.context_length,
                    },
                )
            self._activate(loaded, request.adapter_key, request.adapter_path)
            if request.seed is not None:
                torch.manual_seed(request.seed)
            sampling: dict[str, Any] = (
                {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p}
                if request.temperature > 0
                else {"do_sample": False}
            )
            tokenizer = loaded.tokenizer
            no_adapter = request.adapter_key is None and isinstance(loaded.model, PeftModel)
            with torch.inference_mode(), _adapters_off(loaded.model, no_adapter):
                output = loaded.model.generate(
                    **encoded,
                    max_new_tokens=request.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    stop_strings=request.stop or None,
                    tokenizer=tokenizer if request.stop else None,
                    **sampling,
                )
        new_tokens = output[0][prompt_tokens:]
        text = tokenizer.decode(new_tokens, skip_special_tokens=True)
        text, stopped_by_string = trim_at_stop(text, request.stop)
        ended_by_eos = len(new_tokens) > 0 and int(new_tokens[-1]) in _eos_ids(loaded)
        finish = (
            FinishReason.STOP
            if stopped_by_string or ended_by_eos or len(new_tokens) < request.max_new_tokens
            else FinishReason.LENGTH
        )
        return GenerationResult(
            text=text,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(new_tokens),
        )


def _require_safetensors(directory: Path, key: str) -> None:
    """PEFT falls back to a pickled adapter_model.bin (unpickling runs code) when the
    safetensors file is missing: weights load from safetensors only."""
    if not (directory / "adapter_model.safetensors").is_file():
        raise InvalidRequest(
            f"Adapter {key} has no adapter_model.safetensors; only safetensors weights are loaded.",
            code="adapter_not_safetensors",
        )


def _eos_ids(loaded: LoadedModel) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return ids


class _adapters_off:
    """`with model.disable_adapter()` when asked, a no-op otherwise."""

    def __init__(self, model: Any, active: bool) -> None:
        self._context = model.disable_adapter() if active else None

    def __enter__(self) -> None:
        if self._context is not None:
            self._context.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)
