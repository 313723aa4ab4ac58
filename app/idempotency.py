"""`Idempotency-Key` on create calls (POST /jobs, POST /files): a retry of the same request
gets the first answer back instead of creating a second job or file."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from app.errors import Conflict, InvalidRequest

IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,200}")


class InvalidIdempotencyKey(InvalidRequest):
    code = "invalid_idempotency_key"


class IdempotencyKeyReused(Conflict):
    code = "idempotency_key_reused"


def check_idempotency_key(key: str | None) -> str | None:
    """The Idempotency-Key header of a create call, if it has one: 1 to 200 printable ASCII
    characters (shared by every create endpoint that accepts it, hence here)."""
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidIdempotencyKey(
            f"Idempotency-Key must be 1 to 200 printable ASCII characters (got {len(key)} "
            "characters); send a unique value such as a UUID, or leave the header out.",
            detail={"header": "Idempotency-Key"},
        )
    return key


def request_hash(fields: dict[str, Any]) -> str:
    """A stable hash of a request's canonical fields, stored with what it created."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def ensure_same_request(
    *, key: str, stored_hash: str | None, new_hash: str, kind: str, resource_id: str
) -> None:
    """A key names one request: reusing it for another is the client's mistake (409)."""
    if stored_hash != new_hash:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was already used for a different request (it created "
            f"{kind} {resource_id}); use a new key for a new request.",
            detail={"header": "Idempotency-Key", f"{kind}_id": resource_id},
        )
