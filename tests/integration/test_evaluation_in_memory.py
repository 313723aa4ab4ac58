"""The job's evaluation on the model the run has just trained (worker/training.py hands it over
in memory) scores exactly what an evaluation of the saved adapter, loaded again, scores; its
packed losses equal each row's loss computed alone; and the Trainer's own evaluation after the
last step is replaced, not repeated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from app.datasets.loss_mask import token_mask
from app.jobs.schemas import Hyperparameters, LoraSpec, TrainingHyperparameters
from tests.corpus import arithmetic_rows, person_rows
from tests.fixtures.env import MODEL_CACHE
from worker.evaluation import EvaluationTask, evaluate, evaluate_saved, row_losses, token_mean
from worker.training import ProgressUpdate, TrainingHooks, TrainingSpec, train_lora


def _loss_alone(model: Any, tokenizer: Any, record: dict[str, Any]) -> tuple[float, int]:
    ids, mask = token_mask(tokenizer, record)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1]
    pairs = zip(ids[1:], mask[1:], strict=True)
    targets = torch.tensor([token if kept else -100 for token, kept in pairs])
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return float(loss), int((targets != -100).sum())


def test_in_memory_evaluation_equals_the_saved_adapters(tiny_model: str, tmp_path: Path) -> None:
    location = str(MODEL_CACHE / tiny_model)
    hp = TrainingHyperparameters.model_validate(
        {
            **Hyperparameters().model_dump(mode="json"),
            "n_epochs": 1,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "max_seq_length": 256,
        }
    )
    train_rows = arithmetic_rows(8) + person_rows(4, seed=3)
    validation = person_rows(5, seed=4) + arithmetic_rows(12)[8:]  # 9 rows, two kinds
    task = EvaluationTask(records=validation[:6], split="validation", samples=3, bf16=False)
    seen: dict[str, Any] = {"progress": []}

    def evaluate_trained(model: Any, tokenizer: Any, losses: Any) -> dict[str, Any]:
        seen["losses"] = losses
        seen["alone"] = [_loss_alone(model, tokenizer, record) for record in validation]
        return evaluate(tokenizer, model, task, adapter_losses=losses[: len(task.records)])

    result = train_lora(
        TrainingSpec(location, hp, LoraSpec(r=8, dropout=0.0)),
        train_rows,
        validation,
        tmp_path,
        TrainingHooks(on_progress=seen["progress"].append, evaluate_trained=evaluate_trained),
    )
    in_memory = result.evaluation
    assert in_memory is not None and result.steps == 3

    # The run scored the whole validation set once, packed; each row as it scores alone.
    losses = seen["losses"]
    assert [count for _total, count in losses] == [count for _total, count in seen["alone"]]
    assert [total for total, _count in losses] == pytest.approx(
        [total for total, _count in seen["alone"]], rel=1e-4
    )
    # Its mean is the run's final eval loss, reported as the curve's last point: the Trainer's
    # own evaluation after the last step did not run as well.
    assert result.eval_loss == pytest.approx(token_mean(losses))
    evals = [update for update in seen["progress"] if update.eval_loss is not None]
    assert len(evals) == 1 and isinstance(evals[0], ProgressUpdate)
    assert evals[0].step == 3 and evals[0].eval_loss == result.eval_loss
    assert evals[0].tokens_per_second is not None  # the speed of the steps, kept

    # The saved adapter, loaded again on its base model, scores the same.
    saved = evaluate_saved(location, tmp_path / "adapter", task)
    for key in ("base_eval_loss", "adapter_eval_loss", "improvement"):
        assert in_memory[key] == pytest.approx(saved[key], rel=1e-4), key
    assert in_memory["adapter_eval_loss"] < in_memory["base_eval_loss"]
    assert in_memory["samples"] == saved["samples"] and len(saved["samples"]) == 3
    assert in_memory["rows"] == saved["rows"] == 6


def test_packed_losses_equal_each_row_alone(tiny_model: str) -> None:
    """row_losses lays rows end to end (several per forward pass, a long one alone) and
    projects only trained positions; each row's loss is the one it gets alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = MODEL_CACHE / tiny_model
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(location),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    ).eval()
    rows = arithmetic_rows(6) + person_rows(6, seed=5) + arithmetic_rows(3)
    packed = row_losses(model, tokenizer, rows, bf16=False)
    alone = [_loss_alone(model, tokenizer, row) for row in rows]
    assert [count for _total, count in packed] == [count for _total, count in alone]
    assert all(count > 0 for _total, count in packed)
    assert [total for total, _count in packed] == pytest.approx(
        [total for total, _count in alone], rel=1e-4
    )
