"""Run one job by id: claim it, validate its dataset, train, register the adapter.

Every exit path ends the job in a terminal state (or hands it back to the queue when this worker
lost its claim): no exception leaves a job in `running`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from app.adapters.models import Adapter
from app.base_models.loading import BaseModelUnavailable, model_location
from app.base_models.registry import get_base_model
from app.db import unit_of_work, utcnow
from app.errors import TuneserveError
from app.ids import new_id
from app.jobs.events import append_event
from app.jobs.models import Job, JobMetric, JobStatus
from app.jobs.transitions import transition
from app.settings import Settings, get_settings
from app.storage import artifact_store
from worker.datasets import DatasetFacts, JobFailure, prepare_datasets
from worker.devices import Device, detect_device
from worker.distributed import node_processes, run_distributed
from worker.heartbeat import Heartbeat
from worker.training import ProgressUpdate, TrainingHooks, TrainingSpec, train_lora

logger = logging.getLogger(__name__)


class JobStopped(Exception):
    """The job must stop now: cancelled by its owner, or its claim was given to another attempt."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(job_id: str, me: str) -> Job | None:
    """Atomically take a queued job; None when another delivery already took it."""
    now = utcnow()
    with unit_of_work() as session:
        attempt = (session.scalar(select(Job.attempt).where(Job.id == job_id)) or 0) + 1
        claimed = transition(
            session,
            job_id,
            JobStatus.VALIDATING,
            f"Claimed by worker {me} (attempt {attempt}).",
            data={"worker": me, "attempt": attempt},
            values={
                "attempt": Job.attempt + 1,
                "worker": me,
                "heartbeat_at": now,
                "started_at": func.coalesce(Job.started_at, now),
            },
        )
        return session.get(Job, job_id) if claimed else None


def event(job_id: str, type: str, message: str, **data: Any) -> None:
    with unit_of_work() as session:
        append_event(session, job_id, type, message, data=data or None)


class ProgressWriter:
    """Writes progress and metric points to SQL at most every `interval` seconds."""

    def __init__(self, job_id: str, interval: float) -> None:
        self.job_id = job_id
        self.interval = interval
        self.pending: list[JobMetric] = []
        self.progress: dict[str, Any] = {}
        self.last_write = 0.0

    def __call__(self, update_: ProgressUpdate) -> None:
        if update_.train_loss is not None or update_.eval_loss is not None:
            self.pending.append(
                JobMetric(
                    job_id=self.job_id,
                    step=update_.step,
                    epoch=update_.epoch,
                    train_loss=update_.train_loss,
                    eval_loss=update_.eval_loss,
                    lr=update_.learning_rate,
                    tokens_per_second=update_.tokens_per_second,
                    created_at=utcnow(),
                )
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
        ):
            if value is not None:
                self.progress[key] = value
        if time.monotonic() - self.last_write >= self.interval:
            self.flush()

    def flush(self) -> None:
        with unit_of_work() as session:
            session.add_all(self.pending)
            if self.progress:
                session.execute(
                    update(Job).where(Job.id == self.job_id).values(progress=self.progress)
                )
        self.pending = []
        self.last_write = time.monotonic()


@dataclass
class JobContext:
    job: Job
    settings: Settings
    heartbeat: Heartbeat
    worker_id: str

    @property
    def workdir(self) -> Path:
        return self.settings.artifacts_dir / "jobs" / self.job.id

    def check_stop(self) -> None:
        if self.heartbeat.stop_requested.is_set():
            raise JobStopped(self.heartbeat.reason or "cancelled")


def run_job(job_id: str) -> None:
    settings = get_settings()
    me = worker_id()
    job = claim(job_id, me)
    if job is None:
        logger.info("job %s was not claimable (already taken, cancelled or gone)", job_id)
        return
    with Heartbeat(job_id, me, settings.heartbeat_interval_seconds) as heartbeat:
        context = JobContext(job=job, settings=settings, heartbeat=heartbeat, worker_id=me)
        try:
            _run_claimed(context)
        except JobStopped as stop:
            _finish_stopped(job_id, me, stop.reason)
        except JobFailure as failure:
            _fail(job_id, me, failure.code, failure.message, failure.detail)
        except TuneserveError as error:
            _fail(job_id, me, error.code, error.message, error.detail)
        except Exception as exc:
            logger.exception("job %s failed", job_id)
            _fail(job_id, me, *_describe_crash(exc))
        finally:
            shutil.rmtree(context.workdir / "trainer", ignore_errors=True)


def _describe_crash(exc: Exception) -> tuple[str, str, Any]:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return (
            "out_of_memory",
            "The device ran out of memory. Lower hyperparameters.batch_size (raise "
            "gradient_accumulation_steps to keep the effective batch) or max_seq_length.",
            None,
        )
    return (
        "training_failed",
        f"Training failed: {type(exc).__name__}: {exc}. The event log has the details; if it "
        "persists with a valid dataset, report it with the job id.",
        None,
    )


def use_bf16(setting: str, device: Device) -> bool:
    return setting == "on" or (setting == "auto" and device.bf16)


