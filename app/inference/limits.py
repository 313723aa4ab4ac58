"""The generation limits every route checks the same way."""

from __future__ import annotations

from app.errors import InvalidRequest
from app.settings import Settings


def check_max_new_tokens(requested: int, settings: Settings, *, field: str) -> int:
    """`requested` new tokens, or a 400 naming `field` above TUNESERVE_MAX_NEW_TOKENS_LIMIT."""
    if requested > settings.max_new_tokens_limit:
        raise InvalidRequest(
            f"{field}: at most {settings.max_new_tokens_limit} (TUNESERVE_MAX_NEW_TOKENS_LIMIT).",
            code="max_new_tokens_too_large",
            detail={"field": field},
        )
    return requested
