"""Which rows the automatic evaluation scores, what it asks the models, and that its failure
leaves the job's adapter standing (worker/stages.py evaluate)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import select

from app.db import unit_of_work, utcnow
from app.evaluation.split import held_out_rows, split_records
from app.jobs.models import JobEvent, JobStatus
from app.settings import get_settings
from tests.corpus import arithmetic_rows
from tests.jobs_in_sql import insert_job
from worker.evaluation import sample_prompt
from worker.stages import JobContext, Trained, Validated, evaluate_saved_adapter


def test_held_out_rows_start_at_fifty_rows_without_a_validation_set() -> None:
    assert held_out_rows(49, has_validation=False, max_rows=32) == 0
    assert held_out_rows(50, has_validation=False, max_rows=32) == 5
    assert held_out_rows(300, has_validation=False, max_rows=32) == 30
    assert held_out_rows(10_000, has_validation=False, max_rows=32) == 32
    assert held_out_rows(300, has_validation=True, max_rows=32) == 0
    assert held_out_rows(300, has_validation=False, max_rows=0) == 0


def test_the_split_is_fixed_by_the_seed_and_loses_no_row() -> None:
    rows = arithmetic_rows(60)
    first = split_records(rows, None, seed=7, max_rows=32)
    again = split_records(rows, None, seed=7, max_rows=32)
    other = split_records(rows, None, seed=8, max_rows=32)
    assert first.split == "held_out" and len(first.scored) == 6 and len(first.train) == 54
    assert first.scored == again.scored and first.scored != other.scored
    assert sorted(map(str, first.train + first.scored)) == sorted(map(str, rows))
    assert not any(row in first.train for row in first.scored)

    validation = arithmetic_rows(40)
    scored = split_records(rows, validation, seed=7, max_rows=32)
    assert scored.split == "validation" and scored.train == rows and len(scored.scored) == 32
    small = split_records(rows[:10], None, seed=7, max_rows=32)
    assert small.split == "training_rows" and small.scored == small.train == rows[:10]


class _Tokenizer:
    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> list[int]:
        return [len(message["content"]) for message in messages]

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_a_sample_asks_the_conversation_before_the_last_answer() -> None:
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6"},
        ]
    }
    prompt = sample_prompt(_Tokenizer(), record)
    assert prompt is not None
    assert (prompt.shown, prompt.reference) == ("3+3?", "6")
    assert prompt.input_ids == [9, 4, 1, 4]  # every message before the last answer
    completion = sample_prompt(_Tokenizer(), {"prompt": "ab", "completion": "c"})
    assert completion is not None and completion.reference == "c"
    assert completion.input_ids == [97, 98]
    assert sample_prompt(_Tokenizer(), {"text": "no prompt here"}) is None


def test_a_failed_evaluation_is_reported_and_keeps_the_adapter(tmp_path: Path) -> None:
    # A fresh heartbeat: a scheduler of the same test session must not take the job as lost.
    job_id = insert_job(
        JobStatus.RUNNING, "evaluation-tests", attempt=1, worker="test:1", heartbeat_at=utcnow()
    )
    rows = arithmetic_rows(4)
    context = cast(
        JobContext,
        SimpleNamespace(
            settings=get_settings(),
            job=SimpleNamespace(id=job_id, method=None, method_type="supervised"),
            workdir=tmp_path,
        ),
    )
    validated = cast(
        Validated,
        SimpleNamespace(
            prepared=SimpleNamespace(
                scored=split_records(rows, None, seed=0, max_rows=32), model_kwargs={}
            ),
            # No model at that location: loading it fails inside the evaluation.
            location=str(tmp_path / "no-model"),
            bf16=False,
        ),
    )
    trained = cast(Trained, SimpleNamespace(evaluated_in_memory=False))
    assert evaluate_saved_adapter(context, validated, trained) is None
    with unit_of_work() as session:
        events = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        ).all()
        seen = [(event.type, event.level, event.message) for event in events]
    assert [kind for kind, _level, _message in seen] == ["job.evaluating", "job.evaluation_failed"]
    assert seen[1][1] == "warning" and "the adapter is kept" in seen[1][2]
    assert "(OSError: " in seen[1][2], seen[1][2]  # the model load's own error, named
