"""GET /readyz: whether this api reaches its SQL database and its Celery broker, each within
CHECK_SECONDS, so a load balancer stops sending requests to a replica that cannot serve them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from app.db import get_engine
from app.settings import Settings

T = TypeVar("T")

CHECK_SECONDS = 2.0


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    seconds: float
    error: str | None = None


def in_background(work: Callable[[], T], name: str) -> Future[T]:
    """`work()` in a daemon thread of its own: its caller can stop waiting for it (a connection
    attempt to a host that does not answer cannot be interrupted, only abandoned)."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def readiness(settings: Settings, timeout: float = CHECK_SECONDS) -> dict[str, CheckResult]:
    """The database and broker checks, run side by side: `timeout` seconds at most in all."""
    started = time.monotonic()
    checks = {
        "database": in_background(lambda: _timed(check_database), "readyz-database"),
        "broker": in_background(lambda: _timed(lambda: check_broker(settings)), "readyz-broker"),
    }
    results = {}
    for name, check in checks.items():
        try:
            seconds = check.result(timeout=max(timeout - (time.monotonic() - started), 0))
            results[name] = CheckResult(ok=True, seconds=seconds)
        except TimeoutError:
            message = f"no answer within {timeout:g} s"
            results[name] = CheckResult(ok=False, seconds=_since(started), error=message)
        except Exception as error:
            results[name] = CheckResult(ok=False, seconds=_since(started), error=describe(error))
    return results


def check_database() -> None:
    """`SELECT 1` on a connection of the pool the requests use, outside a transaction (on
    SQLite, a transaction would wait for the write lock)."""
    connection = get_engine().raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT 1")
        cursor.fetchall()
        cursor.close()
    finally:
        connection.close()


def check_broker(settings: Settings) -> None:
    """Connect to the broker and declare the default queue: a round trip on every transport
    (the SQLAlchemy transport's `connect` alone does not reach its database)."""
    from kombu.connection import Connection

    from app.queue import transport_options

    url = settings.celery_broker_url
    options = transport_options(url)
    connection: Any = Connection(url, connect_timeout=CHECK_SECONDS, transport_options=options)  # type: ignore[no-untyped-call]
    with connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
        connection.default_channel.queue_declare(queue=settings.default_queue, passive=False)


def describe(error: BaseException) -> str:
    """The error in one line, the driver's message rather than SQLAlchemy's wrapper."""
    cause = getattr(error, "orig", None) or error
    message = " ".join(str(cause).split())
    return f"{type(cause).__name__}: {message}"[:500]


def _timed(check: Callable[[], None]) -> float:
    started = time.monotonic()
    check()
    return _since(started)


def _since(started: float) -> float:
    return round(time.monotonic() - started, 4)
