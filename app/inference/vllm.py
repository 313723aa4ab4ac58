"""Generation through a vLLM OpenAI server, for base models with `serving = "vllm"`.

tuneserve keeps its API, keys, owners and adapter registry; the vLLM server (started with
`--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, see scripts/vllm_server.sh) decodes.
The api renders and tokenizes the prompt itself, with the base model's tokenizer and chat
template as the built-in engine does, and sends the token ids to vLLM's /v1/completions: the
prompt, its token count and the context check are the same whichever engine answers.

An adapter is loaded into vLLM on the first request that needs it (POST /v1/load_lora_adapter,
named by its id, from its directory: the artifact store's own directory when the store is local,
else a copy downloaded into DATA_DIR/artifact-cache; the vLLM server must see it at the same
path). Each server keeps the TUNESERVE_VLLM_MAX_LORAS adapters this process used last; beyond,
the least recently used idle one is unloaded (POST /v1/unload_lora_adapter). A deleted adapter is
unloaded at once. vLLM's answer is always streamed and read piece by piece (`VllmStream`);
`generate` drains it, as the built-in engine's does.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from app.base_models.loading import load_tokenizer
from app.base_models.registry import BaseModel, Serving, list_base_models
from app.errors import InvalidRequest, NotFound, TuneserveError
from app.inference.generation import (
    ClosingStream,
    Generation,
    GenerationResult,
    StreamItem,
    TextDelta,
    check_prompt,
    encode_prompt,
)
from app.inference.schemas import FinishReason
from app.inference.vllm_server import (
    AdapterGone,
    AdapterNotServable,
    Completion,
    VllmFailed,
    VllmServer,
    VllmUnavailable,
)
from app.observability.metrics import InferenceMetrics
from app.settings import Settings
from app.storage import artifact_store

logger = logging.getLogger(__name__)

__all__ = ["VllmEngine", "VllmFailed", "VllmStream", "VllmUnavailable"]


class VllmStream(ClosingStream):
    """One completion's pieces as the engine's stream items: `TextDelta`s, then one
    `GenerationResult`. `close()` (from any thread, or leaving a `with` block) drops the
    connection, and vLLM aborts the request; a closed stream ends without a result."""

    def __init__(
        self,
        response: httpx.Response,
        *,
        prompt_tokens: int,
        cancelled: threading.Event,
        on_result: Callable[[GenerationResult], None],
        on_close: Callable[[], None],
    ) -> None:
        self._response = response
        self._lines = response.iter_lines()
        self._prompt_tokens = prompt_tokens
        self._cancelled = cancelled
        self._on_result = on_result
        self._on_close = on_close
        self._pieces: list[str] = []
        self._finish: str | None = None
        self._completion_tokens = 0
        self._done = False
        self._closing = threading.Lock()
        self._closed = False

    def __next__(self) -> StreamItem:
        while not self._done:
            if self._cancelled.is_set():
                self.close()
                break
            try:
                line = next(self._lines)
            except (StopIteration, httpx.HTTPError, httpx.StreamError) as error:
                if self._done:
                    break  # closed from another thread meanwhile
                self.close()
                raise VllmUnavailable(
                    f"The vLLM server's stream broke off before its end ({error!r})."
                ) from None
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                self.close()
                result = GenerationResult(
                    text="".join(self._pieces),
                    finish_reason=_finish_reason(self._finish),
                    prompt_tokens=self._prompt_tokens,
                    completion_tokens=self._completion_tokens,
                )
                self._on_result(result)
                return result
            piece = self._read_chunk(json.loads(data))
            if piece:
                self._pieces.append(piece)
                return TextDelta(piece)
        raise StopIteration

    def _read_chunk(self, chunk: dict[str, Any]) -> str:
        if "error" in chunk:
            self.close()
            raise VllmFailed(f"The vLLM server failed mid-generation: {chunk['error']}")
        if chunk.get("usage"):
            self._completion_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        piece = ""
        for choice in chunk.get("choices") or []:
            piece += choice.get("text") or ""
            if choice.get("finish_reason"):
                self._finish = str(choice["finish_reason"])
        return piece

    def close(self) -> None:
        self._done = True
        with self._closing:
            if self._closed:
                return
            self._closed = True
        try:
            self._response.close()
        finally:
            self._on_close()

    def __del__(self) -> None:
        if hasattr(self, "_closing"):  # a stream nobody closed must not keep vLLM decoding
            self.close()


def _finish_reason(reason: str | None) -> FinishReason:
    if reason == "length":
        return FinishReason.LENGTH
    if reason in ("stop", None):
        return FinishReason.STOP
    raise VllmFailed(f"The vLLM server ended the generation with finish_reason {reason!r}.")


def check_generative(directory: Path, key: str) -> None:
    """Refuse a reward model (it scores, it does not generate) before vLLM loads it."""
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterNotServable(f"Adapter {key}: unreadable adapter_config.json ({exc}).") from exc
    if isinstance(config, dict) and config.get("task_type") == "SEQ_CLS":
        raise InvalidRequest(
            f"Adapter {key} is a reward model: it scores answers, it does not generate text. "
            "Generate with an adapter trained by method supervised, dpo or orpo.",
            code="adapter_not_generative",
        )


class VllmEngine:
    """Generation for the base models served by vLLM: one client per server, the tokenizer of
    each such base model, and the adapters loaded into each server."""

    def __init__(self, settings: Settings, metrics: InferenceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.metrics.vllm_adapters_loaded.set_function(self.adapters_loaded_here)
        self._servers: dict[str, VllmServer] = {}
        self._tokenizers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def stream(
        self, request: Generation, cancelled: threading.Event, *, streamed: bool
    ) -> VllmStream:
        """As InferenceEngine.stream: bad requests raise here (before anything is streamed),
        then the answer streams from the vLLM server."""
        started = time.monotonic()
        base_model = request.base_model
        server = self.server(base_model)
        served = server.served_model(base_model.vllm_model)
        prompt_ids = encode_prompt(self._tokenizer(base_model), request)
        check_prompt(prompt_ids, request.max_new_tokens, served.context_length)
        key, path = request.adapter_key, request.adapter_path
        completion = Completion(
            model=key or served.name,
            prompt_ids=prompt_ids,
            max_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop,
            seed=request.seed,
        )
        if key is None or path is None:
            response = self._open(server, completion)
            release: Callable[[], None] = lambda: None  # noqa: E731
        else:
            response = self._open_with_adapter(server, completion, key, path)
            release = lambda: server.release(key)  # noqa: E731

        def observe(result: GenerationResult) -> None:
            self.metrics.observe_generation(
                adapter=key is not None,
                streamed=streamed,
                seconds=time.monotonic() - started,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
            )

        return VllmStream(
            response,
            prompt_tokens=len(prompt_ids),
            cancelled=cancelled,
            on_result=observe,
            on_close=release,
        )

    def _open(self, server: VllmServer, completion: Completion) -> httpx.Response:
        try:
            return server.open_stream(completion)
        except AdapterGone as gone:
            raise VllmFailed(
                f"vLLM at {server.url} does not serve the model {gone.model!r}: check vllm_model "
                "in the models file.",
                detail={"vllm_url": server.url},
            ) from None

    def _open_with_adapter(
        self, server: VllmServer, completion: Completion, key: str, path: str
    ) -> httpx.Response:
        """Load the adapter if needed and open the completion; when vLLM no longer holds an
        adapter this process loaded (it restarted, or another api process unloaded it), load
        it again and retry once. The adapter counts as busy until the stream closes."""
        for attempt in (1, 2):
            self._acquire(server, key, path)
            try:
                return server.open_stream(completion)
            except AdapterGone:
                server.release(key)
                server.forget(key)
                if attempt == 2:
                    raise VllmFailed(
                        f"vLLM at {server.url} lost adapter {key} right after loading it."
                    ) from None
                logger.info(
                    "vLLM at %s no longer holds adapter %s: loading it again", server.url, key
                )
            except BaseException:
                server.release(key)
                raise
        raise AssertionError("unreachable")

    def _acquire(self, server: VllmServer, key: str, path: str) -> None:
        def directory() -> Path:
            """The adapter's local directory (downloaded first from a remote store)."""
            store = artifact_store(self.settings)
            try:
                found = store.cached_dir(path, self.settings.data_dir / "artifact-cache")
            except FileNotFoundError as exc:
                raise NotFound(
                    f"Adapter {key}'s files are missing from the artifact store.",
                    code="adapter_files_missing",
                ) from exc
            check_generative(found, key)
            return found

        server.acquire(key, directory)

    def _tokenizer(self, base_model: BaseModel) -> Any:
        with self._lock:
            tokenizer = self._tokenizers.get(base_model.name)
        if tokenizer is None:
            tokenizer = load_tokenizer(self.settings, base_model)
            with self._lock:
                self._tokenizers[base_model.name] = tokenizer
        return tokenizer

    def server(self, base_model: BaseModel) -> VllmServer:
        assert base_model.vllm_url is not None, "a base model served by vLLM has a vllm_url"
        return self._server_at(base_model.vllm_url)

    def _server_at(self, url: str) -> VllmServer:
        with self._lock:
            server = self._servers.get(url)
            if server is None:
                server = VllmServer(
                    url,
                    max_loras=self.settings.vllm_max_loras,
                    timeout=self.settings.vllm_timeout_seconds,
                    metrics=self.metrics,
                )
                self._servers[url] = server
            return server

    def _configured(self) -> list[VllmServer]:
        """A server for every vllm_url of the models file."""
        urls = {
            model.vllm_url
            for model in list_base_models(self.settings)
            if model.serving is Serving.VLLM and model.vllm_url
        }
        return [self._server_at(url) for url in sorted(urls)]

    def loaded_adapter_ids(self) -> frozenset[str]:
        """Adapters loaded in the configured vLLM servers now, as each lists them (whoever
        loaded them); what this process loaded, for a server that does not answer."""
        found: set[str] = set()
        try:
            servers = self._configured()
        except TuneserveError as error:  # a broken models file: its requests say so
            logger.warning("vLLM adapters: %s", error.message)
            return frozenset()
        for server in servers:
            try:
                found |= server.loaded_adapters()
            except TuneserveError as error:
                logger.warning("vLLM adapters: %s", error.message)
                found |= set(server.loaded_here())
        return frozenset(found)

    def adapters_loaded_here(self) -> int:
        """Adapters this process has loaded into vLLM servers and not unloaded."""
        with self._lock:
            servers = list(self._servers.values())
        return sum(len(server.loaded_here()) for server in servers)

    def unload(self, base_model: BaseModel, key: str) -> None:
        """Unload a deleted adapter from its base model's vLLM server (if it holds it)."""
        server = self.server(base_model)
        server.forget(key)
        if server.unload(key):
            logger.info("unloaded deleted adapter %s from vLLM at %s", key, server.url)

    def close(self) -> None:
        with self._lock:
            servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            server.close()
