"""Child processes for tests: the environment they get, worker and redis-server processes, and waiting.

One helper per job: `env_for` (a child's environment), `appliance_cmd` (`bin/appliance`), `Proc` (a child with
its log file), `wait_for` / `wait_alive` (a condition against a deadline), `workers` / `worker_process`
(`python -m appliance.worker_process`), `RedisServer` (a private redis-server), `pings`. The port and binary
helpers are the ones the load tests use (loadtest/private.py), so there is one of each in the checkout.
Importers: conftest.py (fixtures), live_api.py (a live API), the tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from appliance.keys import Keys
from appliance.queue import Queue
from loadtest.private import HOME as ROOT
from loadtest.private import free_port, redis_binary

__all__ = ["ROOT", "Listener", "Proc", "RedisServer", "appliance_cmd", "env_for", "free_port", "pings",
           "redis_binary", "wait_alive", "wait_for", "worker_process", "workers"]


def appliance_cmd(env: dict[str, str], *argv: str, timeout_s: float = 150) -> subprocess.CompletedProcess[str]:
    """`bin/appliance ARGV...` of this checkout with `env`, its output captured."""
    return subprocess.run([str(ROOT / "bin" / "appliance"), *argv], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


def env_for(redis_url: str) -> dict[str, str]:
    """An environment for child processes: Redis at `redis_url`, this checkout on the path, and none of the
    caller's own appliance settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "API_", "REDIS", "HUB_"))}
    env.update(REDIS_URL=redis_url, HUB_REDIS_URL=redis_url, PYTHONPATH=str(ROOT))
    return env


class Proc:
    """A child process in its own session, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], name: str):
        self.log = Path(tempfile.mkstemp(prefix=f"appliance-{name}-", suffix=".log")[1])
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 20) -> int:
        """SIGTERM, then SIGKILL to its session after `timeout_s`; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return int(self.proc.returncode)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.unlink(missing_ok=True)


def wait_for(check: Callable[[], Any], timeout_s: float = 20, what: str = "condition") -> Any:
    """Call `check` until it returns something true, and return that; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def wait_alive(proc: subprocess.Popen[Any], check: Callable[[], object], timeout_s: float, what: str) -> None:
    """Wait for `check()` while `proc` keeps running; fail if it exits or the time runs out."""

    def alive_and_checked() -> bool:
        assert proc.poll() is None, f"the process exited while waiting for {what}"
        return bool(check())

    wait_for(alive_and_checked, timeout_s, what)


@contextmanager
def workers(env: dict[str, str], *ids: str, **extra: str) -> Iterator[dict[str, Proc]]:
    """Worker processes (`python -m appliance.worker_process`), one per id; killed at the end."""
    procs = {}
    try:
        for worker_id in ids:
            procs[worker_id] = Proc([sys.executable, "-m", "appliance.worker_process"],
                                    {**env, "WORKER_ID": worker_id, **extra}, worker_id)
        yield procs
    finally:
        for proc in procs.values():
            proc.close()


@contextmanager
def worker_process(env: dict[str, str], client: redis.Redis, worker_id: str,
                   timeout_s: float = 20) -> Iterator[subprocess.Popen[bytes]]:
    """One worker process (as `workers`), yielded once it has registered.

    Leaving the block normally sends SIGTERM, which must end it with exit status 0 (a clean drain)."""
    with workers(env, worker_id) as procs:
        proc = procs[worker_id]
        active = Keys().workers_active
        wait_alive(proc.proc, lambda: worker_id in client.smembers(active), timeout_s, f"{worker_id} to register")
        yield proc.proc
        assert proc.stop(30) == 0, proc.text()


def pings(client: redis.Redis) -> bool:
    """Whether the server answers PING now."""
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class RedisServer:
    """A private redis-server on a free loopback port (never 6379) in its own folder, which a test may stop and
    start again: AOF on (`appendonly`) or no persistence at all; `args` adds options (`--requirepass`, ...)."""

    def __init__(self, appendonly: bool = True, args: tuple[str, ...] = (), password: str | None = None):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="appliance-redis-"))
        self.appendonly = appendonly
        self.args = args
        self.password = password
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it and wait for PING; fail with its log when it does not answer within 10 s."""
        self.proc = Proc([redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                          "--appendonly", "yes" if self.appendonly else "no", "--save", "", *self.args],
                         dict(os.environ), "redis")
        proc = self.proc
        client = redis.Redis(port=self.port, password=self.password)
        try:
            wait_alive(proc.proc, lambda: pings(client), 10, "redis-server to answer")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{proc.text()}") from None
        finally:
            client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc.close()
            self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Listener:
    """Subscribed to some workers' wake channels (as each worker is), collecting who was woken."""

    def __init__(self, client: redis.Redis, queue: Queue, worker_ids: list[str], services: tuple[str, ...] = ()):
        self.pubsub = client.pubsub()
        channels = [queue.keys.wake_worker(w) for w in worker_ids] + [queue.keys.wake(s) for s in services]
        self.pubsub.subscribe(*channels)
        for _ in channels:  # subscribed for sure before any job is submitted
            assert self.pubsub.get_message(timeout=2)["type"] == "subscribe"

    def woken(self) -> list[str]:
        return [channel.rsplit(":", 1)[1] for channel, _ in self.messages()]

    def messages(self) -> list[tuple[str, str]]:
        """(channel, data) of every message that arrived, waiting 0.2 s for more after the last."""
        got = []
        while (message := self.pubsub.get_message(timeout=0.2)) is not None:
            got.append((message["channel"], message["data"]))
        return got

    def close(self) -> None:
        self.pubsub.close()
