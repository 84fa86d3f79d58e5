"""Time as the queue records it: epoch milliseconds and ISO 8601 strings in UTC."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import lru_cache


def now_ms() -> int:
    return int(time.time() * 1000)


@lru_cache(maxsize=64)
def iso(ms: int) -> str:
    """`ms` as an ISO 8601 UTC timestamp with millisecond precision, like JavaScript's toISOString().

    Cached: every script call stamps the current millisecond, and busy processes make many calls in one.
    """
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
