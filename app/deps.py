"""Request dependencies: one SQL session per request, settings, the current owner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db import unit_of_work
from app.settings import Settings, get_settings

LOCAL_OWNER = "local"


# Requests that use the database at once. Below both the SQL pool (15 connections) and half the
# thread pool (40 threads): a sync endpoint needs a second thread to serialize its answer before
# its session commits, so if every thread could be an endpoint waiting for the database lock,
# the session holding that lock could never finish (seen with 50 simultaneous POST /jobs).
DATABASE_SLOTS = 10
_slots: asyncio.Semaphore | None = None


async def get_session() -> AsyncIterator[Session]:
    """One session per request, committed after the endpoint returns (rolled back if it raised);
    then the messages queued with after_commit() are sent, in a thread (the broker may block)."""
    global _slots
    if _slots is None:
        _slots = asyncio.Semaphore(DATABASE_SLOTS)
    async with _slots:
        with unit_of_work(run_after_commit=False) as session:
            yield session
    for callback in session.info.pop("after_commit", []):
        await run_in_threadpool(callback)


def get_owner() -> str:
    # Every row already carries its owner; API keys map keys to owners when auth is enabled.
    return LOCAL_OWNER


# scope="function": commit (and send queued messages) before the response goes out, so a client
# that reads right after a 201 sees what it created.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CurrentOwner = Annotated[str, Depends(get_owner)]
