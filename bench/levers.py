"""Training levers, one against another: the worker's own training function (worker/training.py
`train_lora`) on the same rows, with one setting changed, in fresh processes, side by side.

    .venv/bin/python bench/levers.py [--lever padding_free] [--rows 128] [--repeats 2]

Each arm trains the default model (SmolLM2-135M-Instruct) on bench/training.py's chat rows (a
narrow skill, rows of 63 to 322 tokens), batch 8, lr 2e-4, LoRA r16 on every linear layer, one
epoch, bf16 autocast where the CPU runs bf16 natively (as the worker does by default). The arms
alternate (A B A B …) so that drift on a shared machine hits both. Reported per arm: training
tokens/s (rows' tokens, no padding, over the seconds from the first step to the last), the
last step's train loss and the mean, and the ratio of the lever's arm to the baseline's.

Levers:
- padding_free: padded batches (rows of similar length, padded to the longest) against
  padding-free ones (a batch's rows end to end, attention kept within each row).
- trained_positions_only: the LM head projecting every position (TRL's way off Triton
  devices) against only the positions whose next token is learned (the assistant's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from children import in_child

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LEVERS = {
    "padding_free": ({"padding_free": False}, {"padding_free": True}),
    "trained_positions_only": (
        {"trained_positions_only": False},
        {"trained_positions_only": True},
    ),
}


def train_arm(rows: list[dict[str, Any]], overrides: dict[str, Any], bf16: bool) -> dict[str, Any]:
    """One training run in this (fresh) process: tokens, seconds and losses."""
    from transformers import TrainerCallback

    from app.base_models.loading import model_location
    from app.base_models.registry import get_base_model
    from app.jobs.schemas import Hyperparameters, LoraSpec, TrainingHyperparameters
    from app.settings import get_settings
    from worker.training import TrainingSpec, train_lora

    settings = get_settings()
    location = model_location(settings, get_base_model(settings, None))
    hyperparameters = TrainingHyperparameters.model_validate(
        {
            **Hyperparameters().model_dump(mode="json"),
            "n_epochs": 1,
            "batch_size": 8,
            "learning_rate": 2e-4,
            "max_seq_length": 512,
        }
    )

    class Clock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.began = self.ended = 0.0
            self.tokens = 0
            self.losses: list[float] = []

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.began = time.perf_counter()

        def on_train_end(self, args: Any, state: Any, *_: Any, **__: Any) -> None:  # noqa: ARG002
            self.ended = time.perf_counter()
            self.tokens = int(state.num_input_tokens_seen)

        def on_log(self, *_: Any, logs: Any = None, **__: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    clock = Clock()
    spec = TrainingSpec(location, hyperparameters, LoraSpec(), bf16=bf16, **overrides)
    with tempfile.TemporaryDirectory(prefix="tuneserve-bench-levers-") as tmp:
        train_lora(spec, rows, None, Path(tmp), extra_callbacks=[clock])
    seconds = clock.ended - clock.began
    return {
        "tokens": clock.tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(clock.tokens / seconds, 1),
        "last_loss": round(clock.losses[-1], 4),
        "mean_loss": round(statistics.fmean(clock.losses), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--lever", choices=sorted(LEVERS), default="padding_free")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    from training import datasets

    from app.devices import detect_device

    bf16 = detect_device().bf16
    rows, _ = datasets(args.rows, 0)
    baseline, lever = LEVERS[args.lever]
    print(f"lever {args.lever}: {baseline} -> {lever}; {len(rows)} rows, bf16 {bf16}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "lever": []}
    for repeat in range(args.repeats):
        for arm, overrides in (("baseline", baseline), ("lever", lever)):
            result = in_child(train_arm, rows, overrides, bf16)
            runs[arm].append(result)
            print(f"  run {repeat + 1} {arm:8s} {json.dumps(result)}", flush=True)
    print("\n| run | baseline tokens/s | lever tokens/s | ratio | last loss (baseline / lever) |")
    print("| --- | --- | --- | --- | --- |")
    for repeat, (a, b) in enumerate(zip(runs["baseline"], runs["lever"], strict=True), start=1):
        ratio = b["tokens_per_second"] / a["tokens_per_second"]
        print(
            f"| {repeat} | {a['tokens_per_second']} | {b['tokens_per_second']} | "
            f"{ratio:.2f}x | {a['last_loss']} / {b['last_loss']} |"
        )
    if args.out:
        args.out.write_text(json.dumps({"lever": args.lever, "bf16": bf16, **runs}, indent=2))


if __name__ == "__main__":
    main()
