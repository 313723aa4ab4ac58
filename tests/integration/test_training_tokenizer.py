"""A job's training takes on the tokenizer its dataset validation loaded (worker/datasets.py
keeps it on PreparedDatasets), rather than loading it a second time: what it trains with, saves
beside the adapter and hands to the evaluation is that tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.jobs.schemas import Hyperparameters, LoraSpec, TrainingHyperparameters
from tests.corpus import arithmetic_rows
from tests.fixtures.env import MODEL_CACHE
from worker.training import TrainingHooks, TrainingSpec, train_lora


def test_training_uses_the_tokenizer_it_is_given(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    location = str(MODEL_CACHE / tiny_model)
    given = AutoTokenizer.from_pretrained(location)

    def no_second_load(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the tokenizer was loaded again")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_second_load)
    hp = TrainingHyperparameters.model_validate(
        {
            **Hyperparameters().model_dump(mode="json"),
            "n_epochs": 1,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "max_seq_length": 256,
        }
    )
    handed: list[Any] = []

    def evaluate_trained(_model: Any, tokenizer: Any, _losses: Any) -> dict[str, Any]:
        handed.append(tokenizer)
        return {}

    result = train_lora(
        TrainingSpec(location, hp, LoraSpec(r=4)),
        arithmetic_rows(8),
        arithmetic_rows(12)[8:],
        tmp_path,
        TrainingHooks(evaluate_trained=evaluate_trained),
        tokenizer=given,
    )
    assert result.steps == 2
    assert handed == [given]
    assert (tmp_path / "adapter" / "tokenizer_config.json").is_file()
