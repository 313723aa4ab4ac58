"""Run one job by id: claim it, validate its dataset, train, register the adapter.

Every exit path ends the job in a terminal state (or hands it back to the queue when this worker
lost its claim): no exception leaves a job in `running`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.adapters.models import Adapter
from app.base_models.loading import BaseModelUnavailable, model_location
from app.base_models.registry import get_base_model
from app.db import unit_of_work, utcnow
from app.devices import Device, detect_device
from app.errors import TuneserveError
from app.ids import new_id
from app.jobs.events import append_event
from app.jobs.models import ACTIVE_STATUSES, Job, JobStatus, Throughput
from app.jobs.transitions import transition
from app.settings import Settings, get_settings
from app.storage import artifact_store
from worker.checkpoints import CheckpointKeeper, latest_checkpoint, restore
from worker.datasets import DatasetFacts, JobFailure, PreparedDatasets, prepare_datasets
from worker.distributed import node_processes, run_distributed
from worker.evaluation import evaluate_adapter
from worker.heartbeat import Heartbeat
from worker.model_card import manifest, write_model_card
from worker.progress import ProgressWriter
from worker.sql import with_retries
from worker.training import (
    Checkpoint,
    TrainingHooks,
    TrainingResult,
    TrainingSpec,
    train_lora,
)

logger = logging.getLogger(__name__)


class JobStopped(Exception):
    """The job must stop now: cancelled by its owner, its claim given to another attempt, or its
    worker shutting down (then it is handed back to the queue)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def is_dead_here(worker: str | None) -> bool:
    """True when `worker` (host:pid) was a process on this host that no longer exists."""
    if not worker or ":" not in worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def claim(job_id: str, me: str) -> Job | None:
    """Atomically take a queued job; None when another delivery already took it.

    A message delivered again because its worker process died (kill -9, OOM) finds its job still
    `running` under the dead process's id: that job is taken over at once instead of waiting
    for the scheduler to notice the silent heartbeat.
    """
    now = utcnow()

    def take() -> Job | None:
        with unit_of_work() as session:
            current = session.execute(
                select(Job.attempt, Job.status, Job.worker).where(Job.id == job_id)
            ).one_or_none()
            if current is None:
                return None
            takeover = current.status in ACTIVE_STATUSES and is_dead_here(current.worker)
            attempt = current.attempt + 1
            message = f"Claimed by worker {me} (attempt {attempt})."
            if takeover:
                message = f"Worker {current.worker} died; taken over by {me} (attempt {attempt})."
            claimed = transition(
                session,
                job_id,
                JobStatus.VALIDATING,
                message,
                only_from=ACTIVE_STATUSES if takeover else frozenset({JobStatus.QUEUED}),
                claimed_by=current.worker if takeover else None,
                data={"worker": me, "attempt": attempt, "took_over_from": current.worker}
                if takeover
                else {"worker": me, "attempt": attempt},
                values={
                    "attempt": Job.attempt + 1,
                    "worker": me,
                    "heartbeat_at": now,
                    "started_at": func.coalesce(Job.started_at, now),
                },
            )
            return session.get(Job, job_id) if claimed else None

    return with_retries(take, what=f"claim job {job_id}")


def event(job_id: str, type: str, message: str, level: str = "info", **data: Any) -> None:
    def write() -> None:
        with unit_of_work() as session:
            append_event(session, job_id, type, message, level=level, data=data or None)

    with_retries(write, what=f"log {type}")


@dataclass
class JobContext:
    job: Job
    settings: Settings
    heartbeat: Heartbeat
    worker_id: str
    checkpoints: CheckpointKeeper | None = None

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
    with (
        Heartbeat(job_id, me, settings.heartbeat_interval_seconds) as heartbeat,
        _shutdown_hands_back(heartbeat),
    ):
        context = JobContext(job=job, settings=settings, heartbeat=heartbeat, worker_id=me)
        try:
            _run_claimed(context)
        except JobStopped as stop:
            _finish_stopped(context, stop.reason)
        except JobFailure as failure:
            _fail(job_id, me, failure.code, failure.message, failure.detail)
        except TuneserveError as error:
            _fail(job_id, me, error.code, error.message, error.detail)
        except Exception as exc:
            logger.exception("job %s failed", job_id)
            _fail(job_id, me, *_describe_crash(exc))
        finally:
            shutil.rmtree(context.workdir / "trainer", ignore_errors=True)
            _free_device()


