"""A background thread that keeps a claimed job's heartbeat fresh and notices cancel requests.

The heartbeat is what the scheduler's reaper reads to find jobs whose worker died; the same
loop reads `cancel_requested_at` once a second so training stops within about one step.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time

from app.db import unit_of_work, utcnow
from app.jobs import repository
from app.jobs.models import ACTIVE_STATUSES

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0


class Heartbeat:
    def __init__(self, job_id: str, worker_id: str, interval_seconds: float) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.interval_seconds = interval_seconds
        self.stop_requested = threading.Event()
        # Once stop_requested is set: "cancelled", "claim_lost" or "shutdown" (SIGTERM).
        self.reason: str | None = None
        self._done = threading.Event()
        # Run in a copy of the starting thread's context: its log lines carry the job id.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name=f"heartbeat-{job_id}", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        last_beat = time.monotonic()
        while not self._done.wait(POLL_SECONDS):
            try:
                beat_now = time.monotonic() - last_beat >= self.interval_seconds
                self._check(beat=beat_now)
                if beat_now:
                    last_beat = time.monotonic()
            except Exception:  # a database hiccup must not kill the job; try again next tick
                logger.exception("heartbeat of %s failed", self.job_id)

    def _check(self, *, beat: bool) -> None:
        with unit_of_work() as session:
            if beat:
                repository.beat(session, job_id=self.job_id, worker_id=self.worker_id, now=utcnow())
            row = repository.stop_signals(session, self.job_id)
        if row is None:
            self.request_stop("claim_lost")
        elif row.cancel_requested_at is not None:
            self.request_stop("cancelled")
        elif row.status not in ACTIVE_STATUSES or row.worker != self.worker_id:
            # The reaper gave the job to another attempt (we looked dead): stop training it.
            self.request_stop("claim_lost")

    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            self.reason = reason
            self.stop_requested.set()
