"""Real worker and redis-server processes for resilience tests (started and stopped by the test)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from appliance.keys import Keys
from appliance.queue import Queue
from conftest import ROOT, free_port, redis_binary


class Proc:
    """A child process with its log file."""

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


def wait_for(check: Callable[[], object], timeout_s: float = 20, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


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


class RedisServer:
    """A private redis-server with AOF in its own folder, which a test may stop and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="appliance-redis-"))
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = Proc([redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                          "--appendonly", "yes", "--save", ""], dict(os.environ), "redis")
        client = redis.Redis(port=self.port)
        wait_for(lambda: _pings(client), 10, "redis-server to answer")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc.close()
            self.proc = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def wait_alive(proc: subprocess.Popen[str], check: Callable[[], object], timeout_s: float, what: str) -> None:
    """Wait for `check()` while `proc` keeps running; fail if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert proc.poll() is None, f"the process exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.05)


@contextmanager
def worker_process(env: dict[str, str], client: redis.Redis, worker_id: str,
                   timeout_s: float = 20) -> Iterator[subprocess.Popen[str]]:
    """One `python -m appliance.worker_process` with WORKER_ID=worker_id, yielded once it has registered.

    Leaving the block normally sends SIGTERM, which must end it with exit status 0 (a clean drain)."""
    proc = subprocess.Popen([sys.executable, "-m", "appliance.worker_process"], env={**env, "WORKER_ID": worker_id},
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    active = Keys().workers_active
    try:
        wait_alive(proc, lambda: worker_id in client.smembers(active), timeout_s, f"{worker_id} to register")
        yield proc
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
