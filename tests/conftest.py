"""Test set-up shared by every test (the environment comes first: see tests/fixtures/env.py)."""

import pytest

from tests.fixtures import env  # sets TUNESERVE_* before tuneserve is imported


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    env.drop_session_stack()


def pytest_report_header() -> str:
    database = env.TEST_ENV.get("TUNESERVE_DATABASE_URL", "SQLite in the session's data dir")
    return f"tuneserve stack: {env.STACK} (database: {database})"


pytest_plugins = ["tests.fixtures.database", "tests.fixtures.models", "tests.fixtures.service"]
