"""The bare recipe: LoRA fine-tuning with PEFT + TRL as one plain script, no service around it.

    .venv/bin/python bench/bare_recipe.py --model DIR --train train.jsonl --eval eval.jsonl \
        [--epochs 1] [--trl-defaults] --output-dir OUT --result result.json

The baseline of bench/training.py, which runs it in a process of its own: the base model in fp32,
LoRA r=16, alpha 32, dropout 0.05 on every linear layer, TRL's SFTTrainer with batch 8, lr 2e-4,
max_length 512, no packing, seed 42, on the CPU, without activation checkpointing (the strong
baseline: TRL turns it on by default, which costs a second forward pass; `--trl-defaults` keeps
TRL's default); `messages` rows (JSONL). The Trainer prints
each step's log; then it evaluates once, saves the adapter to OUT/adapter and writes its numbers
(tokens, seconds, losses) as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", required=True, help="base model directory (safetensors)")
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--trl-defaults",
        action="store_true",
        help="keep TRL's default activation checkpointing (a weaker baseline)",
    )
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    loaded = time.perf_counter()
    log(f"model loaded in {loaded - started:.1f} s; torch threads {torch.get_num_threads()}")

    config = SFTConfig(
        output_dir=str(args.output_dir / "trainer"),
        per_device_train_batch_size=8,
        num_train_epochs=args.epochs,
        learning_rate=2e-4,
        max_length=512,
        packing=False,
        bf16=False,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=42,
        include_num_input_tokens_seen="non_padding",  # counting only: what the table reports
        gradient_checkpointing=args.trl_defaults,
        disable_tqdm=True,  # the Trainer prints each step's log as a line instead of a bar
    )
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(read_jsonl(args.train)),
        eval_dataset=Dataset.from_list(read_jsonl(args.eval)),
        processing_class=tokenizer,
        peft_config=lora,
    )

    train_start = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - train_start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    log(f"trained in {train_seconds:.1f} s; evaluating")

    eval_start = time.perf_counter()
    eval_loss = float(trainer.evaluate()["eval_loss"])
    eval_seconds = time.perf_counter() - eval_start
    save_start = time.perf_counter()
    trainer.save_model(str(args.output_dir / "adapter"))
    save_seconds = time.perf_counter() - save_start
    log(f"eval loss {eval_loss:.4f}; adapter saved in {args.output_dir / 'adapter'}")

    result = {
        "tokens": int(trainer.state.num_input_tokens_seen),
        "steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 2),
        "load_seconds": round(loaded - started, 2),
        "eval_seconds": round(eval_seconds, 2),
        "save_seconds": round(save_seconds, 2),
        "train_loss_last": float(losses[-1]) if losses else None,
        "train_loss_mean": float(output.training_loss),
        "eval_loss": eval_loss,
        "torch_threads": torch.get_num_threads(),
    }
    args.result.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
