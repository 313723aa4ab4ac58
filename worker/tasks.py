"""Celery tasks. They take ids, reload their rows, and leave all state in SQL."""

from __future__ import annotations

import logging

from celery.exceptions import Reject

from app.logs import job_logging
from app.queue import EXPORT_ADAPTER_TASK, RUN_JOB_TASK
from worker.celery_app import celery_app, wait_for_warm_up

logger = logging.getLogger(__name__)


@celery_app.task(name=RUN_JOB_TASK)  # type: ignore[untyped-decorator]
def run_job(job_id: str) -> None:
    wait_for_warm_up()  # before the worker's modules import any of the training libraries
    from worker.runner import run_job as run
    from worker.runner import shutting_down

    if shutting_down.is_set():
        raise Reject("this worker is shutting down", requeue=True)
    with job_logging(job_id):  # every line logged while it runs says which job
        run(job_id)


@celery_app.task(name=EXPORT_ADAPTER_TASK)  # type: ignore[untyped-decorator]
def export_adapter(export_id: str) -> None:
    wait_for_warm_up()
    from worker.exporting import run_export
    from worker.runner import shutting_down

    if shutting_down.is_set():
        raise Reject("this worker is shutting down", requeue=True)
    run_export(export_id)
