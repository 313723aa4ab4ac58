"""Request dependencies: one SQL session per request, settings, the calling owner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Annotated, TypeVar

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db import unit_of_work
from app.errors import Unauthorized
from app.keys.service import Caller, authenticate
from app.rate_limit import check_rate
from app.settings import Settings, get_settings

T = TypeVar("T")

# Requests that use the database at once. Below both the SQL pool (15 connections) and half the
# thread pool (40 threads): a sync endpoint needs a second thread to serialize its answer before
# its session commits, so if every thread could be an endpoint waiting for the database lock,
# the session holding that lock could never finish (seen with 50 simultaneous POST /jobs).
DATABASE_SLOTS = 10
_slots: asyncio.Semaphore | None = None


def _database_slots() -> asyncio.Semaphore:
    global _slots
    if _slots is None:
        _slots = asyncio.Semaphore(DATABASE_SLOTS)
    return _slots


async def get_session() -> AsyncIterator[Session]:
    """One session per request, committed after the endpoint returns (rolled back if it raised);
    then the messages queued with after_commit() are sent, in a thread (the broker may block)."""
    async with _database_slots():
        with unit_of_work(run_after_commit=False) as session:
            yield session
    for callback in session.info.pop("after_commit", []):
        await run_in_threadpool(callback)


async def _in_own_transaction(work: Callable[[Session], T]) -> T:
    async with _database_slots():

        def run() -> T:
            with unit_of_work() as session:
                return work(session)

        return await run_in_threadpool(run)


_bearer = HTTPBearer(
    auto_error=False,
    description="An API key: `tuneserve keys create --name NAME` prints one; `tuneserve up` "
    "saves the local key in DATA_DIR/api_key.",
)
HOW_TO_GET_A_KEY = (
    "`tuneserve keys create --name NAME` makes one; `tuneserve up` saved the local key in "
    "DATA_DIR/api_key"
)


async def get_caller(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Caller:
    """The key's owner; 401 without a valid key, 429 past the key's requests per minute."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise Unauthorized(
            f"This endpoint needs an API key: send `Authorization: Bearer <key>`. "
            f"{HOW_TO_GET_A_KEY}.",
            code="missing_api_key",
            headers=challenge,
        )
    secret = credentials.credentials
    caller = await _in_own_transaction(lambda session: authenticate(session, secret))
    if caller is None:
        raise Unauthorized(
            f"The API key is not valid (unknown or revoked). {HOW_TO_GET_A_KEY}.",
            headers=challenge,
        )
    check_rate(
        caller.key_id,
        per_minute=settings.rate_limit_per_minute,
        storage_url=settings.rate_limit_storage_url,
    )
    return caller


def get_owner(caller: Annotated[Caller, Depends(get_caller)]) -> str:
    return caller.owner


# scope="function": commit (and send queued messages) before the response goes out, so a client
# that reads right after a 201 sees what it created.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CurrentOwner = Annotated[str, Depends(get_owner)]
