"""Create, list, revoke and check API keys.

A key is `ts_` and 43 random URL-safe characters (256 bits). Only its SHA-256 is stored: a
random key of that length needs no slow password hash, and a leaked table reveals no key.
Every key belongs to an owner; the jobs, files and adapters a key creates belong to that owner,
and keys of the same owner share them.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import unit_of_work, utcnow
from app.errors import InvalidRequest, NotFound
from app.ids import new_id
from app.keys.models import ApiKey

KEY_PREFIX = "ts_"
LOCAL_OWNER = "local"
OWNER = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# last_used_at is written at most this often per key, so reads stay reads.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class Caller:
    key_id: str
    owner: str


@dataclass(frozen=True)
class NewKey:
    row: ApiKey
    secret: str


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, *, name: str, owner: str | None = None) -> NewKey:
    """A new key for `owner` (default: the name, which must then be a valid owner)."""
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise InvalidRequest("name: give 1 to 100 characters.", code="invalid_key_name")
    owner = owner if owner is not None else name.lower()
    if not OWNER.match(owner):
        raise InvalidRequest(
            f"owner {owner!r}: use 1 to 64 lowercase letters, digits, '-' or '_' (starting with "
            "a letter or digit); pass --owner when the name is not one.",
            code="invalid_owner",
        )
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"),
        name=name,
        owner=owner,
        prefix=secret[:10],
        sha256=digest(secret),
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return NewKey(row=row, secret=secret)


def list_keys(session: Session, *, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke_key(session: Session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"No API key {key_id!r}; `tuneserve keys list` shows them.")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def authenticate(session: Session, secret: str) -> Caller | None:
    """The caller a key belongs to, or None for an unknown or revoked key."""
    if not secret.startswith(KEY_PREFIX) or len(secret) > 200:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.sha256 == digest(secret)))
    if row is None or row.revoked_at is not None:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        row.last_used_at = now
    return Caller(key_id=row.id, owner=row.owner)


def ensure_local_key(key_file: Path) -> str | None:
    """On first start, make the local key (owner "local") and save it to key_file (mode 0600);
    returns the new key, or None when key_file already holds one."""
    if key_file.exists():
        return None
    with unit_of_work() as session:
        new = create_key(session, name="local", owner=LOCAL_OWNER)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: two processes starting at once never overwrite each other's key.
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(new.secret + "\n")
    return new.secret


def read_key_file(key_file: Path) -> str | None:
    try:
        return key_file.read_text().strip() or None
    except OSError:
        return None
