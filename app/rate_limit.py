"""Requests per minute per API key, counted by the `limits` library (moving window).

Counts live in memory (one api process) or in Redis (TUNESERVE_RATE_LIMIT_STORAGE_URL), where
every api replica shares them.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache

from limits import RateLimitItemPerMinute, storage, strategies

from app.errors import TooManyRequests


@lru_cache
def _limiter(storage_url: str) -> strategies.MovingWindowRateLimiter:
    return strategies.MovingWindowRateLimiter(storage.storage_from_string(storage_url))


def check_rate(key_id: str, *, per_minute: int, storage_url: str) -> None:
    """Count one request of this key; 429 with Retry-After once it is over its limit."""
    limiter = _limiter(storage_url)
    item = RateLimitItemPerMinute(per_minute)
    if limiter.hit(item, "api-key", key_id):
        return
    reset_at = limiter.get_window_stats(item, "api-key", key_id).reset_time
    retry_after = max(1, math.ceil(reset_at - time.time()))
    raise TooManyRequests(
        f"Too many requests: this API key may make {per_minute} per minute "
        f"(TUNESERVE_RATE_LIMIT_PER_MINUTE). Retry after {retry_after} s.",
        headers={"Retry-After": str(retry_after)},
    )
