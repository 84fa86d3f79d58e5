"""Redis clients configured for the appliance (redis-py 8 defaults do not fit blocking reads)."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
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
        # One re-send, on a broken connection only (a pooled connection that died with a Redis restart).
        # Never on a timeout: the script has usually run by then, and running it again could strand a claimed
        # job. Submit, complete and cancel are idempotent anyway; callers retry where that is safe.
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        protocol=2,
    )
    return redis.Redis(connection_pool=pool)
