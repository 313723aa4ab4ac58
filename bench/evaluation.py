"""The job's automatic evaluation, as the worker runs it after training, against PEFT's own
forward passes: the same model, adapter and rows, in one process, arms alternating.

    .venv/bin/python bench/evaluation.py [--rows 16] [--repeats 2] [--out results.json]

The model: the default base model (SmolLM2-135M-Instruct) with a LoRA adapter (r16, alpha 32,
every linear layer) whose B is set to small random values with a fixed seed, so that it
differs from the base. The rows: bench/training.py's validation rows (chat, 63 to 322 tokens).
The work, as worker/training.py does it once training is done: the adapter's loss on every
validation row, then worker/evaluation.py `evaluate` (the base model's loss on them, and the
greedy answers of both to the first 3 prompts), bf16 autocast where the CPU runs bf16 natively.

Arms:
- peft: PEFT's own layers (the baseline; without worker/inference_layers.py, the base model's
  and the adapter's answers come from two generations);
- tuneserve: the worker's inference layers (frozen weights packed in bf16 once, plain LoRA as
  one product with the base model's rows masked, both sides' answers from one generation);
- kept: the same, with the base model's side kept from an earlier evaluation of the same rows
  (worker/base_side.py: a second job on the same validation set; filled once, untimed, before
  the runs): the base model's loss and answers are read, only the adapter's are computed.

Reported per arm and run: seconds for the adapter's loss, for the rest of the evaluation and in
all; the ratios peft / tuneserve and peft / kept; and whether the arms found the same losses and
answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


@contextlib.contextmanager
def _peft_layers(_model: Any, _bf16: bool) -> Iterator[None]:
    yield


def _model() -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.base_models.loading import model_location
    from app.base_models.registry import get_base_model
    from app.settings import get_settings

    settings = get_settings()
    location = model_location(settings, get_base_model(settings, None))
    tokenizer = AutoTokenizer.from_pretrained(location)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    return tokenizer, model.eval()


def _arm(
    tokenizer: Any,
    model: Any,
    rows: list[dict[str, Any]],
    bf16: bool,
    layers: Any,
    kept: Any = None,
) -> dict[str, Any]:
    """The evaluation as worker/training.py runs it after training, with `layers` in place of
    worker/inference_layers.py's, and the base sides kept in `kept` (a BaseSides) if any."""
    from worker import evaluation
    from worker.evaluation import EvaluationTask, evaluate, row_losses

    evaluation.inference_layers = layers  # what evaluate() enters
    task = EvaluationTask(records=rows, split="validation", samples=3, bf16=bf16, base_sides=kept)
    started = time.perf_counter()
    with layers(model, bf16):
        losses = row_losses(model, tokenizer, rows, bf16)
        scored = time.perf_counter()
        found = evaluate(tokenizer, model, task, adapter_losses=losses)
    done = time.perf_counter()
    return {
        "adapter_loss_seconds": round(scored - started, 2),
        "evaluate_seconds": round(done - scored, 2),
        "seconds": round(done - started, 2),
        "base_eval_loss": found["base_eval_loss"],
        "adapter_eval_loss": found["adapter_eval_loss"],
        "base_side_reused": found["base_side_reused"],
        "samples": found["samples"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="validation rows scored")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from training import datasets

    from app.devices import detect_device
    from worker.base_side import BaseSides
    from worker.inference_layers import inference_layers

    bf16 = detect_device().bf16  # the worker's default, TUNESERVE_BF16=auto
    tokenizer, model = _model()
    _train, rows = datasets(64, args.rows)
    print(f"{len(rows)} validation rows, bf16 autocast {bf16}", flush=True)
    kept = BaseSides(Path(tempfile.mkdtemp()) / "base")
    _arm(tokenizer, model, rows, bf16, inference_layers, kept)  # an earlier job's evaluation
    arms = {
        "peft": lambda: _arm(tokenizer, model, rows, bf16, _peft_layers),
        "tuneserve": lambda: _arm(tokenizer, model, rows, bf16, inference_layers),
        "kept": lambda: _arm(tokenizer, model, rows, bf16, inference_layers, kept),
    }
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for _ in range(args.repeats):
        for arm, run in arms.items():
            runs[arm].append(run())
            print(f"{arm}: {runs[arm][-1]['seconds']} s", flush=True)
    assert all(run["base_side_reused"] for run in runs["kept"])

    print("\n| run | peft: adapter loss / rest / all (s) | tuneserve: same (s) | kept: same (s) |")
    print("| --- | --- | --- | --- |")
    for repeat, three in enumerate(zip(*runs.values(), strict=True), start=1):
        parts = [
            f"{run['adapter_loss_seconds']} / {run['evaluate_seconds']} / {run['seconds']}"
            for run in three
        ]
        print(f"| {repeat} | {' | '.join(parts)} |")
    a, b, c = (runs[arm][0] for arm in arms)
    print(
        f"\neval loss, base: {a['base_eval_loss']} / {b['base_eval_loss']} / "
        f"{c['base_eval_loss']}; adapter: {a['adapter_eval_loss']} / {b['adapter_eval_loss']} / "
        f"{c['adapter_eval_loss']} (peft / tuneserve / kept)"
    )
    for names, one, other in (("peft and tuneserve", a, b), ("tuneserve and kept", b, c)):
        pairs = list(zip(one["samples"], other["samples"], strict=True))
        same = sum(x["adapter"] == y["adapter"] for x, y in pairs)
        base = sum(x["base"] == y["base"] for x, y in pairs)
        print(f"answers alike, {names}: adapter {same}/{len(pairs)}, base {base}/{len(pairs)}")
    for name in ("tuneserve", "kept"):
        ratios = [
            x["seconds"] / y["seconds"] for x, y in zip(runs["peft"], runs[name], strict=True)
        ]
        print(f"median ratio peft / {name}: {statistics.median(ratios):.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"bf16": bf16, **runs}, indent=2))


if __name__ == "__main__":
    main()
