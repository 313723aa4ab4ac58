"""Apply the Alembic migrations shipped in the `migrations` package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from app.settings import get_settings


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["database_url"] = database_url or get_settings().sqlalchemy_url
    return config


def upgrade_database(database_url: str | None = None) -> None:
    get_settings().ensure_dirs()
    command.upgrade(alembic_config(database_url), "head")
