"""How much memory a LoRA job needs at its peak, whether that fits its device, and what to change
when it does not.

Peak memory (bytes) = weights + LoRA and optimizer + activations + LM head (`logits`) + runtime
(+ the gathered layers, under FSDP):

| part                 | formula                                                          |
| -------------------- | ---------------------------------------------------------------- |
| weights              | params x 4 (fp32) x 2 on CPU workers; params x 2 (bf16) on GPUs  |
|   quantized (QLoRA)  | linear params x 0.516 (4bit) or x 1 (8bit) + the rest x 4 (fp32)  |
|                      | + params x 4 on CPU workers                                       |
|   sharded (FSDP, N)  | the above / N                                                    |
| gathered layers      | FSDP only: 2 decoder layers whole, held as the weights are        |
| LoRA and optimizer   | LoRA params x 4 bytes x 4 (weights, gradients, Adam m and v); / N |
|                      | sharded                                                          |
| activations          | batch x seq x hidden x layers x 16 x 4                            |
|   checkpointed       | batch x seq x hidden x (layers + 16) x 4                          |
| LM head              | min(batch x seq, 4096) x min(vocab, 32768) x 4 x tiles:           |
|                      | 8 tiles on CPU workers, 3 on GPUs                                |
| runtime              | 1 GiB (PyTorch, the process, kernels, allocator slack)           |

`batch` is min(batch_size, rows); `seq` is min(max_seq_length, the longest row in tokens): a
batch is padded to its longest row, and the longest row lands in some batch.

The constants are measured (peak RSS of a fresh process training one batch on the CPU; README.md,
"The memory estimate", has the numbers): 16 fp32 values of `hidden` per token and layer are
what SmolLM2-135M kept for the backward pass (LoRA on every linear layer, SDPA
attention, no gradient checkpointing). The logits are never whole: TRL's fused LM head (which
worker/training.py trains through) projects 4096 tokens x 32768 vocabulary entries at a time in
fp32; on the CPU its torch fallback keeps about 8 such tiles alive (measured: 1.07 MB a token on
a 49 152-word vocabulary, flat past 4096 tokens), on GPUs its Triton kernel folds a tile in
place (3 assumed, not measured here). On CPU workers the part of the peak that does not grow
with tokens held about twice the fp32 weights (most likely the checkpoint, still mapped), hence x 2.
On GPUs the frozen base model loads in bf16 (worker/training.py, where it trains in bf16): 2
bytes a weight. GPU estimates are the same formula without those CPU measurements: treat them as
the order of magnitude (activations are counted in fp32 there too, which bf16 autocast halves in
part: docs/bigger-models.md compares them with published figures).

Quantization (bitsandbytes, `quantization` on a job) stores the base model's linear layers (the LM
head and embeddings excepted) in 4 bits (NF4: half a byte, plus an 8-bit scale per block of 64
weights and, with double quantization, an fp32 scale per 256 blocks: 0.516 byte a weight) or in 8
bits (1 byte; its per-row scales are negligible); the rest (embeddings, LM head, norms) is fp32, as
PEFT's k-bit recipe casts it. On a CPU worker the loader reads the whole fp32 checkpoint to quantize
it, and those pages stay counted (measured: the peak kept about params x 4 beside the quantized
weights), so on the CPU quantization saves little; on a GPU only the quantized weights live in
device memory.

Activation checkpointing keeps only each decoder layer's input (one value per hidden unit and
token) and recomputes one layer's activations at a time in the backward pass: layers + 16
values instead of layers x 16 (SmolLM2-135M: 46 instead of 480), for about a third more compute.
The plan turns it on only for a job that does not fit without it (`checkpointing_needed`).

FSDP over N devices (`shards`) keeps 1/N of the frozen weights and of the LoRA weights, their
gradients and optimizer state on each device, and gathers the whole parameters of a decoder layer
while it computes: the current layer and the prefetched next one are counted whole. Activations
and the LM head stay per device, as each device trains its own rows. The plan shards a job only
when it does not fit one device even with activation checkpointing but fits sharded
(`choose_distributed`); never on CPU workers, whose ranks share one machine's memory.

A job fits when the estimate is at most 90% of the device's memory (GPU memory of one device, or
the machine's RAM for CPU workers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from app.base_models.facts import ModelFacts

FP32 = 4
BF16 = 2
# Bytes an unquantized weight of the frozen base model takes: fp32 on CPU workers, bf16 on GPUs.
WEIGHT_WIDTH = {"cpu": FP32}  # rocm, cuda: BF16
ACTIVATION_VALUES_PER_HIDDEN = 16
LM_HEAD_TOKEN_TILE = 4096
LM_HEAD_VOCAB_TILE = 32768
LM_HEAD_TILES = {"cpu": 8}  # rocm, cuda: LM_HEAD_TILES_GPU
LM_HEAD_TILES_GPU = 3
WEIGHT_COPIES = {"cpu": 2}  # rocm, cuda: 1
OPTIMIZER_COPIES = 4
# Bytes a weight of a quantized linear layer takes (see the module docstring).
QUANTIZED_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}
# FSDP: decoder layers whole on a device at once (the one computing, the one prefetched).
GATHERED_LAYERS = 2
FSDP: Literal["fsdp"] = "fsdp"
RUNTIME_BYTES = 1 << 30
USABLE_SHARE = 0.9
GIB = 1 << 30


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    lora_and_optimizer: int
    activations: int
    logits: int
    runtime: int
    batch: int
    seq: int
    gathered_layers: int = 0  # FSDP: the decoder layers gathered whole

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gathered_layers
            + self.lora_and_optimizer
            + self.activations
            + self.logits
            + self.runtime
        )


def _held(params: int, linear: int, *, width: int, quantization: str | None) -> int:
    """Bytes of `params` weights, `linear` of them in linear layers, as a device holds them:
    `width` bytes each, or the linear ones quantized."""
    if quantization is None:
        return params * width
    # PEFT's k-bit recipe (prepare_model_for_kbit_training) casts the unquantized rest to fp32.
    return int(linear * QUANTIZED_BYTES[quantization]) + (params - linear) * FP32


def weight_bytes(facts: ModelFacts, *, accelerator: str, quantization: str | None) -> int:
    """The base model's weights on one device, as loaded (fp32 on CPU workers, bf16 on GPUs) or
    quantized."""
    width = WEIGHT_WIDTH.get(accelerator, BF16)
    held = _held(facts.params, facts.linear_params, width=width, quantization=quantization)
    if WEIGHT_COPIES.get(accelerator, 1) == 1:
        return held
    # CPU: the fp32 checkpoint stays counted beside the weights (see the module docstring).
    return held + facts.params * FP32


def gathered_bytes(facts: ModelFacts, *, accelerator: str, quantization: str | None) -> int:
    """FSDP: the decoder layers a device holds whole at once, as their weights are held."""
    layer = _held(
        facts.layer_params,
        facts.layer_linear_params,
        width=WEIGHT_WIDTH.get(accelerator, BF16),
        quantization=quantization,
    )
    return GATHERED_LAYERS * layer


def estimate_memory(
    facts: ModelFacts,
    *,
    batch: int,
    seq: int,
    lora_r: int,
    target_modules: str | list[str],
    accelerator: str = "cpu",
    sequences_per_row: int = 1,
    quantization: str | None = None,
    checkpointing: bool = False,
    shards: int = 1,
) -> MemoryEstimate:
    """The peak of a job on one device of the accelerator class (rocm, cuda or cpu), with its
    base model quantized ("4bit", "8bit") or not, activation checkpointing on or off, and its
    weights sharded over `shards` devices (FSDP) or whole on each (1)."""
    tokens = batch * seq * sequences_per_row
    values = (
        facts.layers + ACTIVATION_VALUES_PER_HIDDEN
        if checkpointing
        else facts.layers * ACTIVATION_VALUES_PER_HIDDEN
    )
    weights = weight_bytes(facts, accelerator=accelerator, quantization=quantization)
    lora = facts.lora_params(lora_r, target_modules) * FP32 * OPTIMIZER_COPIES
    gathered = (
        gathered_bytes(facts, accelerator=accelerator, quantization=quantization)
        if shards > 1
        else 0
    )
    return MemoryEstimate(
        weights=-(-weights // shards),  # a device's share, rounded up
        lora_and_optimizer=-(-lora // shards),
        activations=tokens * facts.hidden_size * values * FP32,
        logits=min(tokens, LM_HEAD_TOKEN_TILE)
        * min(facts.vocab_size, LM_HEAD_VOCAB_TILE)
        * FP32
        * LM_HEAD_TILES.get(accelerator, LM_HEAD_TILES_GPU),
        runtime=RUNTIME_BYTES,
        batch=batch,
        seq=seq,
        gathered_layers=gathered,
    )


def usable(device_bytes: int) -> int:
    return int(device_bytes * USABLE_SHARE)


def fits(estimate: MemoryEstimate, device_bytes: int) -> bool:
    return estimate.total <= usable(device_bytes)


def batch_fits(
    facts: ModelFacts,
    lora: dict[str, Any],
    *,
    rows: int,
    seq: int,
    device_bytes: int | None,
    accelerator: str = "cpu",
    sequences_per_row: int = 1,
    quantization: str | None = None,
    checkpointing: bool = False,
    shards: int = 1,
) -> Callable[[int], bool]:
    """Whether a batch_size fits the device (always, when its memory is unknown)."""

    def check(batch_size: int) -> bool:
        if device_bytes is None:
            return True
        estimate = estimate_memory(
            facts,
            batch=min(batch_size, rows),
            seq=seq,
            lora_r=int(lora["r"]),
            target_modules=lora["target_modules"],
            accelerator=accelerator,
            sequences_per_row=sequences_per_row,
            quantization=quantization,
            checkpointing=checkpointing,
            shards=shards,
        )
        return fits(estimate, device_bytes)

    return check


def checkpointing_needed(
    facts: ModelFacts,
    lora: dict[str, Any],
    *,
    batch: int,
    seq: int,
    device_bytes: int | None,
    accelerator: str = "cpu",
    sequences_per_row: int = 1,
    quantization: str | None = None,
    shards: int = 1,
) -> bool:
    """Whether the job must recompute activations to fit: it does not fit without (never when
    the device's memory is unknown). Checkpointing costs time, so only such jobs pay it."""
    fitting = batch_fits(
        facts,
        lora,
        rows=batch,
        seq=seq,
        device_bytes=device_bytes,
        accelerator=accelerator,
        sequences_per_row=sequences_per_row,
        quantization=quantization,
        shards=shards,
    )
    return not fitting(batch)


def choose_distributed(
    facts: ModelFacts,
    lora: dict[str, Any],
    *,
    batch: int,
    seq: int,
    device_bytes: int | None,
    shards: int,
    accelerator: str = "cpu",
    sequences_per_row: int = 1,
    quantization: str | None = None,
) -> Literal["fsdp"] | None:
    """ "fsdp" when the job needs its base model sharded over the `shards` devices it trains on:
    it does not fit one device even with activation checkpointing, and fits sharded (with
    checkpointing, which the plan then turns on if need be). None otherwise: it fits one device
    (each rank holds the whole model), or it fits neither way, or there is nothing to decide
    from (memory unknown, fewer than 2 devices), or the workers are CPUs (their ranks share
    one machine's memory: sharding does not make a job fit there), or the adapter is AdaLoRA
    (which does not train sharded)."""
    if device_bytes is None or shards < 2 or accelerator == "cpu":
        return None
    if lora.get("type") == "adalora":
        return None

    def fitting(over: int) -> bool:
        return batch_fits(
            facts,
            lora,
            rows=batch,
            seq=seq,
            device_bytes=device_bytes,
            accelerator=accelerator,
            sequences_per_row=sequences_per_row,
            quantization=quantization,
            checkpointing=True,
            shards=over,
        )(batch)

    return FSDP if not fitting(1) and fitting(shards) else None


def _dividing(effective: int, largest: int) -> int:
    """The largest batch <= `largest` that divides the effective batch exactly, when one is at
    least half of `largest`; else `largest` (the accumulation then rounds up)."""
    for batch in range(largest, max(1, largest // 2) - 1, -1):
        if effective % batch == 0:
            return batch
    return largest


@dataclass(frozen=True)
class Suggestion:
    message: str
    hyperparameters: dict[str, Any] | None  # the changes to make, None when none would do


def suggest(
    facts: ModelFacts,
    device_bytes: int,
    *,
    hyperparameters: dict[str, Any],
    lora: dict[str, Any],
    seq: int,
    p99_row_tokens: int,
    rows_over_p99: int,
    accelerator: str = "cpu",
    sequences_per_row: int = 1,
    quantization: str | None = None,
    checkpointing: bool = False,
    shards: int = 1,
    fsdp_devices: int = 1,
) -> Suggestion:
    """A change that fits, for a job that does not (with activation checkpointing when
    `checkpointing`, sharded over `shards` devices): a smaller batch with more accumulation (the
    same effective batch), else also a max_seq_length at the 99th percentile of row lengths,
    else a 4-bit base model, or FSDP over the node's `fsdp_devices`, or both."""
    batch = int(hyperparameters["batch_size"])
    effective = batch * int(hyperparameters["gradient_accumulation_steps"])

    def estimate(
        rows: int, at_seq: int, quantized: str | None = quantization, over: int = shards
    ) -> MemoryEstimate:
        return estimate_memory(
            facts,
            batch=rows,
            seq=at_seq,
            lora_r=int(lora["r"]),
            target_modules=lora["target_modules"],
            accelerator=accelerator,
            sequences_per_row=sequences_per_row,
            quantization=quantized,
            checkpointing=checkpointing,
            shards=over,
        )

    def fitting(at_seq: int, largest: int) -> int | None:
        for smaller in range(largest, 0, -1):
            if fits(estimate(smaller, at_seq), device_bytes):
                return smaller
        return None

    smaller = fitting(seq, batch - 1)
    if smaller is not None:
        smaller = _dividing(effective, smaller)
        accumulation = math.ceil(effective / smaller)
        rows = smaller * accumulation
        same = "the same" if rows == effective else f"{rows} rows, about the"
        return Suggestion(
            f"Lower hyperparameters.batch_size to {smaller} and raise "
            f"gradient_accumulation_steps to {accumulation} ({same} {effective} rows per "
            "optimizer step).",
            {"batch_size": smaller, "gradient_accumulation_steps": accumulation},
        )
    if p99_row_tokens < seq and fits(estimate(1, p99_row_tokens), device_bytes):
        chosen = fitting(p99_row_tokens, batch) or 1
        changes: dict[str, Any] = {
            "batch_size": chosen,
            "gradient_accumulation_steps": math.ceil(effective / chosen),
            "max_seq_length": max(16, p99_row_tokens),
        }
        return Suggestion(
            f"Lower hyperparameters.max_seq_length to {changes['max_seq_length']} (the 99th "
            f"percentile of row lengths; shorten or remove the {rows_over_p99} longer rows), "
            f"batch_size to {chosen} and set gradient_accumulation_steps to "
            f"{changes['gradient_accumulation_steps']}.",
            changes,
        )
    one = estimate(1, seq)
    can_quantize = quantization != "4bit"
    can_shard = shards == 1 and fsdp_devices > 1
    quantize = can_quantize and fits(estimate(1, seq, "4bit"), device_bytes)
    shard = can_shard and fits(estimate(1, seq, over=fsdp_devices), device_bytes)
    both = (
        can_quantize
        and can_shard
        and not (quantize or shard)
        and fits(estimate(1, seq, "4bit", fsdp_devices), device_bytes)
    )
    return Suggestion(
        f"Even one row of {seq} tokens needs about {one.total / GIB:.1f} GiB, more than the "
        f"{usable(device_bytes) / GIB:.1f} GiB usable on this device: use a device with more "
        f"memory (`accelerator`), a smaller base model, or shorter rows."
        f"{_levers(quantize=quantize, shard=shard, both=both, devices=fsdp_devices)}",
        None,
    )


def _levers(*, quantize: bool, shard: bool, both: bool, devices: int) -> str:
    """The sentences of suggest() that name the levers one row fits with."""
    sharded = (
        f'"distributed": "fsdp" (the base model sharded over {devices} devices: a node of '
        f"{devices} GPUs, workers with TUNESERVE_TRAINING_PROCESSES={devices} or 0)"
    )
    if both:
        return f' Or set "quantization": "4bit" and {sharded}: one row fits then.'
    sentences = []
    if quantize:
        sentences.append(' Or set "quantization": "4bit" (QLoRA): one row fits then.')
    if shard:
        sentences.append(f" Or set {sharded}: one row fits then.")
    return "".join(sentences)
