"""The HTTP client of one vLLM OpenAI server: its base model, the adapters this api process
loaded into it (least recently used first, at most `max_loras` idle ones), and streamed
completions. app/inference/vllm.py generates through it."""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.errors import InvalidRequest, TuneserveError
from app.observability.metrics import InferenceMetrics

logger = logging.getLogger(__name__)

# Short: GET /adapters asks each vLLM server which adapters it holds.
LISTING_TIMEOUT_SECONDS = 3.0
CONNECT_TIMEOUT_SECONDS = 10.0


class VllmUnavailable(TuneserveError):
    status_code = 503
    code = "vllm_unavailable"


class VllmFailed(TuneserveError):
    """The vLLM server answered, but not as expected (a bug or a misconfiguration there)."""

    status_code = 502
    code = "vllm_error"


class AdapterNotServable(InvalidRequest):
    code = "adapter_not_loadable"


class AdapterGone(Exception):
    """vLLM does not know the model a completion asked for (its adapter was unloaded)."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


@dataclass(frozen=True)
class ServedModel:
    name: str  # the base model's name at the vLLM server
    context_length: int  # its max_model_len


@dataclass(frozen=True)
class Completion:
    """What to ask vLLM for: prompt token ids and sampling, for its model or an adapter."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str] | None
    seed: int | None

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": self.prompt_ids,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.stop:
            body["stop"] = self.stop
        if self.seed is not None:
            body["seed"] = self.seed
        return body


