"""End to end: `bin/appliance start` in a temporary run folder on free ports, the guide's scenarios over HTTP,
then `bin/appliance stop` leaves no process behind."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from loadtest.private import PrivateAppliance
from procs import appliance_cmd, wait_for

pytestmark = pytest.mark.slow  # every test shares one appliance, started by `bin/appliance start`


@dataclass
class Appliance:
    run_dir: Path
    env: dict[str, str]
    api: str
    redis_port: int
    redis: redis.Redis
    pids: dict[int, float]  # every process of the run (supervisord and its descendants) → create time


def processes_of(run_dir: Path, redis_port: int, api_port: int) -> list[psutil.Process]:
    """Live processes that belong to this run: by run folder (cmdline or environment) or by its ports."""
    found = []
    marks = (str(run_dir), f"--port {redis_port}", f":{api_port}")
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.pid == os.getpid():
                continue
            if any(mark in cmdline for mark in marks) or proc.environ().get("APPLIANCE_RUN_DIR") == str(run_dir):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def http(method: str, url: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    private = PrivateAppliance(tmp_path_factory.mktemp("appliance-run"), workers=2, env={
        "WORKER_SIMULATION_PROCESSING_TIME": "1.0", "WORKER_SIMULATION_STEPS": "2", "WORKER_DRAIN_SECONDS": "5"})
    run_dir, env, redis_port, api_port = private.run_dir, private.environment(), private.redis_port, private.api_port
    started = appliance_cmd(env, "start")
    client = redis.Redis.from_url(private.redis_url, decode_responses=True, socket_timeout=5)
    app = Appliance(run_dir, env, private.url, redis_port, client, {})
    try:
        assert started.returncode == 0, f"start failed:\n{started.stdout}\n{started.stderr}"
        assert f"API at {app.api}" in started.stdout
        supervisord = psutil.Process(int((run_dir / "supervisord.pid").read_text()))
        for proc in [supervisord, *supervisord.children(recursive=True)]:
            app.pids[proc.pid] = proc.create_time()
        yield app
    finally:
        stopped = appliance_cmd(env, "stop")
        client.close()
        left = processes_of(run_dir, redis_port, api_port)
        for proc in left:  # never leave strays, even when the test failed
            proc.kill()
        assert stopped.returncode == 0, f"stop failed:\n{stopped.stdout}\n{stopped.stderr}"
        assert not left, f"processes left after stop: {[(p.pid, p.cmdline()) for p in left]}"


def test_multiple_workers_scenario(appliance: Appliance) -> None:
    """The guide's "Multiple Workers": 10 jobs, priorities 1..10, two workers, higher priority first."""
    r = appliance.redis
    assert sorted(r.smembers("workers:active")) == ["worker1-direct", "worker2-direct"]
    start_id = r.xrevrange("events", count=1)[0][0] if r.exists("events") else "0-0"
    ids: dict[str, int] = {}
    for i in range(1, 11):
        status, body = http("POST", f"{appliance.api}/api/jobs",
                            {"service_required": "simulation", "priority": i, "payload": {"job": i}})
        assert status == 201 and body["success"] is True
        ids[body["job_id"]] = i

    def all_done() -> bool:
        return all(r.hget(f"job:{job_id}", "status") in ("completed", "failed") for job_id in ids)

    wait_for(all_done, 60, "all 10 jobs to finish")
    jobs = {job_id: http("GET", f"{appliance.api}/api/jobs/{job_id}")[1]["job"] for job_id in ids}
    assert all(job["status"] == "completed" for job in jobs.values()), jobs
    assert all(job["result"]["job_payload"] == {"job": ids[job_id]} for job_id, job in jobs.items())
    assert {job["worker_id"] for job in jobs.values()} == {"worker1-direct", "worker2-direct"}

    # Order of starts, from the appliance-wide event stream (Redis' own order of the claims).
    entries = r.xrange("events", min=f"({start_id}" if start_id != "0-0" else "-")
    ours = [(fields["event"], fields["job_id"]) for _, fields in entries if fields.get("job_id") in ids]
    last_submit = max(n for n, (event, _) in enumerate(ours) if event == "submitted")
    later = [ids[job_id] for event, job_id in ours[last_submit:] if event == "assigned"]
    assert later == sorted(later, reverse=True), f"starts after the last submit, by priority: {later}"
    assert len(later) >= 4, f"too few jobs waited in line to judge the order: {later}"
    assert [e for e, _ in ours].count("assigned") == 10


