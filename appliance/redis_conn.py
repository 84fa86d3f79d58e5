"""Redis clients configured for the appliance (redis-py 8 defaults do not fit blocking reads)."""

from __future__ import annotations

import functools
import os
from typing import Any

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


class DirectCalls:
    """The hot commands (EVALSHA and SCRIPT LOAD, whose replies the client does not reshape) on connections
    made with `client`'s own settings, without redis-py 8's per-command machinery: its pool checks each
    connection for unread data with an extra recv, and every call goes through retry closures and metrics
    hooks, which together cost as much CPU as the round trip itself (measured on a GET: 35 us here against
    68 us through the client; `bin/bench` throughput rose from ~3,400 to ~4,300 jobs/s).

    A connection whose call failed midway is closed, never reused half-read. A broken connection is re-sent
    once on a fresh one, as the client's Retry does (the idle ones are closed too: after a Redis restart they
    are all dead); timeouts are never re-sent. Above the pool's `max_connections` busy at once, a call goes
    through the client, whose pool waits for a free connection.
    """

    def __init__(self, client: redis.Redis):
        self._client_call: Any = client.execute_command
        pool = client.connection_pool
        self._new = functools.partial(pool.connection_class, **pool.connection_kwargs)
        self._limit = int(getattr(pool, "max_connections", 0) or 64)
        self._idle: list[Any] = []  # redis.connection.AbstractConnection (untyped)
        self._open = 0
        self._pid = os.getpid()

    def execute(self, *args: Any) -> Any:
        """Run one command; returns its reply (decoded as the client would) or raises its error."""
        if os.getpid() != self._pid:  # forked: the parent's sockets are not ours to use
            self._idle, self._open, self._pid = [], 0, os.getpid()
        try:
            conn = self._idle.pop()
        except IndexError:
            if self._open >= self._limit:
                return self._client_call(*args)
            self._open += 1
            conn = self._new()
        try:
            try:
                reply = self._round_trip(conn, args)
            except redis.ConnectionError:
                self._close_idle()
                conn.disconnect()
                reply = self._round_trip(conn, args)
        except redis.ResponseError:  # a refusal (e.g. NOSCRIPT): the reply was read whole
            self._idle.append(conn)
            raise
        except BaseException:
            conn.disconnect()
            self._open -= 1
            raise
        self._idle.append(conn)
        return reply

    @staticmethod
    def _round_trip(conn: Any, args: tuple[Any, ...]) -> Any:
        conn.send_packed_command(conn.pack_command(*args), check_health=False)
        return conn.read_response()

    def _close_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.disconnect()
            self._open -= 1
