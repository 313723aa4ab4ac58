"""The embedded broker (kombu's SQLAlchemy transport on SQLite): the worker polls it often, so a
job waits about 0.05 s for its worker instead of half a second, and a message still goes through."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SEND_AND_TAKE = """
from kombu import Queue
from app.queue import enqueue_job
from worker.celery_app import EMBEDDED_BROKER_POLL_SECONDS, celery_app

enqueue_job("job-1")
with celery_app.connection_for_read() as connection:
    print(connection.transport.polling_interval == EMBEDDED_BROKER_POLL_SECONDS)
    queue = Queue("training").bind(connection.default_channel)
    message = queue.get(no_ack=True)
    print(message.headers["task"], message.headers["argsrepr"])
"""


def test_the_worker_polls_the_embedded_broker_often_and_takes_a_job(tmp_path: Path) -> None:
    env = {**os.environ, "TUNESERVE_DATA_DIR": str(tmp_path)}
    env.pop("TUNESERVE_BROKER_URL", None)  # the embedded default, whatever the run uses
    found = subprocess.run(
        [sys.executable, "-c", SEND_AND_TAKE], capture_output=True, text=True, env=env, timeout=120
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.split("\n")[:2] == ["True", "tuneserve.run_job ['job-1']"], found.stdout
