"""Training progress of a running job, written to SQL every few seconds."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy.exc import DBAPIError

from app.db import unit_of_work, utcnow
from app.jobs import repository
from worker.sql import with_retries
from worker.training import ProgressUpdate

logger = logging.getLogger(__name__)


class ProgressWriter:
    """Writes progress and metric points to SQL at most every `interval` seconds."""

    def __init__(self, job_id: str, interval: float) -> None:
        self.job_id = job_id
        self.interval = interval
        self.pending: list[dict[str, Any]] = []
        self.progress: dict[str, Any] = {}
        self.last_write = 0.0

    def __call__(self, update_: ProgressUpdate) -> None:
        if (
            update_.train_loss is not None
            or update_.eval_loss is not None
            or update_.reward_mean is not None
        ):
            self.pending.append(
                {
                    "job_id": self.job_id,
                    "step": update_.step,
                    "epoch": update_.epoch,
                    "train_loss": update_.train_loss,
                    "eval_loss": update_.eval_loss,
                    "lr": update_.learning_rate,
                    "tokens_per_second": update_.tokens_per_second,
                    "reward_mean": update_.reward_mean,
                    "reward_std": update_.reward_std,
                    "created_at": utcnow(),
                }
            )
        self.progress = {
            **self.progress,
            "step": update_.step,
            "total_steps": update_.total_steps,
            "epoch": round(update_.epoch, 4),
            "tokens_per_second": update_.tokens_per_second,
            "eta_seconds": round(update_.eta_seconds, 1)
            if update_.eta_seconds is not None
            else None,
        }
        for key, value in (
            ("train_loss", update_.train_loss),
            ("eval_loss", update_.eval_loss),
            ("learning_rate", update_.learning_rate),
            ("reward_mean", update_.reward_mean),
            ("reward_std", update_.reward_std),
        ):
            if value is not None:
                self.progress[key] = value
        if time.monotonic() - self.last_write >= self.interval:
            self.flush()

    def flush(self, *, must: bool = False) -> None:
        """Write what is pending. While the database is away, training goes on and the points
        wait for the next flush; `must` (the last flush) retries until they are written."""

        def write() -> None:
            with unit_of_work() as session:
                repository.save_progress(
                    session, self.job_id, progress=self.progress, points=self.pending
                )

        self.last_write = time.monotonic()
        try:
            with_retries(write, what="write progress", seconds=120 if must else 0)
        except DBAPIError:
            logger.warning("job %s: progress not written yet; will retry", self.job_id)
            return
        self.pending = []
