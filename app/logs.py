"""Logging set-up shared by every tuneserve process: one JSON object per line (or plain text),
with the id of the job being run on every line logged while a worker runs it."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from app.settings import LogFormat, get_settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
# The loggers uvicorn configures with handlers of its own: their lines go through ours instead.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
_HANDLER_NAME = "tuneserve"

_job_id: ContextVar[str | None] = ContextVar("tuneserve_job_id", default=None)


@contextmanager
def job_logging(job_id: str) -> Iterator[None]:
    """Every line logged in this context (this thread, any logger) carries `job_id`."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


def current_job_id() -> str | None:
    return _job_id.get()


class JobIdFilter(logging.Filter):
    """Sets `record.job_id`: the job of `job_logging()`, unless the call passed one in `extra`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = _job_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601, UTC), level, logger, process, message, then
    job_id when known and exception (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            line["job_id"] = job_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, plus `[job <id>]` after the message when a job is known."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        job_id = getattr(record, "job_id", None)
        return f"{line} [job {job_id}]" if job_id is not None else line


def _timestamp(created: float) -> str:
    moment = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


def make_formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure_logging(level: str, log_format: LogFormat | None = None) -> None:
    """Root logger at `level`, one handler on stderr writing `log_format` lines (default:
    TUNESERVE_LOG_FORMAT). Idempotent: a second call replaces the first's level and format.
    uvicorn's loggers and Python warnings go through the same handler."""
    chosen = log_format or get_settings().log_format
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        # The real stderr even when a Celery worker has replaced sys.stderr by a logger.
        handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.addFilter(JobIdFilter())
        root.addHandler(handler)
    handler.setFormatter(make_formatter(chosen))
    for name in UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        if uvicorn_logger.handlers:  # none: switched off (uvicorn --no-access-log)
            uvicorn_logger.handlers.clear()
            uvicorn_logger.propagate = True
    logging.captureWarnings(True)
