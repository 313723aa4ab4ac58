"""Test set-up shared by every test (the environment comes first: see tests/fixtures/env.py)."""

import tests.fixtures.env  # noqa: F401  (sets TUNESERVE_* before tuneserve is imported)

pytest_plugins = ["tests.fixtures.database", "tests.fixtures.models", "tests.fixtures.service"]
