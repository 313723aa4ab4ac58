"""Request dependencies: one SQL session per request, settings, the current owner."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from app.db import unit_of_work
from app.settings import Settings, get_settings

LOCAL_OWNER = "local"


def get_session() -> Iterator[Session]:
    with unit_of_work() as session:
        yield session


def get_owner() -> str:
    # Every row already carries its owner; API keys map keys to owners when auth is enabled.
    return LOCAL_OWNER


# scope="function": commit (and send queued messages) before the response goes out, so a client
# that reads right after a 201 sees what it created.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CurrentOwner = Annotated[str, Depends(get_owner)]
