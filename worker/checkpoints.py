"""Checkpoints of a running job: published to the artifact store and recorded in SQL as they are
saved, pruned to the newest few, and brought back to resume a later attempt."""

from __future__ import annotations

import logging
from pathlib import Path

from app.db import unit_of_work, utcnow
from app.ids import new_id
from app.jobs import repository
from app.jobs.events import append_event
from app.jobs.models import JobCheckpoint
from app.settings import Settings
from app.storage import artifact_store
from worker.sql import with_retries
from worker.training import Checkpoint

logger = logging.getLogger(__name__)


def checkpoint_key(job_id: str, step: int) -> str:
    return f"checkpoints/{job_id}/step-{step}"


class CheckpointKeeper:
    """The `on_checkpoint` hook of a training run."""

    def __init__(self, job_id: str, settings: Settings, kept: int) -> None:
        self.job_id = job_id
        self.settings = settings
        self.kept = kept
        self.last_step: int | None = None

    def __call__(self, checkpoint: Checkpoint) -> None:
        store = artifact_store(self.settings)
        key = checkpoint_key(self.job_id, checkpoint.step)
        store.put_dir(checkpoint.directory, key)
        metrics = {"train_loss": checkpoint.train_loss}

        def record() -> list[str]:
            with unit_of_work() as session:
                row = JobCheckpoint(
                    id=new_id("ftckpt"),
                    job_id=self.job_id,
                    step=checkpoint.step,
                    epoch=checkpoint.epoch,
                    path=key,
                    metrics=metrics,
                    created_at=utcnow(),
                )
                repository.replace_checkpoint(session, row)
                append_event(
                    session,
                    self.job_id,
                    "job.checkpoint_saved",
                    f"Checkpoint saved at step {checkpoint.step}.",
                    data={"step": checkpoint.step, "epoch": checkpoint.epoch, **metrics},
                )
                return repository.prune_checkpoints(session, self.job_id, kept=self.kept)

        for stale_key in with_retries(record, what="record a checkpoint"):
            store.delete(stale_key)
        self.last_step = checkpoint.step


def latest_checkpoint(job_id: str) -> JobCheckpoint | None:
    with unit_of_work() as session:
        return repository.latest_checkpoint(session, job_id)


def restore(checkpoint: JobCheckpoint, settings: Settings, trainer_dir: Path) -> Path:
    """Bring the checkpoint to where the Trainer expects it and forget what came after it."""
    local = trainer_dir / f"checkpoint-{checkpoint.step}"
    artifact_store(settings).get_dir(checkpoint.path, local)
    with unit_of_work() as session:
        # Steps after the checkpoint were trained by the lost attempt and will be trained again:
        # drop their points so the loss curve continues from the checkpoint.
        repository.forget_metrics_after(session, checkpoint.job_id, checkpoint.step)
    return local
