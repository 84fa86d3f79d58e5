"""Time as the queue records it: epoch milliseconds and ISO 8601 strings in UTC."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import lru_cache


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: int) -> str:
    """`ms` as an ISO 8601 UTC timestamp with millisecond precision, like JavaScript's toISOString().

    Every script call stamps the current millisecond, so the formatting of its second is cached.
    """
    return f"{_second(ms // 1000)}{ms % 1000:03d}Z"


@lru_cache(maxsize=8)
def _second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