def error_message(response: httpx.Response) -> str:
    """vLLM's own words for a failed call ({"error": {"message"}}), else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or f"HTTP {response.status_code}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or body["error"])
    return str(body)[:500]


class VllmServer:
    """One vLLM OpenAI server: its base model, the adapters this process loaded into it (least
    recently used first), and streamed completions."""

    def __init__(
        self, url: str, *, max_loras: int, timeout: float, metrics: InferenceMetrics
    ) -> None:
        self.url = url
        self.max_loras = max_loras
        self.metrics = metrics
        self.client = httpx.Client(
            base_url=url,
            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_SECONDS),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
        )
        self._lock = threading.Lock()  # guards the fields below (never held over HTTP)
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._busy: Counter[str] = Counter()  # generations in flight per adapter
        self._loading: dict[str, threading.Lock] = {}
        self._served: dict[str | None, ServedModel] = {}

    # --- calls ------------------------------------------------------------------------------

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.client.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise self.unavailable(error) from error

    def unavailable(self, error: Exception) -> VllmUnavailable:
        return VllmUnavailable(
            f"The vLLM server at {self.url} does not answer ({type(error).__name__}: {error}). "
            "Start it (scripts/vllm_server.sh) or fix vllm_url in the models file.",
            detail={"vllm_url": self.url},
        )

    def models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """GET /v1/models: the base model(s), then every adapter loaded (with a `parent`)."""
        extra = {"timeout": timeout} if timeout is not None else {}
        response = self.call("GET", "/v1/models", **extra)
        if response.status_code != 200:
            raise VllmFailed(f"vLLM at {self.url}: GET /v1/models: {error_message(response)}")
        return list(response.json().get("data") or [])

    def served_model(self, wanted: str | None) -> ServedModel:
        """The base model the server serves: `wanted` (vllm_model), or its only one."""
        with self._lock:
            if wanted in self._served:
                return self._served[wanted]
        bases = {
            str(entry["id"]): int(entry.get("max_model_len") or 0)
            for entry in self.models()
            if entry.get("parent") is None
        }
        name = wanted if wanted is not None else next(iter(bases), None)
        if name not in bases or (wanted is None and len(bases) > 1):
            raise VllmFailed(
                f"vLLM at {self.url} serves {', '.join(sorted(bases)) or 'no model'}: set "
                "vllm_model in the models file to the one to use.",
                detail={"vllm_url": self.url, "served": sorted(bases)},
            )
        served = ServedModel(name, bases[name])
        with self._lock:
            self._served[wanted] = served
        return served

    def loaded_adapters(self) -> set[str]:
        """The adapters loaded in the server now (whoever loaded them)."""
        models = self.models(timeout=LISTING_TIMEOUT_SECONDS)
        return {str(entry["id"]) for entry in models if entry.get("parent") is not None}

    def open_stream(self, completion: Completion) -> httpx.Response:
        """POST /v1/completions, streamed; the response is open and its status is 200."""
        request = self.client.build_request("POST", "/v1/completions", json=completion.payload())
        try:
            response = self.client.send(request, stream=True)
        except httpx.HTTPError as error:
            raise self.unavailable(error) from error
        if response.status_code == 200:
            return response
        try:
            response.read()
        finally:
            response.close()
        message = error_message(response)
        if response.status_code == 404:
            raise AdapterGone(completion.model)
        if response.status_code == 400:
            raise InvalidRequest(f"The vLLM server refused the request: {message}")
        raise VllmFailed(f"vLLM at {self.url} answered {response.status_code}: {message}")

    # --- adapters -----------------------------------------------------------------------------

    def acquire(self, key: str, directory: Callable[[], Path]) -> None:
        """Make sure vLLM holds the adapter (load it from `directory()` if this process has
        not), and count a generation in flight with it until `release`."""
        with self._lock:
            if key in self._recent:
                self._recent.move_to_end(key)
                self._busy[key] += 1
                return
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per adapter at a time; the others wait for it
            with self._lock:
                known = key in self._recent
            if not known:
                self.load(key, directory())
            with self._lock:
                self._recent[key] = None
                self._recent.move_to_end(key)
                self._busy[key] += 1
                self._loading.pop(key, None)
        self.evict()

    def release(self, key: str) -> None:
        """A generation with the adapter ended; unload what is beyond max_loras and now idle."""
        with self._lock:
            self._busy[key] -= 1
            if self._busy[key] <= 0:
                del self._busy[key]
            over = len(self._recent) > self.max_loras
        if over:
            self.evict()

    def forget(self, key: str) -> None:
        """This process's record of the adapter is stale (vLLM restarted, or another api process
        unloaded it): the next request loads it again."""
        with self._lock:
            self._recent.pop(key, None)

    def loaded_here(self) -> list[str]:
        with self._lock:
            return list(self._recent)

    def evict(self) -> None:
        """Unload the least recently used idle adapters beyond max_loras (busy ones stay: vLLM
        holds them as long as they generate, and they go on a later call)."""
        with self._lock:
            idle = [key for key in self._recent if not self._busy[key]]
            doomed = idle[: max(0, len(self._recent) - self.max_loras)]
            for key in doomed:
                del self._recent[key]
        for key in doomed:
            logger.info("unloading adapter %s from vLLM at %s (least recently used)", key, self.url)
            self.unload(key)

    def load(self, key: str, directory: Path) -> None:
        body = {"lora_name": key, "lora_path": str(directory)}
        response = self.call("POST", "/v1/load_lora_adapter", json=body)
        message = error_message(response) if response.status_code != 200 else ""
        if response.status_code == 200 or "already been loaded" in message:
            logger.info("loaded adapter %s into vLLM at %s from %s", key, self.url, directory)
            self.metrics.vllm_adapter_loads.inc()
            return
        if response.status_code == 404:
            raise VllmFailed(
                f"vLLM at {self.url} cannot read adapter {key} at {directory}: the vLLM server "
                f"must see the artifact store at the same path as the api ({message}).",
                code="vllm_adapter_not_found",
            )
        raise AdapterNotServable(f"vLLM at {self.url} cannot load adapter {key}: {message}")

    def unload(self, key: str) -> bool:
        """Unload the adapter; False when the server did not hold it. Errors are logged: a
        failed unload leaves an idle adapter in the server, nothing worse."""
        try:
            response = self.call("POST", "/v1/unload_lora_adapter", json={"lora_name": key})
        except VllmUnavailable as error:
            logger.warning("could not unload adapter %s: %s", key, error.message)
            return False
        if response.status_code not in (200, 404):
            logger.warning("vLLM at %s: unload %s: %s", self.url, key, error_message(response))
        if response.status_code != 200:
            return False
        self.metrics.vllm_adapter_unloads.inc()
        return True

    def close(self) -> None:
        self.client.close()
