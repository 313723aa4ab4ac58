"""Continuous batching: one thread per base model decodes every running request together.

Each iteration the thread (1) lets waiting requests in: their adapter gets a slot (app/inference/
lora.py; the least recently used idle adapter is evicted when none is free), their prompts are
prefilled together (left-padded, each row with its adapter, in groups of at most
`PREFILL_TOKENS`) and their key/value cache joins the batch's, left-padded to a common length;
(2) runs one decode step for every row at once, each row with its own adapter; (3) samples each
row's next token with its own parameters and streams its text; (4) drops the rows that are
done (EOS, max_new_tokens, a stop sequence, or cancelled). A long request never holds short ones,
and a new request joins at the next step.

The thread also loads the model, and it alone computes with it (adapters are read elsewhere but
made fp32 and scaled when they enter a slot). PyTorch's OpenMP threads belong to the thread that
starts a parallel operation: once a second thread (a request's, the loader's) has a team of its
own, both teams' workers outnumber the cores and sleep between operations, and every layer waits
for them to wake. Measured here: decoding at batch size one went from 29 to 55 ms a token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from app.inference.lora import NO_ADAPTER, AdapterWeights, LoraSlots, read_adapter
from app.inference.schemas import FinishReason
from app.inference.stops import StopScanner
from app.observability.metrics import InferenceMetrics

logger = logging.getLogger(__name__)

# Prompts that arrive together are prefilled in one forward pass of at most this many tokens,
# padding included (16 chat prompts of 50 tokens took 1.2 s one by one here).
PREFILL_TOKENS = 4096
FINISHED = object()  # put on a request's queue when it ends without a result (cancelled)


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Request:
    """One generation inside the batcher; its results go to `out`."""

    prompt_ids: list[int]
    adapter_key: str | None
    adapter_weights: AdapterWeights | None  # read by the caller unless already in a slot
    adapter_dir: Any  # Callable[[], Path]: where to read it again if it was evicted meanwhile
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str] | None
    seed: int | None
    cancelled: threading.Event
    out: queue.Queue[Any] = field(default_factory=queue.Queue)


@dataclass
class _Row:
    request: Request
    slot: int
    generator: torch.Generator | None
    scanner: StopScanner
    tokens: list[int] = field(default_factory=list)
    shown: str = ""  # decoded text emitted so far (before stop scanning)
    text: str = ""  # text streamed so far
    position: int = 0  # position id of the next input token
    next_token: int = 0


class Batcher:
    """The decode loop of one base model (see the module docstring)."""

    def __init__(
        self,
        load: Callable[[], tuple[Any, Any]],
        adapter_slots: int,
        name: str,
        metrics: InferenceMetrics,
        *,
        merge_single_adapter: bool = True,
    ) -> None:
        """Start the thread, which calls `load()` for the model and its tokenizer; returns once
        they are loaded, and raises what `load` raised."""
        self.metrics = metrics  # adapter cache hits, misses and evictions
        self.recent: OrderedDict[str, None] = OrderedDict()  # adapters in slots, LRU first
        self.inbox: queue.Queue[Request] = queue.Queue()
        self.waiting: list[Request] = []
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self._stopping = threading.Event()
        loaded: queue.Queue[BaseException | None] = queue.Queue()

        def run() -> None:
            try:
                self.model, self.tokenizer = load()
                self.slots = LoraSlots(self.model, adapter_slots, merge=merge_single_adapter)
                self.eos = _eos_ids(self.model, self.tokenizer)
            except BaseException as error:  # handed to the caller
                loaded.put(error)
                return
            loaded.put(None)
            self._loop()

        self.thread = threading.Thread(target=run, name=f"batcher-{name}", daemon=True)
        self.thread.start()
        error = loaded.get()
        if error is not None:
            raise error

    # --- what other threads call -----------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Join the batch at the next step; the answer comes on `request.out`."""
        self.inbox.put(request)

    def holds_adapter(self, key: str) -> bool:
        return key in self.slots.slot_of

    def check_adapter(self, weights: AdapterWeights) -> None:
        """Raise (400) when the adapter does not fit this model's slots."""
        self.slots.check(weights)

    def resident_adapters(self) -> list[str]:
        return list(self.slots.slot_of)

    def is_idle(self) -> bool:
        return not self.rows and not self.waiting and self.inbox.empty()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        """End the thread after its current step (the model is being unloaded)."""
        self._stopping.set()

    def join(self, timeout: float = 10) -> None:
        self.thread.join(timeout=timeout)

    # --- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._admit(block=not self.rows and not self.waiting)
                if self.rows:
                    with torch.inference_mode():
                        self._step()
                elif self.waiting:
                    time.sleep(0.01)  # every slot is busy with running rows
            except Exception as error:  # a broken step fails its rows, not the thread
                logger.exception("batch step failed")
                for row in self.rows:
                    row.request.out.put(error)
                self.rows, self.cache, self.mask = [], None, None

    def _admit(self, *, block: bool) -> None:
        try:
            while True:
                request = self.inbox.get(block=block, timeout=0.5 if block else None)
                self.waiting.append(request)
                block = False
        except queue.Empty:
            pass
        still_waiting = []
        admitted: list[tuple[Request, int]] = []
        for request in self.waiting:
            if request.cancelled.is_set():
                request.out.put(FINISHED)
                continue
            slot = self._slot_for(request, admitted)
            if slot is None:
                still_waiting.append(request)
                continue
            admitted.append((request, slot))
        self.waiting = still_waiting
        for group in _prefill_groups(admitted):
            try:
                with torch.inference_mode():
                    self._prefill(group)
            except Exception as error:
                logger.exception("prefill failed")
                for request, _ in group:
                    request.out.put(error)

    def _slot_for(self, request: Request, admitted: list[tuple[Request, int]]) -> int | None:
        key = request.adapter_key
        if key is None:
            return NO_ADAPTER
        if key in self.slots.slot_of:
            self.recent.move_to_end(key)
            self.metrics.adapter_cache_hits.inc()
            return self.slots.slot_of[key]
        slot = self.slots.free_slot()
        if slot is None:
            busy = {row.request.adapter_key for row in self.rows}
            busy |= {admitted_request.adapter_key for admitted_request, _ in admitted}
            idle = next((k for k in self.recent if k not in busy), None)
            if idle is None:
                return None
            self.slots.remove(idle)
            del self.recent[idle]
            self.metrics.adapter_cache_evictions.inc()
            logger.info("evicted adapter %s", idle)
            slot = self.slots.free_slot()
            assert slot is not None
        weights = request.adapter_weights or read_adapter(request.adapter_dir(), key)
        request.adapter_weights = None  # in a slot now: the copy is not needed any more
        self.slots.install(weights, slot)
        self.recent[key] = None
        self.metrics.adapter_cache_misses.inc()
        logger.info("loaded adapter %s into slot %d", key, slot)
        return slot

    # --- prefill, decode, sample ---------------------------------------------------------------

    def _prefill(self, group: list[tuple[Request, int]]) -> None:
        """Prefill the prompts of `group` together, left-padded to the longest (each row with
        its own adapter), and let the rows that go on join the batch."""
        from app.inference.kv_cache import decoding_cache  # transformers: imported when used

        width = max(len(request.prompt_ids) for request, _ in group)
        ids = [[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r, _ in group]
        mask = torch.tensor(
            [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r, _ in group]
        )
        device = self.model.device
        cache = decoding_cache()
        self.slots.batch([slot for _, slot in group])
        output = self.model(
            input_ids=torch.tensor(ids, device=device),
            attention_mask=mask.to(device),
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,  # the prompt's last position only: the LM head is the widest layer
        )
        rows, going_on = [], []
        for index, (request, slot) in enumerate(group):
            generator = None
            if request.seed is not None:
                generator = torch.Generator().manual_seed(request.seed)
            row = _Row(request, slot, generator, StopScanner(request.stop))
            # The last prompt token's position: `_take` moves it on to the first new token's.
            row.position = len(request.prompt_ids) - 1
            if self._take(row, output.logits[index, -1]):
                rows.append(row)
                going_on.append(index)
        if rows:
            self._join(rows, cache, mask, going_on)

    def _join(self, rows: list[_Row], cache: Any, mask: torch.Tensor, keep: list[int]) -> None:
        """Add prefilled rows to the batch: row `keep[i]` of `cache` and `mask` is `rows[i]`."""
        if len(keep) < mask.shape[0]:
            index = torch.tensor(keep)
            for layer in cache.layers:
                layer.keys = layer.keys[index.to(layer.keys.device)]
                layer.values = layer.values[index.to(layer.values.device)]
            mask = mask[index]
        if self.cache is None or self.mask is None:
            self.cache, self.mask, self.rows = cache, mask, rows
            return
        width = max(mask.shape[1], self.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat(
                [_pad_left(mine.values, width), _pad_left(theirs.values, width)]
            )
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.rows.extend(rows)

    def _step(self) -> None:
        assert self.mask is not None
        self.slots.batch([row.slot for row in self.rows])
        device = self.model.device
        ids = torch.tensor([[row.next_token] for row in self.rows], device=device)
        positions = torch.tensor([[row.position] for row in self.rows], device=device)
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], 1)
        output = self.model(
            input_ids=ids,
            attention_mask=self.mask.to(device),
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
        )
        keep = [i for i, row in enumerate(self.rows) if self._take(row, output.logits[i, -1])]
        if len(keep) < len(self.rows):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        assert self.mask is not None
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep)
        mask = self.mask[index]
        first = int((mask.sum(0) > 0).nonzero()[0])  # drop columns that are padding in every row
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, first:]
            layer.values = layer.values[index.to(layer.values.device), :, first:]
        self.mask = mask[:, first:]
        self.rows = [self.rows[i] for i in keep]

    def _take(self, row: _Row, logits: torch.Tensor) -> bool:
        """Sample the row's next token and stream its text; False once the row is done."""
        request = row.request
        if request.cancelled.is_set():
            logger.info("generation cancelled after %d tokens", len(row.tokens))
            request.out.put(FINISHED)
            return False
        token = _sample(logits, request.temperature, request.top_p, row.generator)
        finish = None
        if token in self.eos:
            finish = FinishReason.STOP
        else:
            row.tokens.append(token)
            self._stream_text(row)
            if row.scanner.stopped:
                finish = FinishReason.STOP
            elif len(row.tokens) >= request.max_new_tokens:
                finish = FinishReason.LENGTH
        if finish is None:
            row.next_token, row.position = token, row.position + 1
            return True
        self._finish(row, finish, extra=1 if token in self.eos else 0)
        return False

    def _stream_text(self, row: _Row) -> None:
        decoded = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if decoded.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return
        piece = row.scanner.feed(decoded[len(row.shown) :])
        row.shown = decoded
        if piece:
            row.text += piece
            row.request.out.put(Delta(piece))

    def _finish(self, row: _Row, reason: FinishReason, extra: int) -> None:
        if not row.scanner.stopped:
            decoded = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            tail = row.scanner.feed(decoded[len(row.shown) :]) + row.scanner.flush()
            if row.scanner.stopped:
                reason = FinishReason.STOP
            if tail:
                row.text += tail
                row.request.out.put(Delta(tail))
        row.request.out.put(
            Done(
                text=row.text,
                finish_reason=reason,
                prompt_tokens=len(row.request.prompt_ids),
                completion_tokens=len(row.tokens) + extra,
            )
        )


def _prefill_groups(admitted: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
    """The admitted requests in arrival order, cut into groups whose padded prompts hold at
    most `PREFILL_TOKENS` tokens (a single longer prompt is a group of its own)."""
    groups: list[list[tuple[Request, int]]] = []
    width = 0
    for request, slot in admitted:
        length = len(request.prompt_ids)
        if groups and max(width, length) * (len(groups[-1]) + 1) <= PREFILL_TOKENS:
            groups[-1].append((request, slot))
            width = max(width, length)
        else:
            groups.append([(request, slot)])
            width = length
    return groups


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the sequence dimension (-2 for keys/values, -1 for masks) on the left."""
    if tensor.dim() == 2:
        missing = width - tensor.shape[1]
        return torch.nn.functional.pad(tensor, (missing, 0)) if missing else tensor
    missing = width - tensor.shape[-2]
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0)) if missing else tensor


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, -1) - sorted_probs > top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
