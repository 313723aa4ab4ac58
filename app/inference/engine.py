"""One engine per api process: each base model loaded once, its adapters in slots on top of it,
and every request for that model decoded together (app/inference/batching.py).

`stream` does everything that can fail because of the request in the caller's thread, so a bad
request raises before anything is streamed: it loads the base model (once), encodes and checks
the prompt, and reads and checks the adapter's weights unless the adapter is already in a slot
(loading happens off the batch's thread: running requests keep decoding meanwhile). The request
then joins its model's batch at the next step, and the returned `GenerationStream` hands out its
`TextDelta` pieces and one `GenerationResult`. `generate` is `stream` drained: one code path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from prometheus_client import CollectorRegistry

from app.base_models.loading import load_causal_lm, load_tokenizer
from app.base_models.registry import BaseModel, Serving, get_base_model
from app.errors import TuneserveError
from app.inference.batching import FINISHED, Batcher, Delta, Done, Request
from app.inference.generation import (
    ClosingStream,
    ContextLengthExceeded,
    Generation,
    GenerationResult,
    StreamItem,
    TextDelta,
    check_prompt,
    encode_prompt,
)
from app.inference.lora import read_adapter
from app.inference.packed import can_pack, pack_linears
from app.inference.stops import StopScanner
from app.inference.vllm import VllmEngine
from app.observability.metrics import InferenceMetrics
from app.settings import Settings
from app.storage import artifact_store

__all__ = [
    "ContextLengthExceeded",
    "Generation",
    "GenerationResult",
    "GenerationStream",
    "InferenceEngine",
    "StopScanner",
    "StreamItem",
    "TextDelta",
    "TextStream",
]

logger = logging.getLogger(__name__)
BASE_MODELS_KEPT = 2
# How long a reader waits for the next piece before it checks the batch thread is still alive.
POLL_SECONDS = 0.2


class TextStream(Protocol):
    """One generation's answer, whichever engine makes it: `StreamItem`s, and `close()` (from
    any thread) to cancel it."""

    def __iter__(self) -> Iterator[StreamItem]: ...
    def __next__(self) -> StreamItem: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    batcher: Batcher
    context_length: int
    dtype: str


class InferenceEngine:
    def __init__(self, settings: Settings, metrics: InferenceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or InferenceMetrics(CollectorRegistry())  # counted, not served
        self.metrics.adapter_cache_slots_used.set_function(self.adapter_slots_used)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._loading = threading.Lock()
        # Base models with serving = "vllm" generate there instead (app/inference/vllm.py).
        self.vllm = VllmEngine(settings, self.metrics)

    def close(self) -> None:
        """Stop every batch thread (the api is shutting down)."""
        for loaded in list(self._models.values()):
            loaded.batcher.stop()
        for loaded in list(self._models.values()):
            loaded.batcher.join(timeout=10)
        self.vllm.close()

    def loaded_adapter_ids(self) -> frozenset[str]:
        """The adapters in a slot of this process (any base model), and those loaded in the
        vLLM servers of vllm base models, right now."""
        builtin = frozenset(
            key
            for loaded in list(self._models.values())
            for key in loaded.batcher.resident_adapters()
        )
        return builtin | self.vllm.loaded_adapter_ids()

    def adapter_deleted(self, adapter_id: str, base_model: str) -> None:
        """An adapter is gone: unload it from its vLLM server (the built-in engine's slots let
        it go as the least recently used)."""
        try:
            model = get_base_model(self.settings, base_model)
        except TuneserveError:
            return  # its base model left the models file
        if model.serving is Serving.VLLM:
            self.vllm.unload(model, adapter_id)

    def adapter_slots_used(self) -> int:
        models = list(self._models.values())
        return sum(len(loaded.batcher.resident_adapters()) for loaded in models)

    def generate(self, request: Generation) -> GenerationResult:
        """The whole generation at once: `stream` drained (bad requests raise as there)."""
        with self.stream(request, streamed=False) as stream:
            for item in stream:
                if isinstance(item, GenerationResult):
                    return item
        raise RuntimeError("the generation ended without a result")

    def stream(
        self,
        request: Generation,
        cancelled: threading.Event | None = None,
        *,
        streamed: bool = True,
    ) -> TextStream:
        """Check the request and let it join its model's batch; iterate the answer for
        `TextDelta` pieces, then one `GenerationResult`.

        Bad requests (empty prompt, prompt plus max_new_tokens over the context, an adapter
        without safetensors or made for another model) raise here. Setting `cancelled`, or
        closing the stream, drops the request from the batch at the next step; a cancelled
        stream ends without a `GenerationResult`. `streamed` only labels the latency metric.
        A base model served by vLLM streams from its server instead, the same way.
        """
        if request.base_model.serving is Serving.VLLM:
            return self.vllm.stream(request, cancelled or threading.Event(), streamed=streamed)
        started = time.monotonic()
        loaded = self._loaded(request.base_model)
        prompt_ids = encode_prompt(loaded.tokenizer, request)
        check_prompt(prompt_ids, request.max_new_tokens, loaded.context_length)
        key, path = request.adapter_key, request.adapter_path
        weights = None
        if key is not None and path is not None and not loaded.batcher.holds_adapter(key):
            weights = read_adapter(self._adapter_dir(path), key)
            loaded.batcher.check_adapter(weights)
        job = Request(
            prompt_ids=prompt_ids,
            adapter_key=key,
            adapter_weights=weights,
            adapter_dir=lambda: self._adapter_dir(path or ""),
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop,
            seed=request.seed,
            cancelled=cancelled or threading.Event(),
        )
        loaded.batcher.submit(job)

        def observe(result: GenerationResult) -> None:
            self.metrics.observe_generation(
                adapter=key is not None,
                streamed=streamed,
                seconds=time.monotonic() - started,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
            )

        return GenerationStream(job, loaded.batcher.is_alive, on_result=observe)

    def _adapter_dir(self, path: str) -> Path:
        store = artifact_store(self.settings)
        return store.cached_dir(path, self.settings.data_dir / "artifact-cache")

    def _loaded(self, base_model: BaseModel) -> LoadedModel:
        with self._loading:
            if base_model.name in self._models:
                self._models.move_to_end(base_model.name)
                return self._models[base_model.name]
            idle = [name for name, loaded in self._models.items() if loaded.batcher.is_idle()]
            if len(self._models) >= BASE_MODELS_KEPT and idle:
                self._models[idle[0]].batcher.stop()
                del self._models[idle[0]]
                logger.info("unloaded base model %s", idle[0])
            loaded = self._load(base_model)
            self._models[base_model.name] = loaded
            return loaded

    def _load(self, base_model: BaseModel) -> LoadedModel:
        import torch

        dtype = inference_dtype(self.settings.inference_precision)

        def load() -> tuple[Any, Any]:  # in the batch thread (see app/inference/batching.py)
            # Loaded in its serving precision: never a second, fp32 copy in memory.
            model = load_causal_lm(self.settings, base_model, dtype=getattr(torch, dtype))
            if torch.cuda.is_available():  # ROCm and CUDA both answer here
                model.to(torch.device("cuda"))  # type: ignore[arg-type]
            model.eval()  # type: ignore[no-untyped-call]
            if can_pack(model.device, model.dtype):
                pack_linears(model)  # on a CPU: weights in oneDNN's layout, once
            return model, load_tokenizer(self.settings, base_model)

        batcher = Batcher(
            load,
            self.settings.adapter_cache_size,
            base_model.name,
            self.metrics,
            merge_single_adapter=self.settings.merge_single_adapter,
        )
        model, tokenizer = batcher.model, batcher.tokenizer
        context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        logger.info("loaded base model %s (%s)", base_model.name, dtype)
        return LoadedModel(model, tokenizer, batcher, context, dtype)


def inference_dtype(precision: str) -> str:
    """ "bfloat16" or "float32": bf16 where the device runs it natively (auto), or as set."""
    from app.devices import detect_device

    if precision != "auto":
        return "bfloat16" if precision == "bf16" else "float32"
    return "bfloat16" if detect_device().bf16 else "float32"


class GenerationStream(ClosingStream):
    """One request's answer: `TextDelta` pieces as they are decoded, then a `GenerationResult`.

    `close()` (also on leaving a `with` block, or when the stream is collected unclosed) cancels
    the request: the batch drops it at its next step. It may come from another thread while a
    `next()` waits.
    """

    def __init__(
        self,
        request: Request,
        worker_alive: Callable[[], bool],
        on_result: Callable[[GenerationResult], None] | None = None,
    ) -> None:
        self._request = request
        self._worker_alive = worker_alive
        self._on_result = on_result
        self._done = False

    def __next__(self) -> StreamItem:
        while not self._done:
            try:
                item = self._request.out.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self._worker_alive():
                    self._done = True
                    raise RuntimeError("the generation thread stopped") from None
                continue
            if isinstance(item, Delta):
                return TextDelta(item.text)
            self._done = True
            if isinstance(item, Done):
                result = GenerationResult(
                    text=item.text,
                    finish_reason=item.finish_reason,
                    prompt_tokens=item.prompt_tokens,
                    completion_tokens=item.completion_tokens,
                )
                if self._on_result is not None:
                    self._on_result(result)
                return result
            if isinstance(item, BaseException):
                raise item
            assert item is FINISHED
        raise StopIteration

    def close(self) -> None:
        self._request.cancelled.set()
        self._done = True

    def __del__(self) -> None:
        if hasattr(self, "_request"):  # a stream nobody closed must not keep decoding
            self._request.cancelled.set()
