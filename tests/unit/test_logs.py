"""The JSON log lines: their fields, the job id of `job_logging()`, exceptions; the text format;
configure_logging's one handler, uvicorn's loggers and warnings routed through it."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from app.logs import (
    JobIdFilter,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    current_job_id,
    job_logging,
)


@pytest.fixture
def lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose records go, JSON, to a StringIO through the handler set-up of app.logs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(JobIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def read(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_a_line_is_one_json_object_with_the_fields(
    lines: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = lines
    logger.info("loaded %s into slot %d", "adapter-x", 2)
    [line] = read(stream)
    assert set(line) == {"ts", "level", "logger", "process", "message"}
    assert line["level"] == "INFO" and line["logger"] == "tests.logs"
    assert line["message"] == "loaded adapter-x into slot 2"
    assert line["process"] == "MainProcess"
    moment = datetime.fromisoformat(line["ts"])
    assert line["ts"].endswith("Z") and moment.utcoffset() is not None
    assert moment.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_lines_logged_in_job_logging_carry_the_job_id(
    lines: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = lines
    logger.info("before")
    with job_logging("ftjob-1"):
        assert current_job_id() == "ftjob-1"
        logging.getLogger("tests.logs.library").warning("a library's warning")  # propagates
        with job_logging("ftjob-2"):
            logger.info("nested")
        logger.info("back")
    logger.info("after", extra={"job_id": "ftjob-3"})  # named by the call itself
    assert current_job_id() is None
    found = [(line["message"], line.get("job_id")) for line in read(stream)]
    assert found == [
        ("before", None),
        ("a library's warning", "ftjob-1"),
        ("nested", "ftjob-2"),
        ("back", "ftjob-1"),
        ("after", "ftjob-3"),
    ]


def test_the_exception_is_in_the_line_and_newlines_stay_escaped(
    lines: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = lines
    try:
        raise ValueError("bad row\nsecond line")
    except ValueError:
        logger.exception("job failed: «%s»", "ü")
    [line] = read(stream)  # one line despite the newlines
    assert line["message"] == "job failed: «ü»"
    assert line["exception"].startswith("Traceback (most recent call last)")
    assert "ValueError: bad row\nsecond line" in line["exception"]


def test_the_text_format_names_the_job() -> None:
    record = logging.LogRecord("worker.runner", logging.INFO, __file__, 1, "step %d", (3,), None)
    JobIdFilter().filter(record)
    assert TextFormatter().format(record).endswith("worker.runner: step 3")
    with job_logging("ftjob-9"):
        record = logging.LogRecord("worker.runner", logging.INFO, __file__, 1, "step", (), None)
        JobIdFilter().filter(record)
    assert TextFormatter().format(record).endswith("worker.runner: step [job ftjob-9]")


@pytest.fixture
def clean_root() -> Iterator[logging.Logger]:
    """The root and uvicorn loggers as they were, after the test changed them."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    # Without the handler an app made earlier in this session may have put there.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != "tuneserve"]
    logging.captureWarnings(False)  # so that configure_logging's capture starts in this test
    uvicorn = logging.getLogger("uvicorn")
    uvicorn_saved = uvicorn.handlers[:], uvicorn.propagate
    access = logging.getLogger("uvicorn.access")
    access_saved = access.handlers[:], access.propagate
    yield root
    root.handlers[:], root.level = saved[0], saved[1]
    uvicorn.handlers[:], uvicorn.propagate = uvicorn_saved
    access.handlers[:], access.propagate = access_saved
    logging.captureWarnings(False)


def test_configure_logging_is_one_handler_for_the_app_uvicorn_and_warnings(
    clean_root: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", stream)
    uvicorn = logging.getLogger("uvicorn")
    uvicorn.handlers[:] = [logging.StreamHandler(io.StringIO())]  # as uvicorn configures it
    uvicorn.propagate = False
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []  # --no-access-log: no handler, no propagation
    access.propagate = False

    configure_logging("info", "text")
    configure_logging("info", "json")  # again: replaces the format, adds no second handler
    ours = [h for h in clean_root.handlers if h.get_name() == "tuneserve"]
    assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
    assert clean_root.level == logging.INFO
    assert uvicorn.handlers == [] and uvicorn.propagate
    assert access.propagate is False  # stays off

    with job_logging("ftjob-7"), warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.getLogger("uvicorn.error").info("Started server process [1]")
        warnings.warn("deprecated knob", FutureWarning, stacklevel=1)
    logging.getLogger("uvicorn.access").info("GET / 200")
    found = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["logger"], line["job_id"]) for line in found] == [
        ("uvicorn.error", "ftjob-7"),
        ("py.warnings", "ftjob-7"),
    ]
    assert "FutureWarning: deprecated knob" in found[1]["message"]
