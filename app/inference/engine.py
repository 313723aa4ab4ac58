"""One engine per api process: each base model loaded once, adapters cached (LRU) on top of it.

The lock: generation runs off the event loop and one at a time per engine. PEFT switches the
active adapter on the shared model, so two generations must not interleave: `stream` takes the
engine lock, prepares the request (loads the model, encodes, checks the context length,
activates the adapter; a bad request raises here, with the lock released again) and hands the
lock to the `GenerationStream` it returns, which releases it once it is exhausted or closed and
its generation thread has stopped. Loading models and adapters happens under the same lock.

Streaming: `model.generate` runs in a background thread that feeds a `TextIteratorStreamer`;
the stream turns its text into `TextDelta` pieces, holding back whatever could still become a
stop sequence (`StopScanner`), and ends with one `GenerationResult`. A StoppingCriteria asked
after every token ends the thread at the token that completes a stop sequence, and within a
token of `close()` or the caller's `cancelled` event. `generate` is `stream` drained: one code
path, so streamed pieces always add up to the text `generate` answers.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from app.base_models.loading import load_causal_lm, load_tokenizer
from app.base_models.registry import BaseModel
from app.errors import InvalidRequest
from app.inference.schemas import FinishReason
from app.settings import Settings
from app.storage import artifact_store

logger = logging.getLogger(__name__)
BASE_MODELS_KEPT = 2
# How long the consumer waits on the streamer before it checks that the generation thread is
# still alive (a thread that died without ending the streamer must not block it forever).
STREAMER_POLL_SECONDS = 0.2


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


@dataclass(frozen=True)
class TextDelta:
    """The next piece of a streamed generation's text."""

    text: str


StreamItem = TextDelta | GenerationResult


@dataclass
class LoadedModel:
    model: Any  # a transformers model, wrapped in a PeftModel once an adapter is loaded
    tokenizer: Any
    adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)  # key -> path, LRU order
    context_length: int = 2048


@dataclass(frozen=True)
class _Prepared:
    """A request checked and ready to run: its model (adapter active) and encoded prompt."""

    request: Generation
    loaded: LoadedModel
    encoded: Any
    prompt_tokens: int


def trim_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """Cut text before the earliest stop sequence; True when one was found."""
    cuts = [text.find(stop) for stop in stops or [] if stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopScanner:
    """Stop sequences in text that arrives in pieces (pure: no model, no threads).

    `feed` answers the part of the text so far that is safe to emit: everything before the first
    stop sequence to complete (then `stopped` is True and the rest is dropped), less the tail that
    could still be the start of one, which is held back until the next piece settles it. `flush`
    answers that tail once the text has ended. The emitted text does not depend on how the text
    was cut into pieces.
    """

    def __init__(self, stops: Sequence[str] | None) -> None:
        self._stops = [stop for stop in stops or [] if stop]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buffer = self._held + text
        cut = _first_stop(buffer, self._stops)
        if cut is not None:
            self.stopped, self._held = True, ""
            return buffer[:cut]
        keep = _open_stop_length(buffer, self._stops)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the stop sequence that completes first in text starts (the longest on a tie)."""
    found = [(at + len(stop), at) for stop in stops if (at := text.find(stop)) >= 0]
    return min(found)[1] if found else None


def _open_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of text's longest tail that is the start (not all) of some stop sequence."""
    longest = min(len(text), max((len(stop) - 1 for stop in stops), default=0))
    for size in range(longest, 0, -1):
        if any(stop.startswith(text[-size:]) for stop in stops):
            return size
    return 0


class InferenceEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def generate(self, request: Generation) -> GenerationResult:
        """The whole generation at once: `stream` drained (validation errors raise as there)."""
        with self.stream(request) as stream:
            for item in stream:
                if isinstance(item, GenerationResult):
                    return item
        raise RuntimeError("the generation ended without a result")

    def stream(
        self, request: Generation, cancelled: threading.Event | None = None
    ) -> GenerationStream:
        """Prepare the request, then stream it: iterate the answer for `TextDelta` pieces, then
        one `GenerationResult` (all text, finish_reason, token counts).

        Waits for the engine lock and keeps it until the stream is exhausted or closed (use it
        as a context manager). Bad requests (empty prompt, prompt plus max_new_tokens over the
        context, an adapter without safetensors) raise here, before anything is streamed.
        Setting `cancelled`, or closing the stream, stops the generation within a token; a
        cancelled stream ends without a `GenerationResult`. An error in the generation thread
        is raised to the consumer.
        """
        self._lock.acquire()
        try:
            prepared = self._prepare(request)
        except BaseException:
            self._lock.release()
            raise
        return GenerationStream(prepared, cancelled, release=self._lock.release)

    def _prepare(self, request: Generation) -> _Prepared:
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
                detail={"prompt_tokens": prompt_tokens, "context_length": loaded.context_length},
            )
        self._activate(loaded, request.adapter_key, request.adapter_path)
        return _Prepared(request, loaded, encoded, prompt_tokens)

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