# Set once this worker process got SIGTERM: it takes no new job (tasks.run_job hands the message
# back to the broker) while Celery finishes its own shutdown.
shutting_down = threading.Event()


@contextmanager
def _shutdown_hands_back(heartbeat: Heartbeat) -> Iterator[None]:
    """While a job runs, SIGTERM (a worker asked to stop) makes it checkpoint and go back to the
    queue; the worker then goes on with its own shutdown."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (solo pool)
        return
    received: list[int] = []

    def on_sigterm(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        shutting_down.set()
        heartbeat.request_stop("shutdown")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if received:
            signal.raise_signal(signal.SIGTERM)  # now Celery's own warm shutdown


def _free_device() -> None:
    """The worker process outlives its jobs: give the model's memory back before the next one."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    prepared = prepare_datasets(
        job,
        settings,
        location,
        context.workdir,
        processes,
        device=device,
    )
    facts: DatasetFacts = prepared.facts
    resolved = {name: prepared.hyperparameters[name] for name in prepared.auto}
    with unit_of_work() as session:
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(dataset=facts, hyperparameters=prepared.hyperparameters)
        )
        chosen = ", ".join(f"{name}={value}" for name, value in resolved.items())
        auto = f" Auto hyperparameters: {chosen}." if resolved else ""
        append_event(
            session,
            job.id,
            "job.dataset_validated",
            f"Dataset valid: {facts['rows']} rows, format {facts['format']}, "
            f"{facts['tokens']} tokens.{auto}",
            data={**facts, "auto_hyperparameters": resolved} if resolved else dict(facts),
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

    hp = prepared.hyperparameters
    resume_from = None
    checkpoint = latest_checkpoint(job.id)
    if checkpoint is not None:
        resume_from = str(restore(checkpoint, settings, context.workdir / "trainer"))
        event(
            job.id,
            "job.resumed",
            f"Resuming from the checkpoint at step {checkpoint.step} (attempt {job.attempt}).",
            step=checkpoint.step,
            checkpoint=checkpoint.id,
        )
    writer = ProgressWriter(job.id, settings.progress_interval_seconds)
    kept = hp.get("checkpoints_kept") or settings.checkpoints_kept
    spec = TrainingSpec(
        model_location=location,
        hyperparameters=hp,
        lora=job.lora,
        model_kwargs=prepared.model_kwargs,
        bf16=bf16,
        checkpoint_every_steps=hp.get("checkpoint_every_steps") or settings.checkpoint_every_steps,
        checkpoint_every_minutes=hp.get("checkpoint_every_minutes")
        or settings.checkpoint_every_minutes,
        checkpoints_kept=kept,
        resume_from=resume_from,
    )
    heartbeat = context.heartbeat
    keeper = context.checkpoints = CheckpointKeeper(job.id, settings, kept)

    def on_checkpoint(checkpoint: Checkpoint) -> None:
        # The curve up to the checkpoint must be in SQL before the checkpoint is: a resumed run
        # goes on from the step after it.
        writer.flush(must=True)
        keeper(checkpoint)

    hooks = TrainingHooks(
        on_progress=writer,
        should_stop=heartbeat.stop_requested.is_set,
        checkpoint_before_stop=lambda: heartbeat.reason == "shutdown",
        on_checkpoint=on_checkpoint,
    )
    if processes > 1:
        event(job.id, "job.distributed", f"Data-parallel training on {processes} processes.")
        result = run_distributed(
            spec, prepared.train_records, prepared.eval_records, context.workdir, hooks, processes
        )
    else:
        result = train_lora(
            spec, prepared.train_records, prepared.eval_records, context.workdir, hooks
        )
    writer.flush(must=True)
    context.check_stop()
    if result.stopped_early:
        raise JobStopped("cancelled")

    evaluation = _evaluate(context, prepared, location, bf16)
    context.check_stop()
    final = {
        **writer.progress,
        "step": result.steps,
        "total_steps": result.total_steps,
        "eta_seconds": 0.0,
        "trained_tokens": result.trained_tokens,
    }
    if result.eval_loss is not None:
        final["eval_loss"] = result.eval_loss
    write_model_card(
        context.workdir / "adapter",
        manifest(
            job=job,
            base_model=base_model,
            dataset=dict(facts),
            hyperparameters=hp,
            device={**device.facts(), "bf16_autocast": bf16, "processes": processes},
            metrics={
                "steps": result.steps,
                "train_loss": result.train_loss,
                "eval_loss": result.eval_loss,
                "trained_tokens": result.trained_tokens,
                "training_seconds": round(result.seconds, 1),
            },
            evaluation=evaluation,
        ),
    )
    adapter = _register_adapter(context)

    def succeed() -> bool:
        with unit_of_work() as session:
            session.add(adapter.row())
            session.flush()
            succeeded = transition(
                session,
                job.id,
                JobStatus.SUCCEEDED,
                f"Training finished in {result.seconds:.0f} s; "
                f"adapter {adapter.id} ({adapter.name}).",
                only_from=frozenset({JobStatus.RUNNING}),
                claimed_by=context.worker_id,
                data={
                    "adapter": adapter.id,
                    "mean_train_loss": result.train_loss,
                    "eval_loss": result.eval_loss,
                    "trained_tokens": result.trained_tokens,
                    "seconds": round(result.seconds, 1),
                },
                values={"progress": final, "evaluation": evaluation},
            )
            if not succeeded:
                session.rollback()
            elif resume_from is None:
                _record_throughput(session, job, device, processes, writer.progress, result)
            return succeeded

    if not with_retries(succeed, what=f"finish job {job.id}"):
        artifact_store(settings).delete(adapter.path)
        raise JobStopped("claim_lost")


def _evaluate(
    context: JobContext, prepared: PreparedDatasets, location: str, bf16: bool
) -> dict[str, Any] | None:
    """Base model against adapter on the rows prepare_datasets set aside (worker/evaluation.py).
    A failure here is reported and leaves the job without an evaluation; the adapter stands."""
    settings, job_id, scored = context.settings, context.job.id, prepared.scored
    if settings.auto_eval_rows == 0 or not scored.scored:
        return None
    event(
        job_id,
        "job.evaluating",
        f"Evaluating: base model against adapter on {len(scored.scored)} {scored.split} rows.",
    )
    try:
        evaluation = evaluate_adapter(
            location,
            context.workdir / "adapter",
            scored.scored,
            split=scored.split,
            samples=settings.auto_eval_samples,
            bf16=bf16,
            model_kwargs=prepared.model_kwargs,
        )
    except Exception as exc:
        logger.exception("job %s: the automatic evaluation failed", job_id)
        event(
            job_id,
            "job.evaluation_failed",
            f"The automatic evaluation failed ({type(exc).__name__}: {exc}); the adapter is "
            "kept without it.",
            level="warning",
        )
        return None
    event(
        job_id,
        "job.evaluated",
        f"Eval loss on {evaluation['rows']} {evaluation['split']} rows: base "
        f"{evaluation['base_eval_loss']:.4f}, adapter {evaluation['adapter_eval_loss']:.4f} "
        f"({evaluation['improvement']:+.1%}).",
        **{key: value for key, value in evaluation.items() if key != "samples"},
    )
    return evaluation


def _record_throughput(
    session: Session,
    job: Job,
    device: Device,
    processes: int,
    progress: dict[str, Any],
    result: TrainingResult,
) -> None:
    """The speed this job trained at, for plans to estimate later jobs' time from. Jobs on a
    second attempt are left out: their clock started with the first."""
    speed = progress.get("tokens_per_second")
    started, attempt = session.execute(
        select(Job.started_at, Job.attempt).where(Job.id == job.id)
    ).one()
    if not speed or not result.trained_tokens or started is None or attempt != 1:
        return
    session.add(
        Throughput(
            job_id=job.id,
            accelerator=device.accelerator_class,
            device_name=device.name[:200],
            processes=processes,
            base_model=job.base_model,
            trained_tokens=result.trained_tokens,
            tokens_per_second=float(speed),
            job_seconds=(utcnow() - started).total_seconds(),
            created_at=utcnow(),
        )
    )


@dataclass(frozen=True)
class NewAdapter:
    id: str
    owner: str
    job_id: str
    base_model: str
    name: str
    path: str
    sha256: str
    size_bytes: int
    rank: int

    def row(self) -> Adapter:
        return Adapter(**self.__dict__, created_at=utcnow())


def _register_adapter(context: JobContext) -> NewAdapter:
    """Publish the saved adapter to the artifact store and build its row."""
    job, settings = context.job, context.settings
    adapter_id = new_id("adapter")
    local = context.workdir / "adapter"
    digest = hashlib.sha256((local / "adapter_model.safetensors").read_bytes()).hexdigest()
    size = sum(path.stat().st_size for path in local.rglob("*") if path.is_file())
    key = f"adapters/{adapter_id}"
    artifact_store(settings).put_dir(local, key)
    shutil.rmtree(local, ignore_errors=True)
    return NewAdapter(
        id=adapter_id,
        owner=job.owner,
        job_id=job.id,
        base_model=job.base_model,
        name=job.fine_tuned_model,
        path=key,
        sha256=digest,
        size_bytes=size,
        rank=int(job.lora["r"]),
    )


def _finish_stopped(context: JobContext, reason: str) -> None:
    job_id, me = context.job.id, context.worker_id
    if reason == "claim_lost":
        logger.warning("job %s: this worker lost its claim; leaving it to its new attempt", job_id)
        return
    if reason == "shutdown":
        _hand_back(context)
        return

    def cancel() -> None:
        with unit_of_work() as session:
            transition(
                session,
                job_id,
                JobStatus.CANCELLED,
                "Cancelled by request; training stopped.",
                claimed_by=me,
            )

    with_retries(cancel, what=f"cancel job {job_id}")


def _hand_back(context: JobContext) -> None:
    """Back to the queue, not counted as an attempt; the next worker resumes from the checkpoint
    saved on the way out.

    No message is sent from here: this worker would take it itself before it stops. The job is
    marked as long waiting instead, so the scheduler sends it at its next pass, when this worker
    no longer consumes.
    """
    job, settings = context.job, context.settings
    step = context.checkpoints.last_step if context.checkpoints else None
    saved = f"checkpoint at step {step} saved" if step is not None else "no checkpoint yet"
    overdue = utcnow() - timedelta(seconds=settings.requeue_queued_after_seconds + 1)

    def hand_back() -> None:
        with unit_of_work() as session:
            transition(
                session,
                job.id,
                JobStatus.QUEUED,
                f"Worker {context.worker_id} is shutting down: {saved}; queued again.",
                level="warning",
                claimed_by=context.worker_id,
                data={"checkpoint_step": step, "reason": "worker_shutdown"},
                values={"worker": None, "enqueued_at": overdue, "attempt": Job.attempt - 1},
            )

    with_retries(hand_back, what=f"hand job {job.id} back")


def _fail(job_id: str, me: str, code: str, message: str, detail: Any = None) -> None:
    with_retries(lambda: _write_failure(job_id, me, code, message, detail), what="fail a job")


def _write_failure(job_id: str, me: str, code: str, message: str, detail: Any) -> None:
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
