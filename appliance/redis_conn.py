"""Redis clients configured for the appliance (redis-py 8 defaults do not fit blocking reads)."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def connect(url: str, *, blocking: bool = False, max_connections: int = 64, timeout_s: float = 5.0) -> redis.Redis:
    """A client for `url` that decodes replies to str.

    Args:
        blocking: for connections that wait (XREAD BLOCK, pub/sub): no socket timeout, since redis-py's
            default 5 s timeout would cut every longer wait.
        max_connections: size of the pool; callers wait for a free connection instead of failing.
        timeout_s: how long one command may take before it fails (the API uses 1 s, so that a Redis outage
            gives a quick 503 rather than a hang).
    """
    pool = redis.BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        max_connections=max_connections,
        timeout=10,
        socket_timeout=None if blocking else timeout_s,
        socket_connect_timeout=min(2.0, timeout_s),
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        protocol=2,
    )
    return redis.Redis(connection_pool=pool)
