"""Run one job by id: claim it, run its stages (worker/stages.py: validate, train, evaluate,
publish, finish), and end it on every exit path.

Every exit path ends the job in a terminal state (or hands it back to the queue when this worker
lost its claim): no exception leaves a job in `running`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import FrameType
from typing import Any

from sqlalchemy import func

from app.db import unit_of_work, utcnow
from app.errors import TuneserveError
from app.jobs import repository
from app.jobs.models import ACTIVE_STATUSES, Job, JobStatus
from app.jobs.transitions import transition
from app.settings import get_settings
from worker import stages
from worker.heartbeat import Heartbeat
from worker.sql import with_retries
from worker.stages import JobContext, JobStopped

logger = logging.getLogger(__name__)


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
            current = repository.claim_state(session, job_id)
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


def _run_claimed(context: JobContext) -> None:
    """The stages of worker/stages.py, each in its own transaction, each timed."""
    with context.timed("validate"):
        validated = stages.validate(context)
    with context.timed("train"):
        trained = stages.train(context, validated)
    with context.timed("evaluate"):
        evaluation = stages.evaluate_saved_adapter(context, validated, trained)
    context.check_stop()
    with context.timed("publish"):
        adapter = stages.publish(context, validated, trained, evaluation)
    stages.finish(context, validated, trained, adapter, evaluation)


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
