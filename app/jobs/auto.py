"""What "auto" hyperparameters become, from the dataset's size and the base model.

`n_epochs`, `batch_size` and `learning_rate` accept "auto" (the default when omitted). The worker
resolves them once the dataset is validated, and a plan (POST /jobs/plan) resolves them the
same way; the job then shows the numbers.

| hyperparameter  | rule                                                                          |
| --------------- | ----------------------------------------------------------------------------- |
| `n_epochs`      | 3, so the model sees each example 3 times; small datasets get more epochs so  |
|                 | that about 300 examples are seen (ceil(300 / rows), at most 10), large ones   |
|                 | fewer so that at most 30 000 are (floor(30 000 / rows), at least 1)           |
| `batch_size`    | the largest power of two <= rows / 8, between 1 and 8 (so an epoch has at     |
|                 | least about 8 batches and a batch never holds more rows than the dataset);    |
|                 | then halved while the estimated peak memory does not fit the device           |
| `learning_rate` | 2e-4 x sqrt(batch_size x gradient_accumulation_steps / 8) x model factor, to  |
|                 | 3 significant digits; model factor: 1 up to 1B parameters, 0.5 up to 10B,     |
|                 | 0.25 above                                                                    |

| rows   | n_epochs | batch_size | learning_rate (model <= 1B, no accumulation) |
| ------ | -------- | ---------- | -------------------------------------------- |
| 8      | 10       | 1          | 7.07e-5                                      |
| 16     | 10       | 2          | 1e-4                                         |
| 50     | 6        | 4          | 1.41e-4                                      |
| 300    | 3        | 8          | 2e-4                                         |
| 20 000 | 1        | 8          | 2e-4                                         |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

AUTO: Literal["auto"] = "auto"
AUTO_FIELDS = ("n_epochs", "batch_size", "learning_rate")

TARGET_EPOCHS = 3
MIN_EXAMPLES_SEEN = 300
MAX_EXAMPLES_SEEN = 30_000
MAX_AUTO_EPOCHS = 10
MAX_AUTO_BATCH_SIZE = 8
ROWS_PER_BATCH = 8  # an epoch has at least about this many batches
BASE_LEARNING_RATE = 2e-4
BASE_EFFECTIVE_BATCH = 8


@dataclass(frozen=True)
class Resolved:
    hyperparameters: dict[str, Any]  # numbers only
    auto: list[str]  # the names that were "auto"


def auto_fields(hyperparameters: Mapping[str, Any]) -> list[str]:
    return [name for name in AUTO_FIELDS if hyperparameters.get(name) == AUTO]


def auto_epochs(rows: int) -> int:
    if rows * TARGET_EPOCHS < MIN_EXAMPLES_SEEN:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_EXAMPLES_SEEN / rows))
    if rows * TARGET_EPOCHS > MAX_EXAMPLES_SEEN:
        return max(1, MAX_EXAMPLES_SEEN // rows)
    return TARGET_EPOCHS


def auto_batch_size(rows: int, fits: Callable[[int], bool] = lambda _batch: True) -> int:
    """`fits(batch_size)`: whether a batch of that size fits the device's memory."""
    batch = 1
    while batch * 2 <= min(MAX_AUTO_BATCH_SIZE, rows // ROWS_PER_BATCH):
        batch *= 2
    while batch > 1 and not fits(batch):
        batch //= 2
    return batch


def model_factor(model_params: int) -> float:
    if model_params <= 1_000_000_000:
        return 1.0
    if model_params <= 10_000_000_000:
        return 0.5
    return 0.25


def auto_learning_rate(
    batch_size: int, gradient_accumulation_steps: int, model_params: int
) -> float:
    effective = batch_size * gradient_accumulation_steps
    rate = BASE_LEARNING_RATE * math.sqrt(effective / BASE_EFFECTIVE_BATCH)
    rate *= model_factor(model_params)
    return float(f"{rate:.3g}")


def resolve(
    hyperparameters: Mapping[str, Any],
    *,
    rows: int,
    model_params: int,
    fits: Callable[[int], bool] = lambda _batch: True,
) -> Resolved:
    """The hyperparameters with every "auto" replaced by its number (others untouched)."""
    auto = auto_fields(hyperparameters)
    resolved = dict(hyperparameters)
    if "n_epochs" in auto:
        resolved["n_epochs"] = auto_epochs(rows)
    if "batch_size" in auto:
        resolved["batch_size"] = auto_batch_size(rows, fits)
    if "learning_rate" in auto:
        resolved["learning_rate"] = auto_learning_rate(
            int(resolved["batch_size"]), int(resolved["gradient_accumulation_steps"]), model_params
        )
    return Resolved(hyperparameters=resolved, auto=auto)
