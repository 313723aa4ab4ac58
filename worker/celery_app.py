"""The Celery app. The broker only carries "run job X" messages; SQL holds all job state."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

from app.logs import configure_logging
from app.settings import get_settings

logger = logging.getLogger(__name__)
RUN_JOB_TASK = "tuneserve.run_job"
TRAINING_QUEUE = "training"


def transport_options(broker_url: str) -> dict[str, object]:
    if broker_url.startswith(("redis://", "rediss://")):
        # Redis redelivers an unacknowledged message after the visibility timeout: make it
        # longer than any job so a running job is not delivered twice.
        return {"visibility_timeout": 7 * 24 * 3600}
    # The SQLAlchemy transport hands its options to create_engine; wait on a locked SQLite file
    # rather than failing.
    return {"connect_args": {"timeout": 30}} if broker_url.startswith("sqla+sqlite") else {}


def make_celery() -> Celery:
    settings = get_settings()
    settings.ensure_dirs()
    app = Celery("tuneserve", broker=settings.celery_broker_url, include=["worker.tasks"])
    app.conf.update(
        # A job is acknowledged only after it ran, and handed back if its worker process dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=TRAINING_QUEUE,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options(settings.celery_broker_url),
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app


celery_app = make_celery()


# Logging of the worker: tuneserve's (JSON lines by default, TUNESERVE_LOG_FORMAT), not Celery's.
@signals.celeryd_init.connect  # type: ignore[untyped-decorator]
def _log_from_the_start(instance: Any, **_: Any) -> None:
    # Before Celery's first words (its check of privileges may warn), and without its banner,
    # whose many lines are not JSON: _log_start says the same in one line.
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    if settings.log_format == "json":
        instance.quiet = True


@signals.setup_logging.connect  # type: ignore[untyped-decorator]
def _setup_logging(**_: Any) -> None:
    # With a receiver here Celery neither configures logging nor sends stdout and stderr to a
    # logger: both are done here instead, so what a job prints (progress bars, libraries'
    # output) becomes log lines that carry the job id too.
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    if celery_app.conf.worker_redirect_stdouts:
        celery_app.log.redirect_stdouts(celery_app.conf.worker_redirect_stdouts_level)


@signals.celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _log_start(sender: str, instance: Any, **_: Any) -> None:
    if get_settings().log_format == "json":
        with instance.app.connection_for_read() as connection:
            broker = connection.as_uri()  # without the password
        queues = ", ".join(sorted(instance.app.amqp.queues))
        logger.info("worker %s consuming %s from %s", sender, queues, broker)


def enqueue_job(job_id: str, queue: str = TRAINING_QUEUE) -> None:
    """Send "run job X". The job row is already committed: if the broker cannot take the message
    now, the scheduler sends it again later (TUNESERVE_REQUEUE_QUEUED_AFTER_SECONDS)."""
    try:
        celery_app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)
    except Exception:
        logger.exception(
            "could not enqueue job %s on %s; the scheduler will resend it", job_id, queue
        )
