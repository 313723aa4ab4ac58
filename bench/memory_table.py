"""What fits where: the plan's memory estimate for big base models, from their config alone.

    .venv/bin/python bench/memory_table.py [--seq 2048] [--batch 1] [--accelerator cuda] \
        [--parts llama-2-7b]

Prints Markdown: one row per base model (Llama-2-7B, Llama-3-8B, Llama-3-70B from the
config.json files under bench/configs/, with their published sizes, and the default model
SmolLM2-135M), one column per lever (LoRA r16 on every linear layer over a bf16 base, activation
checkpointing, QLoRA 4-bit, FSDP over 2 and 8 devices, FSDP with QLoRA). A cell is the
estimated peak of one device in GiB and the smallest of 24, 48, 80 and 192 GB GPUs it fits (at
most 90% of the device, as the plan counts), "none" when none does; under FSDP, a node of that
many such GPUs. Then the parts of one model's estimate (`--parts`).

The numbers come through the service's own code: app/base_models/facts.py's `_model_facts` (the
model built on the meta device from its config: no weights are read) and app/jobs/memory.py's
`estimate_memory`. docs/bigger-models.md shows the output and compares it with published figures.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from app.base_models.facts import ModelFacts, _model_facts
from app.jobs.memory import GIB, MemoryEstimate, estimate_memory, fits
from app.settings import DEFAULT_BASE_MODEL, get_settings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIGS = HERE / "configs"
# A GPU sold as "24 GB" has 24 GiB (an RTX 4090: 24 564 MiB; an A100 80GB: 81 920 MiB).
GPU_SIZES = (24, 48, 80, 192)
MODELS = (
    ("Llama-2-7B", "llama-2-7b"),
    ("Llama-3-8B", "llama-3-8b"),
    ("Llama-3-70B", "llama-3-70b"),
    ("SmolLM2-135M", DEFAULT_BASE_MODEL),
)


@dataclass(frozen=True)
class Lever:
    name: str
    quantization: str | None = None
    checkpointing: bool = False
    shards: int = 1


LEVERS = (
    Lever("LoRA"),
    Lever("+ checkpointing", checkpointing=True),
    Lever("QLoRA 4bit + ckpt", "4bit", checkpointing=True),
    Lever("FSDP ×2 + ckpt", checkpointing=True, shards=2),
    Lever("FSDP ×8 + ckpt", checkpointing=True, shards=8),
    Lever("FSDP ×2 + QLoRA 4bit + ckpt", "4bit", checkpointing=True, shards=2),
)


def config_dir(directory: str) -> Path:
    """The directory of a model's config.json: bench/configs/<directory>; for the default model
    its converted copy (the model cache, else the tests' cache) when there is one."""
    if directory == DEFAULT_BASE_MODEL:
        for cache in (get_settings().model_cache_path, REPO / ".test-cache" / "models"):
            if (cache / directory / "config.json").is_file():
                return cache / directory
    return CONFIGS / directory


def facts_of(directory: str) -> ModelFacts:
    return _model_facts(str(config_dir(directory)), None, None)


def estimate(facts: ModelFacts, lever: Lever, args: argparse.Namespace) -> MemoryEstimate:
    return estimate_memory(
        facts,
        batch=args.batch,
        seq=args.seq,
        lora_r=args.rank,
        target_modules="all-linear",
        accelerator=args.accelerator,
        quantization=lever.quantization,
        checkpointing=lever.checkpointing,
        shards=lever.shards,
    )


def smallest_fitting(peak: MemoryEstimate) -> str:
    for size in GPU_SIZES:
        if fits(peak, size * GIB):
            return f"{size} GB"
    return "none"


def cell(peak: MemoryEstimate) -> str:
    return f"{peak.total / GIB:.1f} ({smallest_fitting(peak)})"


def table(args: argparse.Namespace) -> list[str]:
    lines = [
        "| model | params | " + " | ".join(lever.name for lever in LEVERS) + " |",
        "| --- | --- |" + " --- |" * len(LEVERS),
    ]
    for name, directory in MODELS:
        facts = facts_of(directory)
        cells = [cell(estimate(facts, lever, args)) for lever in LEVERS]
        lines.append(f"| {name} | {facts.params / 1e9:.2f}B | " + " | ".join(cells) + " |")
    return lines


def parts_table(directory: str, args: argparse.Namespace) -> list[str]:
    facts = facts_of(directory)
    columns = ("weights", "gathered_layers", "lora_and_optimizer", "activations", "logits")
    lines = [
        "| lever | " + " | ".join(columns) + " | runtime | total |",
        "| --- |" + " --- |" * (len(columns) + 2),
    ]
    for lever in LEVERS:
        peak = estimate(facts, lever, args)
        values = [getattr(peak, column) for column in columns] + [peak.runtime, peak.total]
        lines.append(
            f"| {lever.name} | " + " | ".join(f"{value / GIB:.2f}" for value in values) + " |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row (default 2048)")
    parser.add_argument("--batch", type=int, default=1, help="rows per batch (default 1)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA r (default 16)")
    parser.add_argument("--accelerator", choices=("cuda", "rocm", "cpu"), default="cuda")
    parser.add_argument(
        "--parts",
        default="llama-2-7b",
        choices=[directory for _name, directory in MODELS],
        help="the model whose parts are shown (default llama-2-7b)",
    )
    args = parser.parse_args()
    print(
        f"Estimated peak of one {args.accelerator} device, GiB (the smallest device of "
        f"{', '.join(map(str, GPU_SIZES))} GB it fits), batch {args.batch} x {args.seq} tokens, "
        f"LoRA r{args.rank} on every linear layer:\n"
    )
    print("\n".join(table(args)))
    print(f"\nParts of {args.parts}, GiB:\n")
    print("\n".join(parts_table(args.parts, args)))


if __name__ == "__main__":
    main()
