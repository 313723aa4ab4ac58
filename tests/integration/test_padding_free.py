"""Padding-free supervised batches (worker/training.py): a batch's rows laid end to end in one
sequence, each with its own positions. Attention never crosses from one row into another, and
training learns exactly what padded batches learn. Likewise the LM head projecting only the
positions whose next token is learned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from app.jobs.schemas import Hyperparameters, LoraSpec, TrainingHyperparameters
from tests.corpus import arithmetic_rows, person_rows
from tests.fixtures.env import MODEL_CACHE
from worker.training import TrainingHooks, TrainingSpec, train_lora, trained_tokens


def _lora_model(location: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(location, attn_implementation="sdpa"),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a trained adapter, not PEFT's zeros
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3
    return model.eval()


def _one_epoch_of_fours() -> TrainingHyperparameters:
    return TrainingHyperparameters.model_validate(
        {
            **Hyperparameters().model_dump(mode="json"),
            "n_epochs": 1,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "max_seq_length": 128,
        }
    )


def test_padding_free_rows_never_attend_to_each_other(tiny_model: str) -> None:
    """Each row's logits in the padding-free batch TRL's collator makes equal the row's logits
    alone; with a cache (which training turns off) they would not: the rows would leak."""
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    location = MODEL_CACHE / tiny_model
    tokenizer = AutoTokenizer.from_pretrained(location)
    by_length = {
        len(row["input_ids"]): row
        for row in trained_tokens(tokenizer, arithmetic_rows(2) + person_rows(6, seed=1))
    }
    rows = [by_length[length] for length in sorted(by_length)[:3]]  # three lengths
    batch = DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=True)(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    assert batch["input_ids"].shape[1] == sum(len(row["input_ids"]) for row in rows)

    model = _lora_model(location)
    with torch.inference_mode():
        alone = [
            model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]
            for row in rows
        ]
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        leaking = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True
        ).logits[0]
    start = 0
    for row, logits in zip(rows, alone, strict=True):
        end = start + len(row["input_ids"])
        torch.testing.assert_close(packed[start:end], logits, rtol=1e-4, atol=1e-4)
        start = end
    # The check can fail: where transformers misses the boundaries, later rows see earlier ones.
    later = len(rows[0]["input_ids"])
    assert not torch.allclose(leaking[later:], packed[later:], atol=1e-2)
    # The labels: each row's first token is never predicted from the row before it.
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, later, later + len(rows[1]["input_ids"])]
    assert all(int(batch["labels"][0, index]) == -100 for index in starts)


def test_padding_free_training_learns_what_padded_batches_learn(
    tiny_model: str, tmp_path: Path
) -> None:
    """The same rows, batches and seed, padded or padding-free: the same loss at every step and
    the same adapter, with fewer tokens computed."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    hp = _one_epoch_of_fours()
    rows = arithmetic_rows(8) + person_rows(8, seed=2)  # short and long rows in one batch

    class Shapes(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:  # noqa: ARG002
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    results = {}
    for padding_free in (False, True):
        spec = TrainingSpec(
            str(MODEL_CACHE / tiny_model),
            hp,
            LoraSpec(r=8, dropout=0.0),
            padding_free=padding_free,
        )
        seen = Shapes()
        result = train_lora(spec, rows, None, tmp_path / str(padding_free), extra_callbacks=[seen])
        weights = load_file(tmp_path / str(padding_free) / "adapter" / "adapter_model.safetensors")
        results[padding_free] = (result, seen.losses, weights)
    (padded, padded_losses, padded_weights) = results[False]
    (free, free_losses, free_weights) = results[True]
    assert free.steps == padded.steps == 4
    assert free_losses == pytest.approx(padded_losses, rel=1e-3)
    for name, tensor in free_weights.items():
        torch.testing.assert_close(tensor, padded_weights[name], rtol=1e-3, atol=1e-4)
    assert free.trained_tokens == padded.trained_tokens  # non-padding tokens: the same rows


def test_the_lm_head_on_trained_positions_only_learns_the_same(
    tiny_model: str, tmp_path: Path
) -> None:
    """Projecting the vocabulary at the learned positions only, or at every position: the same
    loss at every step and the same adapter; and the run leaves TRL as it found it."""
    from safetensors.torch import load_file
    from trl.trainer import utils as trl_utils

    original = trl_utils._use_triton
    hp = _one_epoch_of_fours()
    rows = person_rows(8, seed=6) + arithmetic_rows(4)  # long user turns, short answers
    results = {}
    for only in (False, True):
        spec = TrainingSpec(
            str(MODEL_CACHE / tiny_model),
            hp,
            LoraSpec(r=8, dropout=0.0),
            trained_positions_only=only,
        )
        losses: list[float] = []
        hooks = TrainingHooks(
            on_progress=lambda update: (
                losses.append(update.train_loss)  # noqa: B023
                if update.train_loss is not None
                else None
            )
        )
        result = train_lora(spec, rows, None, tmp_path / str(only), hooks)
        weights = load_file(tmp_path / str(only) / "adapter" / "adapter_model.safetensors")
        results[only] = (result, losses, weights)
        assert trl_utils._use_triton is original
    (every, every_losses, every_weights) = results[False]
    (only, only_losses, only_weights) = results[True]
    assert every.steps == only.steps == 3 and len(only_losses) == 3
    assert only_losses == pytest.approx(every_losses, rel=1e-4)
    for name, tensor in only_weights.items():
        torch.testing.assert_close(tensor, every_weights[name], rtol=1e-3, atol=1e-5)
