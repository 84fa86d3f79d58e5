"""Fixtures: a private redis-server for the whole test session, flushed before each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from appliance.queue import Queue
from appliance.redis_conn import connect
from appliance.settings import QueueSettings
from procs import ROOT, RedisServer, env_for, free_port, redis_binary

__all__ = ["ROOT", "env_for", "free_port", "redis_binary"]   # the helpers tests import from here


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A private redis-server on a free loopback port (never 6379), no persistence; yields its URL."""
    with RedisServer(appendonly=False) as server:
        yield server.url


@pytest.fixture()
def settings(redis_server: str) -> QueueSettings:
    return QueueSettings(redis_url=redis_server)


@pytest.fixture()
def client(redis_server: str) -> Iterator[redis.Redis]:
    """A client of the private server, which is flushed first (it is ours alone)."""
    conn = connect(redis_server)
    conn.flushdb()
    yield conn
    conn.close()
    conn.connection_pool.disconnect()   # close() leaves a pool passed in open; its sockets would leak


@pytest.fixture()
def queue(client: redis.Redis, settings: QueueSettings) -> Queue:
    return Queue(client, settings)


@pytest.fixture()
def env_base(redis_server: str) -> dict[str, str]:
    """An environment for child processes: the private Redis and this checkout on the path."""
    return env_for(redis_server)