class GenerationStream(Iterator[StreamItem]):
    """One prepared generation, streamed: `TextDelta` pieces, then one `GenerationResult`.

    Holds the engine lock until it is exhausted or closed; `close()` (also on leaving a `with`
    block, or when the stream is collected unclosed) stops the generation thread within a token,
    waits for it and releases the lock. `close()` may come from another thread while a `next()`
    waits for text: it stops the generation first, so that wait ends within a token.
    """

    def __init__(
        self,
        prepared: _Prepared,
        cancelled: threading.Event | None,
        release: Callable[[], None],
    ) -> None:
        self._closed = False
        self._release = release
        self._guard = threading.Lock()  # one next() or close() at a time
        self._cancelled = cancelled or threading.Event()
        self._closing = threading.Event()
        self._items = _streamed(prepared, self._cancelled, self._closing)

    def __next__(self) -> StreamItem:
        with self._guard:
            if self._closed:
                raise StopIteration
            try:
                return next(self._items)
            except BaseException:  # the end (StopIteration) or an error: clean up either way
                self._close()
                raise

    def close(self) -> None:
        self._closing.set()  # before the guard: a next() waiting for text returns within a token
        with self._guard:
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._items.close()  # stops and joins the generation thread, if it started
        finally:
            self._release()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_items"):  # a stream nobody closed must not keep the engine locked
            self.close()


def _streamed(
    prepared: _Prepared, cancelled: threading.Event, closing: threading.Event
) -> Generator[StreamItem, None, None]:
    """Run the generation thread and turn its streamer's text into stream items."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(
        prepared.loaded.tokenizer,
        skip_prompt=True,
        timeout=STREAMER_POLL_SECONDS,
        skip_special_tokens=True,
    )
    stop_found = threading.Event()
    worker = _GenerationThread(prepared, streamer, halt=(cancelled, closing, stop_found))
    worker.start()
    scanner, emitted, ended = StopScanner(prepared.request.stop), [], False
    try:
        for piece in _pieces(streamer, worker):
            if text := scanner.feed(piece):
                emitted.append(text)
                yield TextDelta(text)
            if scanner.stopped:
                stop_found.set()
                break
        worker.join()
        if worker.error is not None:
            ended = True
            raise worker.error
        if cancelled.is_set() or closing.is_set():
            return
        if tail := scanner.flush():
            emitted.append(tail)
            yield TextDelta(tail)
        ended = True
        yield _result(prepared, worker, "".join(emitted), stopped=scanner.stopped)
    finally:
        closing.set()
        worker.join()
        if not ended:  # closed, or cancelled
            logger.info("generation cancelled after %d tokens", worker.completion_tokens)


def _pieces(streamer: Any, worker: threading.Thread) -> Iterator[str]:
    """The streamer's text as it comes, until it ends or the generation thread is gone."""
    while True:
        alive = worker.is_alive()  # looked at first: whatever a dead thread put is queued
        try:
            piece: str = next(streamer)
        except StopIteration:
            return
        except queue.Empty:
            if alive:
                continue
            return  # the thread ended without ending the streamer (it failed)
        yield piece


def _result(
    prepared: _Prepared, worker: _GenerationThread, text: str, *, stopped: bool
) -> GenerationResult:
    new_tokens = worker.new_tokens
    ended_by_eos = len(new_tokens) > 0 and new_tokens[-1] in _eos_ids(prepared.loaded)
    finish = (
        FinishReason.STOP
        if stopped or ended_by_eos or len(new_tokens) < prepared.request.max_new_tokens
        else FinishReason.LENGTH
    )
    return GenerationResult(
        text=text,
        finish_reason=finish,
        prompt_tokens=prepared.prompt_tokens,
        completion_tokens=len(new_tokens),
    )


class _GenerationThread(threading.Thread):
    """`model.generate` for one prepared request, feeding `streamer`; stops after the token
    during which any of the `halt` events is set. Keeps the new token ids, or the error."""

    def __init__(self, prepared: _Prepared, streamer: Any, halt: Sequence[threading.Event]) -> None:
        super().__init__(name="tuneserve-generate", daemon=True)
        self._prepared = prepared
        self._streamer = streamer
        self._halt = halt
        self.new_tokens: list[int] = []
        self.error: BaseException | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.new_tokens)

    def run(self) -> None:
        try:
            self.new_tokens = self._generate()
        except Exception as error:  # handed to the consumer, which raises it
            logger.debug("generation failed", exc_info=True)
            self.error = error

    def _generate(self) -> list[int]:
        import torch
        from peft import PeftModel

        request, loaded = self._prepared.request, self._prepared.loaded
        if request.seed is not None:
            torch.manual_seed(request.seed)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p}
            if request.temperature > 0
            else {"do_sample": False}
        )
        no_adapter = request.adapter_key is None and isinstance(loaded.model, PeftModel)
        with torch.inference_mode(), _adapters_off(loaded.model, no_adapter):
            output = loaded.model.generate(
                **self._prepared.encoded,
                max_new_tokens=request.max_new_tokens,
                pad_token_id=loaded.tokenizer.pad_token_id,
                streamer=self._streamer,
                stopping_criteria=_stopping_criteria(self._prepared, self._halt),
                **sampling,
            )
        return [int(token) for token in output[0][self._prepared.prompt_tokens :].tolist()]


def _stopping_criteria(prepared: _Prepared, halt: Sequence[threading.Event]) -> Any:
    """transformers StoppingCriteria, asked after every token: stop once any `halt` event is set
    or the new text holds a stop sequence. The text is decoded here, in the generation thread,
    so a stop sequence ends the generation at the token that completes it (the same token count
    every time), and only generated text counts (not a stop sequence that a prompt's end starts).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    tokenizer, stops = prepared.loaded.tokenizer, prepared.request.stop or []

    class Halt(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:  # noqa: ARG002
            done = any(event.is_set() for event in halt) or _has_stop(input_ids[0])
            return torch.full(
                (input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device
            )

    def _has_stop(ids: Any) -> bool:
        if not stops:
            return False
        text = tokenizer.decode(ids[prepared.prompt_tokens :].tolist(), skip_special_tokens=True)
        return any(stop in text for stop in stops)

    return StoppingCriteriaList([Halt()])


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
