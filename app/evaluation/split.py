"""Which rows the automatic evaluation scores, shared by the worker and the job plan.

With a validation set, its first `max_rows` rows. Without one, a dataset of at least
HOLD_OUT_FROM_ROWS rows gives up a tenth of its rows (at most `max_rows`), chosen with the job's
seed, and trains on the rest; a smaller dataset is trained whole and scored on its own first
rows (split "training_rows", which says so).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

HOLD_OUT_FROM_ROWS = 50

Split = Literal["validation", "held_out", "training_rows"]


def held_out_rows(rows: int, *, has_validation: bool, max_rows: int) -> int:
    """How many of the dataset's rows are kept out of training for the evaluation."""
    if has_validation or max_rows == 0 or rows < HOLD_OUT_FROM_ROWS:
        return 0
    return min(max_rows, rows // 10)


@dataclass(frozen=True)
class EvaluationSplit:
    train: list[dict[str, Any]]
    scored: list[dict[str, Any]]
    split: Split


def split_records(
    records: list[dict[str, Any]],
    validation: list[dict[str, Any]] | None,
    *,
    seed: int,
    max_rows: int,
) -> EvaluationSplit:
    if validation:
        return EvaluationSplit(records, validation[:max_rows], "validation")
    count = held_out_rows(len(records), has_validation=False, max_rows=max_rows)
    if count == 0:
        return EvaluationSplit(records, records[:max_rows], "training_rows")
    chosen = set(random.Random(seed).sample(range(len(records)), count))
    train = [record for index, record in enumerate(records) if index not in chosen]
    scored = [records[index] for index in sorted(chosen)]
    return EvaluationSplit(train, scored, "held_out")
