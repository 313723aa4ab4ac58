"""Sending work to the workers: tasks go by name over the broker, so the api never imports the
worker (nor torch, nor the task code). The broker only carries "run job X"; SQL holds all state."""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from app.settings import Settings, get_settings

logger = logging.getLogger(__name__)
RUN_JOB_TASK = "tuneserve.run_job"
EXPORT_ADAPTER_TASK = "tuneserve.export_adapter"
TRAINING_QUEUE = "training"


def transport_options(broker_url: str) -> dict[str, object]:
    if broker_url.startswith(("redis://", "rediss://")):
        # Redis redelivers an unacknowledged message after the visibility timeout: make it
        # longer than any job so a running job is not delivered twice.
        return {"visibility_timeout": 7 * 24 * 3600}
    # The SQLAlchemy transport hands its options to create_engine; wait on a locked SQLite file
    # rather than failing.
    return {"connect_args": {"timeout": 30}} if broker_url.startswith("sqla+sqlite") else {}


def celery_config(broker_url: str) -> dict[str, Any]:
    """What the sender and the worker agree on."""
    return {
        # A job is acknowledged only after it ran, and handed back if its worker process dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_default_queue": TRAINING_QUEUE,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport_options(broker_url),
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }


@cache
def _sender(broker_url: str) -> Any:
    """A Celery app that only sends, built on first use (one per broker URL)."""
    from celery import Celery

    sender = Celery("tuneserve-sender", broker=broker_url, set_as_current=False)
    sender.conf.update(celery_config(broker_url))
    return sender


def enqueue_job(job_id: str, queue: str = TRAINING_QUEUE, settings: Settings | None = None) -> None:
    """Send "run job X". The job row is already committed: if the broker cannot take the message
    now, the scheduler sends it again later (TUNESERVE_REQUEUE_QUEUED_AFTER_SECONDS)."""
    broker_url = (settings or get_settings()).celery_broker_url
    try:
        _sender(broker_url).send_task(RUN_JOB_TASK, args=[job_id], queue=queue)
    except Exception:
        logger.exception(
            "could not enqueue job %s on %s; the scheduler will resend it", job_id, queue
        )


def enqueue_export(export_id: str, settings: Settings | None = None) -> None:
    """Send "make export X" to the training queue's workers (they hold the models). A message
    the broker cannot take now leaves the export queued; asking for it again resends it."""
    broker_url = (settings or get_settings()).celery_broker_url
    try:
        _sender(broker_url).send_task(EXPORT_ADAPTER_TASK, args=[export_id], queue=TRAINING_QUEUE)
    except Exception:
        logger.exception("could not enqueue export %s", export_id)
