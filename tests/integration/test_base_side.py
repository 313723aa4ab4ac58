"""The base model's side of an evaluation (worker/base_side.py) is computed once per base model
and rows: a second evaluation of the same rows reuses its loss, answers and preference accuracy
and finds the same evaluation; other rows, or changed base weights, compute it again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.corpus import arithmetic_rows, person_rows
from tests.fixtures.env import MODEL_CACHE
from worker.base_side import BaseSide, BaseSides, base_model_identity
from worker.evaluation import EvaluationTask, evaluate


def _model(location: Path) -> tuple[Any, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(location),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    )
    return tokenizer, model.eval()


def _pairs() -> list[dict[str, Any]]:
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {a} plus {a}?"}],
            "chosen": [{"role": "assistant", "content": f'{{"sum": {2 * a}}}'}],
            "rejected": [{"role": "assistant", "content": f"It is {2 * a}."}],
        }
        for a in range(4)
    ]


@pytest.mark.parametrize("rows", ["chat", "preference"])
def test_a_second_evaluation_reuses_the_base_side(
    tiny_model: str, tmp_path: Path, rows: str
) -> None:
    tokenizer, model = _model(MODEL_CACHE / tiny_model)
    records = person_rows(3, seed=4) + arithmetic_rows(2) if rows == "chat" else _pairs()
    sides = BaseSides(tmp_path / "base")
    task = EvaluationTask(records, "validation", samples=2, bf16=False, base_sides=sides)

    first = evaluate(tokenizer, model, task)
    assert first["base_side_reused"] is False
    assert len(list((tmp_path / "base").glob("*.json"))) == 1
    again = evaluate(tokenizer, model, task)
    assert again["base_side_reused"] is True
    for key in ("base_eval_loss", "adapter_eval_loss", "improvement", "samples", "rows"):
        assert again[key] == first[key], key
    if rows == "preference":
        assert again["base_preference_accuracy"] == first["base_preference_accuracy"]
        assert "adapter_preference_accuracy" in again

    # Computed whole, without the kept side: the same evaluation.
    alone = evaluate(tokenizer, model, EvaluationTask(records, "validation", 2, bf16=False))
    assert alone["base_side_reused"] is False
    for key in ("base_eval_loss", "adapter_eval_loss", "samples"):
        assert alone[key] == first[key], key

    # Other rows: another base side.
    other = EvaluationTask(records[1:], "validation", samples=2, bf16=False, base_sides=sides)
    assert evaluate(tokenizer, model, other)["base_side_reused"] is False
    assert len(list((tmp_path / "base").glob("*.json"))) == 2


def test_the_base_model_is_named_by_its_weight_files(tiny_model: str, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(MODEL_CACHE / tiny_model, copy)
    _tokenizer, model = _model(copy)
    sides = BaseSides(tmp_path / "base")
    before = base_model_identity(model)
    assert before is not None and sides.key(model, [[1, 2]]) != sides.key(model, [[1, 3]])
    key = sides.key(model, [[1, 2]])
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert base_model_identity(model) != before and sides.key(model, [[1, 2]]) != key

    for path in copy.glob("*.safetensors"):  # weights that cannot be named: nothing is kept
        path.unlink()
    assert base_model_identity(model) is None and sides.key(model, [[1, 2]]) is None
    model.config._commit_hash = "0123456789abcdef0123456789abcdef01234567"  # from the Hub
    assert base_model_identity(model) == f"{copy}@{model.config._commit_hash}"


def test_an_unreadable_kept_side_is_computed_again(tmp_path: Path) -> None:
    sides = BaseSides(tmp_path)
    sides.put("k", BaseSide(1.5, ["an answer"], 0.5))
    assert sides.get("k") == BaseSide(1.5, ["an answer"], 0.5)
    (tmp_path / "k.json").write_text("{not json")
    assert sides.get("k") is None and sides.get("missing") is None
    assert not list(tmp_path.glob("*.tmp"))


def test_the_least_recently_used_sides_are_pruned(tmp_path: Path) -> None:
    sides = BaseSides(tmp_path, keep=2)
    for age, key in enumerate(["a", "b"]):
        sides.put(key, BaseSide(float(age), [key]))
        os.utime(tmp_path / f"{key}.json", ns=(age * 10**9, age * 10**9))  # a: the oldest
    assert sides.get("a") == BaseSide(0.0, ["a"])  # read: now the most recently used
    sides.put("c", BaseSide(2.0, ["c"]))
    assert sorted(path.stem for path in tmp_path.glob("*.json")) == ["a", "c"]
    assert sides.get("b") is None