def _run_claimed(context: JobContext) -> None:
    job, settings = context.job, context.settings
    device = detect_device()
    bf16 = use_bf16(settings.bf16, device)
    with unit_of_work() as session:
        session.execute(update(Job).where(Job.id == job.id).values(device=device.facts()))
        append_event(
            session,
            job.id,
            "job.device",
            f"Training on {device.kind}: {device.count} x {device.name}"
            f" ({'bf16 autocast' if bf16 else 'fp32'}).",
            data={**device.facts(), "bf16_autocast": bf16},
        )
    base_model = get_base_model(settings, job.base_model)
    event(job.id, "job.loading_model", f"Preparing base model {base_model.name}.")
    try:
        location = model_location(settings, base_model)
    except BaseModelUnavailable as exc:
        raise JobFailure(exc.code, exc.message) from exc
    context.check_stop()

    processes = settings.training_processes or node_processes()
    prepared = prepare_datasets(job, settings, location, context.workdir, processes)
    facts: DatasetFacts = prepared.facts
    with unit_of_work() as session:
        session.execute(update(Job).where(Job.id == job.id).values(dataset=facts))
        append_event(
            session,
            job.id,
            "job.dataset_validated",
            f"Dataset valid: {facts['rows']} rows, format {facts['format']}, "
            f"{facts['tokens']} tokens.",
            data=dict(facts),
        )
    context.check_stop()

    with unit_of_work() as session:
        started = transition(
            session,
            job.id,
            JobStatus.RUNNING,
            f"Training started: {prepared.total_steps} steps.",
            only_from=frozenset({JobStatus.VALIDATING}),
            claimed_by=context.worker_id,
            values={
                "progress": {"step": 0, "total_steps": prepared.total_steps, "epoch": 0.0},
                "heartbeat_at": utcnow(),
            },
        )
    if not started:
        raise JobStopped("claim_lost")

    writer = ProgressWriter(job.id, settings.progress_interval_seconds)
    spec = TrainingSpec(
        model_location=location,
        hyperparameters=job.hyperparameters,
        lora=job.lora,
        model_kwargs=prepared.model_kwargs,
        bf16=bf16,
    )
    hooks = TrainingHooks(on_progress=writer, should_stop=context.heartbeat.stop_requested.is_set)
    if processes > 1:
        event(job.id, "job.distributed", f"Data-parallel training on {processes} processes.")
        result = run_distributed(
            spec, prepared.train_records, prepared.eval_records, context.workdir, hooks, processes
        )
    else:
        result = train_lora(
            spec, prepared.train_records, prepared.eval_records, context.workdir, hooks
        )
    writer.flush()
    context.check_stop()
    if result.stopped_early:
        raise JobStopped("cancelled")

    adapter = _register_adapter(context)
    with unit_of_work() as session:
        final = {
            **writer.progress,
            "step": result.steps,
            "total_steps": result.total_steps,
            "eta_seconds": 0.0,
            "trained_tokens": result.trained_tokens,
        }
        if result.eval_loss is not None:
            final["eval_loss"] = result.eval_loss
        session.add(adapter)
        session.flush()
        succeeded = transition(
            session,
            job.id,
            JobStatus.SUCCEEDED,
            f"Training finished in {result.seconds:.0f} s; adapter {adapter.id} ({adapter.name}).",
            only_from=frozenset({JobStatus.RUNNING}),
            claimed_by=context.worker_id,
            data={
                "adapter": adapter.id,
                "mean_train_loss": result.train_loss,
                "eval_loss": result.eval_loss,
                "trained_tokens": result.trained_tokens,
                "seconds": round(result.seconds, 1),
            },
            values={"progress": final},
        )
        if not succeeded:
            session.rollback()
            artifact_store(settings).delete(adapter.path)
            raise JobStopped("claim_lost")


def _register_adapter(context: JobContext) -> Adapter:
    """Publish the saved adapter to the artifact store and build its row."""
    job, settings = context.job, context.settings
    adapter_id = new_id("adapter")
    local = context.workdir / "adapter"
    digest = hashlib.sha256((local / "adapter_model.safetensors").read_bytes()).hexdigest()
    size = sum(path.stat().st_size for path in local.rglob("*") if path.is_file())
    key = f"adapters/{adapter_id}"
    artifact_store(settings).put_dir(local, key)
    shutil.rmtree(local, ignore_errors=True)
    return Adapter(
        id=adapter_id,
        owner=job.owner,
        job_id=job.id,
        base_model=job.base_model,
        name=f"ft:{job.base_model}:{job.owner}:{job.suffix or ''}:{job.id}",
        path=key,
        sha256=digest,
        size_bytes=size,
        rank=int(job.lora["r"]),
        created_at=utcnow(),
    )


def _finish_stopped(job_id: str, me: str, reason: str) -> None:
    if reason == "claim_lost":
        logger.warning(
            "job %s: this worker lost its claim; leaving the job to its new attempt", job_id
        )
        return
    with unit_of_work() as session:
        transition(
            session,
            job_id,
            JobStatus.CANCELLED,
            "Cancelled by request; training stopped.",
            claimed_by=me,
        )


def _fail(job_id: str, me: str, code: str, message: str, detail: Any = None) -> None:
    with unit_of_work() as session:
        transition(
            session,
            job_id,
            JobStatus.FAILED,
            message,
            level="error",
            claimed_by=me,
            data={"code": code},
            values={"error": {"code": code, "message": message, "detail": detail}},
        )
