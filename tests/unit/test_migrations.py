"""The Alembic migrations build the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect

from app.db import make_engine
from app.migrate import alembic_config
from tests.fixtures.database import create_postgres_database, drop_postgres_database

TABLES = {"jobs", "job_events", "job_metrics", "adapters", "files", "alembic_version"}


def _upgrade_and_check(url: str) -> None:
    config = alembic_config(url)
    command.upgrade(config, "head")
    command.check(config)  # raises when models and migrations disagree
    engine = make_engine(url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    command.downgrade(config, "base")
    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_migrations_match_models_on_sqlite(tmp_path) -> None:
    _upgrade_and_check(f"sqlite:///{tmp_path / 'check.sqlite'}")


def test_migrations_match_models_on_postgres() -> None:
    try:
        url = create_postgres_database()
    except Exception as exc:  # noqa: BLE001
        if __import__("os").environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")
    try:
        _upgrade_and_check(url)
    finally:
        drop_postgres_database(url)
