"""`bin/appliance drill`: the guide's resilience scenario against the running appliance.

Submit jobs, SIGKILL a worker while it runs one, submit more, let supervisord start it again (the guide's
`docker start`), then follow every job to its end and print what happened to each: lost must be 0.
"""

from __future__ import annotations

import json
import time
import urllib.request
import xmlrpc.client
from typing import Any

from appliance.jobs import TERMINAL
from appliance.queue import Queue

FIRST_JOBS, MORE_JOBS = 4, 4
JOB_MS = 3000


def submit(api_url: str, priority: int, api_key: str | None = None) -> str:
    body = json.dumps({"service_required": "simulation", "priority": priority,
                       "payload": {"drill": True, "duration": JOB_MS}}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{api_url}/api/jobs", data=body, method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as reply:
        return str(json.loads(reply.read())["job_id"])


def run_drill(api_url: str, queue: Queue, rpc: Any, say: Any, timeout_s: float = 180,
              api_key: str | None = None) -> int:
    """Returns the number of lost jobs (0 when every job completed). `api_key`: for an API with keys."""
    say(f"submitting {FIRST_JOBS} simulation jobs of {JOB_MS} ms through {api_url}")
    jobs = [submit(api_url, 100, api_key) for _ in range(FIRST_JOBS)]
    victim_job, victim_worker = "", ""
    deadline = time.monotonic() + 30
    while not victim_worker and time.monotonic() < deadline:
        for job_id in jobs:
            job = queue.get(job_id) or {}
            if job.get("status") == "in_progress" and job.get("worker_id"):
                victim_job, victim_worker = job_id, str(job["worker_id"])
                break
        time.sleep(0.1)
    if not victim_worker:
        say("no job started within 30s: are workers running? see `bin/appliance status`")
        return len(jobs)
    program = _program_of(rpc, victim_worker)
    info = rpc.getProcessInfo(program)
    say(f"killing {program} (worker {victim_worker}, pid {info['pid']}) with SIGKILL while it runs {victim_job}")
    rpc.signalProcess(program, "KILL")
    killed_at = time.monotonic()
    say(f"submitting {MORE_JOBS} more jobs while it is down")
    jobs += [submit(api_url, 100, api_key) for _ in range(MORE_JOBS)]
    while time.monotonic() - killed_at < 60:
        info = rpc.getProcessInfo(program)
        if info["statename"] == "RUNNING" and victim_worker in queue.worker_ids():
            break
        if info["statename"] in ("EXITED", "FATAL", "STOPPED"):
            try:
                rpc.startProcess(program, False)
            except xmlrpc.client.Fault:
                pass  # supervisord was starting it already
        time.sleep(0.2)
    say(f"{program} is back (pid {rpc.getProcessInfo(program)['pid']}) after {time.monotonic() - killed_at:.1f}s")
    rerun_s = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [queue.get(j) or {} for j in jobs]
        victim = states[jobs.index(victim_job)]
        if rerun_s is None and int(victim.get("attempt") or 0) > 1:
            rerun_s = time.monotonic() - killed_at
        if all(s.get("status") in {t.value for t in TERMINAL} for s in states):
            break
        time.sleep(0.2)
    print(f"\n{'job':<38} {'status':<10} {'worker':<18} {'attempts':>8} {'retries':>7}")
    lost = 0
    for job_id in jobs:
        job = queue.get(job_id) or {}
        mark = "  <- was running on the killed worker" if job_id == victim_job else ""
        print(f"{job_id:<38} {job.get('status', 'MISSING'):<10} {job.get('worker_id', '-'):<18} "
              f"{job.get('attempt', 0):>8} {job.get('retry_count', 0):>7}{mark}")
        lost += job.get("status") != "completed"
    if rerun_s is not None:
        print(f"\nthe killed worker's job was running again {rerun_s:.1f}s after the kill")
    print(f"jobs={len(jobs)} completed={len(jobs) - lost} lost={lost}")
    return lost


def _program_of(rpc: Any, worker_id: str) -> str:
    """The supervisord program whose WORKER_ID is `worker_id` (worker3-direct → workers:worker3)."""
    for info in rpc.getAllProcessInfo():
        if info["group"] == "workers" and worker_id.startswith(info["name"] + "-"):
            return f"workers:{info['name']}"
    raise LookupError(f"no supervisord program runs worker {worker_id}")
