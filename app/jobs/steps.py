"""How many optimizer steps a job takes: one rule for the plan and the worker."""

from __future__ import annotations

import math
from typing import Any


def total_steps(rows: int, hyperparameters: dict[str, Any], world_size: int = 1) -> int:
    """The optimizer steps the Trainer will take (it rounds batches, then accumulation, up);
    with data parallelism each step takes batch_size rows on every rank."""
    batches = math.ceil(rows / (hyperparameters["batch_size"] * world_size))
    updates_per_epoch: int = math.ceil(
        batches / int(hyperparameters["gradient_accumulation_steps"])
    )
    return updates_per_epoch * int(hyperparameters["n_epochs"])
