"""SQL from a worker survives a database that is away for a while: retry, then give up loudly."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError

logger = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_SECONDS = 120.0


def with_retries(action: Callable[[], T], *, what: str, seconds: float = RETRY_SECONDS) -> T:
    """Run action (one unit of work); on a connection-level error wait and run it again.

    Each try is a whole transaction, so a retry never sees half of the previous one.
    """
    deadline = time.monotonic() + seconds
    delay = 0.5
    while True:
        try:
            return action()
        except DBAPIError as exc:
            if not exc.connection_invalidated and not _is_transient(exc):
                raise
            if time.monotonic() >= deadline:
                raise
            logger.warning("could not %s (%s); retrying in %.1f s", what, exc.orig, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _is_transient(exc: DBAPIError) -> bool:
    # OperationalError covers "connection refused", "server closed the connection", SQLite's
    # "database is locked": all worth waiting out. Integrity or programming errors are not.
    from sqlalchemy.exc import OperationalError

    return isinstance(exc, OperationalError)