def test_api_endpoints_scenario(appliance: Appliance) -> None:
    """The guide's "API Endpoints" curls: health, submit, get, list."""
    status, health = http("GET", f"{appliance.api}/health")
    assert status == 200 and health["status"] == "ok" and health["workers"]["active"] == 2

    # the guide's body as written (a 5 s job); it is cancelled below rather than waited for
    guide_body = {"service_required": "simulation", "priority": 100, "payload": {"action": "test", "duration": 5000}}
    status, submitted = http("POST", f"{appliance.api}/api/jobs", guide_body)
    assert status == 201 and submitted["success"] is True and submitted["message"] == "Job submitted successfully"
    job_id = submitted["job_id"]

    status, got = http("GET", f"{appliance.api}/api/jobs/{job_id}")
    assert status == 200 and got["job"]["id"] == job_id and got["job"]["priority"] == 100
    assert got["job"]["payload"] == guide_body["payload"]
    assert got["job"]["status"] in ("pending", "assigned", "in_progress")

    def running() -> bool:
        job = http("GET", f"{appliance.api}/api/jobs/{job_id}")[1]["job"]
        return job["status"] == "in_progress" and job["progress"] > 0

    wait_for(running, 30, "the guide's job to report progress")

    status, listing = http("GET", f"{appliance.api}/api/jobs")
    assert status == 200 and listing["success"] is True
    assert listing["jobs"][0]["id"] == job_id  # newest first
    assert listing["total"] == appliance.redis.zcard("jobs:index:all")

    status, cancelled = http("DELETE", f"{appliance.api}/api/jobs/{job_id}")
    assert status == 202 and cancelled["status"] == "cancelling"
    wait_for(lambda: http("GET", f"{appliance.api}/api/jobs/{job_id}")[1]["job"]["status"] == "cancelled", 30,
             "the running job to be cancelled")
    assert "result" not in http("GET", f"{appliance.api}/api/jobs/{job_id}")[1]["job"]

    status, missing = http("GET", f"{appliance.api}/api/jobs/no-such-job")
    assert status == 404 and missing == {**missing, "success": False, "error": "Job not found"}

    status, workers = http("GET", f"{appliance.api}/api/workers")
    assert status == 200 and {w["id"] for w in workers["workers"]} == {"worker1-direct", "worker2-direct"}


def test_status_shows_programs_queue_and_workers(appliance: Appliance) -> None:
    result = appliance_cmd(appliance.env, "status", timeout_s=60)
    assert result.returncode == 0, result.stderr
    for name in ("redis", "api", "workers:worker1", "workers:worker2", "queue:", "worker1-direct", "worker2-direct"):
        assert name in result.stdout, result.stdout


def test_stop_leaves_no_process(appliance: Appliance) -> None:
    """Runs last in this module: stop, then nothing of this run folder or its ports is left."""
    api_port = int(appliance.api.rsplit(":", 1)[1])
    assert processes_of(appliance.run_dir, appliance.redis_port, api_port), "the run's processes were not found"
    stopped = appliance_cmd(appliance.env, "stop")
    assert stopped.returncode == 0, stopped.stderr
    for pid, created in appliance.pids.items():
        try:
            proc = psutil.Process(pid)
            alive = proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        assert not alive, f"pid {pid} of the run is still alive after stop"
    assert processes_of(appliance.run_dir, appliance.redis_port, api_port) == []
    status = appliance_cmd(appliance.env, "status", timeout_s=60)
    assert status.returncode == 3 and "not running" in status.stdout
