"""Periodic upkeep: find jobs whose worker died or whose queue message was lost, and send the
webhooks of jobs that ended (app/webhooks/outbox.py).

It runs as its own small process (`tuneserve scheduler`), reading SQL directly, rather than as a
Celery beat task: a beat task needs a free worker, and with one worker per GPU busy training for
hours, the upkeep would wait on the very worker whose death it has to notice.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from app.db import unit_of_work, utcnow
from app.jobs import repository
from app.jobs.models import JobStatus
from app.jobs.transitions import transition
from app.queue import enqueue_job
from app.settings import Settings, get_settings
from app.webhooks.outbox import deliver_due

logger = logging.getLogger(__name__)


def reap_lost_jobs(settings: Settings) -> dict[str, list[str]]:
    """One pass. Returns the ids it re-queued, failed, cancelled and re-sent."""
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.stale_job_seconds)
    outcome: dict[str, list[str]] = {"requeued": [], "failed": [], "cancelled": [], "resent": []}
    queues: dict[str, str] = {}
    with unit_of_work() as session:
        for job in repository.stale_jobs(session, stale_before=stale_before):
            silent = f"Worker {job.worker} stopped beating (last heartbeat {job.heartbeat_at})."
            if job.cancel_requested_at is not None:
                if transition(
                    session, job.id, JobStatus.CANCELLED, f"{silent} Cancelled as requested."
                ):
                    outcome["cancelled"].append(job.id)
            elif job.attempt >= settings.max_attempts:
                message = (
                    f"{silent} The job's worker died {job.attempt} times (TUNESERVE_MAX_ATTEMPTS="
                    f"{settings.max_attempts}); it is not retried again. Check the worker logs "
                    "(out of host memory?) and submit it again, perhaps with a smaller batch_size."
                )
                if transition(
                    session,
                    job.id,
                    JobStatus.FAILED,
                    message,
                    level="error",
                    values={"error": {"code": "worker_lost", "message": message, "detail": None}},
                ):
                    outcome["failed"].append(job.id)
            elif transition(
                session,
                job.id,
                JobStatus.QUEUED,
                f"{silent} Queued again for another attempt.",
                level="warning",
                values={"worker": None, "enqueued_at": now},
            ):
                outcome["requeued"].append(job.id)
                queues[job.id] = job.queue
        resend_before = now - timedelta(seconds=settings.requeue_queued_after_seconds)
        lost = repository.take_lost_messages(session, enqueued_before=resend_before, now=now)
        outcome["resent"].extend(lost)
        queues.update(lost)
    # Messages go out after the commit; a duplicate is harmless, the claim takes one.
    for job_id in outcome["requeued"] + outcome["resent"]:
        enqueue_job(job_id, queues[job_id])
    return outcome


def send_webhooks(settings: Settings, stop: threading.Event) -> None:
    """Until stop: send the webhooks that are due, every webhook poll interval."""
    while not stop.is_set():
        try:
            deliver_due(settings)
        except Exception:
            logger.exception("sending webhooks failed; trying again next interval")
        stop.wait(settings.webhook_poll_seconds)


def run_scheduler(stop: threading.Event | None = None) -> None:
    """Until stop: look for lost jobs every reaper interval; webhooks go out from a thread of
    their own, so a slow receiver or a wait on the database never delays a reaper pass (a pass
    delayed past a database outage would see every heartbeat as stale)."""
    settings = get_settings()
    stop = stop or threading.Event()
    webhooks = threading.Thread(
        target=send_webhooks, args=(settings, stop), name="webhooks", daemon=True
    )
    webhooks.start()
    logger.info(
        "scheduler: checking for lost jobs every %g s, sending webhooks every %g s",
        settings.reaper_interval_seconds,
        settings.webhook_poll_seconds,
    )
    while not stop.is_set():
        try:
            outcome = reap_lost_jobs(settings)
            if any(outcome.values()):
                logger.info("scheduler: %s", outcome)
        except Exception:
            logger.exception("scheduler pass failed; trying again next interval")
        stop.wait(settings.reaper_interval_seconds)
    webhooks.join(timeout=settings.webhook_timeout_seconds + 5)
