"""A new user's first run: a copy of this checkout, with nothing but its base install, runs a job per connector.

The copy holds this checkout's tracked files and its untracked files that git does not ignore, as they are now
(uncommitted work included; `.venv`, `var/` and the other ignored paths stay behind): what a clone of this work
holds. Its own `bin/appliance start` creates its `.venv` with `pip install -e COPY` and no extra, as on a fresh
machine (pip's cache makes that quick), from an environment that knows nothing of the test's venv. So a module
that the appliance, or a server it starts (gunicorn's gevent worker, supervisord, the workers), imports but
setup.cfg's install_requires does not bring fails here, though the `test` extra would bring it to every other test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comfyui_double import ComfyDouble
from conftest import ROOT
from loadtest.private import PrivateAppliance
from test_comfyui import workflow
from test_e2e import http, processes_of

SERVICES = "simulation,noop,comfyui"
JOBS: dict[str, dict[str, Any]] = {
    "simulation": {"duration": 300, "steps": 2},
    "noop": {"hello": "world"},
    "comfyui": {"workflow": workflow(steps=2)},
}


def copy_checkout(dest: Path) -> Path:
    """Copy the tracked and the untracked-but-not-ignored files of this checkout to `dest`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is not part of it
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


class FreshAppliance(PrivateAppliance):
    """A private appliance of the copy, run from an environment without the test's venv in it."""

    def environment(self) -> dict[str, str]:
        env = super().environment()
        for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE"):
            env.pop(name, None)
        outer = str(Path(sys.prefix) / "bin")
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", os.defpath).split(os.pathsep) if p != outer)
        env["PYTHONNOUSERSITE"] = "1"
        return env

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.home / "bin" / "appliance"), *argv], env=self.environment(),
                              capture_output=True, text=True, timeout=120)

    def logs(self) -> str:
        """The tail of every program's log, for a failure message."""
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                         for log in sorted((self.run_dir / "logs").glob("*.log")))


@pytest.fixture()
def comfyui() -> Iterator[ComfyDouble]:
    server = ComfyDouble().start()
    yield server
    server.stop()


def wait_completed(app: FreshAppliance, job_id: str, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = http("GET", f"{app.url}/api/jobs/{job_id}")
        job = body.get("job") or {}
        if job.get("status") == "completed":
            return dict(job)
        assert status == 200 and job.get("status") not in ("failed", "timeout", "cancelled"), \
            f"job {job_id} did not complete: {body}\n{app.logs()}"
        assert time.monotonic() < deadline, f"job {job_id} still {job.get('status')} after {timeout_s}s\n{app.logs()}"
        time.sleep(0.2)


@pytest.mark.slow
def test_base_install_of_a_fresh_copy_runs_every_connector(tmp_path: Path, comfyui: ComfyDouble) -> None:
    home = copy_checkout(tmp_path / "checkout")
    app = FreshAppliance(tmp_path / "run", workers=1, home=home, env={
        "WORKER_GPU_COUNT": "0", "WORKER_CONNECTORS": SERVICES, "WORKER_SERVICES": SERVICES,
        "WORKER_COMFYUI_HOST": "127.0.0.1", "WORKER_COMFYUI_PORT": str(comfyui.port),
    })
    app.started = True  # from here on, `stop` at the end, even after a start that failed halfway
    try:
        started = app.cli("start")
        assert started.returncode == 0, f"start failed:\n{started.stdout}\n{started.stderr}\n{app.logs()}"
        warned = re.findall(r".*\w+Warning: .*", started.stderr)  # setuptools' and pip's warning classes
        assert not warned, f"installing the package warns: {warned}"
        venv_python = home / ".venv" / "bin" / "python"
        assert venv_python.exists(), "bin/appliance start did not create the copy's .venv"
        extras = subprocess.run([str(venv_python), "-c", "import importlib.util as u; "
                                 "print([m for m in ('pytest', 'locust', 'mypy') if u.find_spec(m)])"],
                                capture_output=True, text=True, check=True, env=app.environment()).stdout.strip()
        assert extras == "[]", f"the copy's .venv holds more than the base install: {extras}"

        submitted = {}
        for service, payload in JOBS.items():
            status, body = http("POST", f"{app.url}/api/jobs", {"service_required": service, "payload": payload})
            assert status == 201, body
            submitted[service] = body["job_id"]
        for service, job_id in submitted.items():
            job = wait_completed(app, job_id)
            assert job["service_required"] == service

        status_run = app.cli("status")
        assert status_run.returncode == 0, f"status failed:\n{status_run.stdout}\n{status_run.stderr}"
        app.stop()
        assert not processes_of(app.run_dir, app.redis_port, app.api_port), "bin/appliance stop left processes"
    finally:
        if app.started:
            try:
                app.stop()
            except RuntimeError as exc:  # the failure that led here is the one to report
                print(exc, file=sys.stderr)
        for proc in processes_of(app.run_dir, app.redis_port, app.api_port):  # never leave strays
            proc.kill()
        shutil.rmtree(home / ".venv", ignore_errors=True)
