"""RQ's SimpleWorker measured on this machine in the same run: its own venv and its own redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtest.private import HOME, PrivateRedis

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


def run_rq(work: Path, venv: Path, jobs: int, workers: int, threads: int = 4,
           log_level: str = "warning", rounds: int = 1) -> dict[str, Any]:
    """Start a redis-server configured like the appliance's (etc/redis.conf, AOF on), run the RQ side."""
    python = ensure_rq_venv(venv)
    with PrivateRedis(work, "rq") as server:
        url = server.url
        say(f"RQ: {jobs} no-op jobs, {workers} SimpleWorkers, redis-server on :{server.port}")
        proc = subprocess.run([str(python), str(HOME / "loadtest" / "rq_side.py"), url, str(jobs), str(workers),
                               str(work), str(threads), log_level, str(rounds)],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"RQ side failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
