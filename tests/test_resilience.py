"""Nothing lost, on real processes: kill -9 mid-job, timeouts, cancel from another API process, graceful
drain, Redis stopped and restarted under load, and a bounded chaos run under supervisord."""

from __future__ import annotations

import random
import signal
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from supervisor.xmlrpc import SupervisorTransport

from appliance.jobs import JobSpec
from appliance.queue import Queue
from appliance.redis_conn import connect
from appliance.settings import QueueSettings
from live_api import Api, running_api
from procs import RedisServer, wait_for, workers

FAST = {"WORKER_LEASE_MS": "2000", "WORKER_HEARTBEAT_INTERVAL_MS": "300", "WORKER_POLL_INTERVAL_MS": "200",
        "WORKER_SIMULATION_STEPS": "4", "LOG_LEVEL": "info"}


def submit(queue: Queue, duration_ms: int, **fields: object) -> str:
    return queue.submit(JobSpec.parse({"service_required": "simulation", "payload": {"duration": duration_ms},
                                       **fields}))


def status(queue: Queue, job_id: str) -> str:
    return str((queue.get(job_id) or {}).get("status"))


def terminal_events(client: redis.Redis, queue: Queue, job_id: str) -> list[str]:
    entries = client.xrange(queue.keys.progress(job_id))
    return [f["event"] for _, f in entries if f["event"] in ("completed", "failed", "timeout", "cancelled")]


def delete(api: Api, job_id: str) -> tuple[int, dict[str, object]]:
    import http.client

    import orjson

    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        conn.request("DELETE", f"/api/jobs/{job_id}")
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.slow
def test_kill_9_mid_job_requeues_it_on_another_worker(env_base: dict[str, str], queue: Queue,
                                                      client: redis.Redis) -> None:
    with workers(env_base, "wa", "wb", **FAST) as procs:
        wait_for(lambda: len(queue.worker_ids()) == 2, what="two workers registered")
        job_id = submit(queue, 3000)
        wait_for(lambda: status(queue, job_id) == "in_progress", what="the job to start")
        victim = str((queue.get(job_id) or {})["worker_id"])
        survivor = "wb" if victim == "wa" else "wa"
        procs[victim].signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: (queue.get(job_id) or {}).get("attempt") == 2, 15, "the job to run again")
        print(f"\nkill -9 → job running again after {time.monotonic() - killed:.2f}s (lease 2s)")
        wait_for(lambda: status(queue, job_id) == "completed", 15, "the job to complete")
        job = queue.get(job_id) or {}
        assert job["worker_id"] == survivor
        assert job["retry_count"] == 1 and job["last_failed_worker"] == victim
        assert terminal_events(client, queue, job_id) == ["completed"]
        wait_for(lambda: victim not in queue.worker_ids(), 15, "the dead worker to leave workers:active")
        gone = [f for _, f in client.xrange(queue.keys.events) if f.get("event") == "worker_disconnected"]
        assert [f["worker_id"] for f in gone] == [victim]


def test_timeout_stops_the_job_and_frees_the_slot(env_base: dict[str, str], queue: Queue,
                                                  client: redis.Redis) -> None:
    with workers(env_base, "wt", **FAST, WORKER_MAX_CONCURRENT_JOBS="1") as procs:
        slow = submit(queue, 20000, timeout_seconds=1, max_retries=0)
        wait_for(lambda: status(queue, slow) == "timeout", 20, "the job to time out")
        job = queue.get(slow) or {}
        assert "timed out" in job["error"]
        assert terminal_events(client, queue, slow) == ["timeout"]
        after = submit(queue, 100)
        wait_for(lambda: status(queue, after) == "completed", 15, "the next job on the freed slot")
        progress_after = [f for _, f in client.xrange(queue.keys.progress(slow)) if f["event"] == "progress"]
        time.sleep(1.0)
        assert len([f for _, f in client.xrange(queue.keys.progress(slow)) if f["event"] == "progress"]) \
            == len(progress_after), "the abandoned run must not write progress after its timeout"
        assert procs["wt"].proc.poll() is None


def test_timeout_is_retried_while_retries_remain(env_base: dict[str, str], queue: Queue) -> None:
    with workers(env_base, "wr", **FAST, JOB_RETRY_BASE_MS="50"):
        job_id = submit(queue, 20000, timeout_seconds=0.5, max_retries=1)
        wait_for(lambda: status(queue, job_id) == "timeout", 20, "the job to time out twice")
        assert (queue.get(job_id) or {})["retry_count"] == 1


def test_cancel_pending_and_running_from_another_api_process(env_base: dict[str, str], queue: Queue,
                                                             client: redis.Redis) -> None:
    with running_api(env_base) as api_a, running_api(env_base) as api_b, \
            workers(env_base, "wc", **FAST, WORKER_MAX_CONCURRENT_JOBS="1"):
        wait_for(lambda: queue.worker_ids() == ["wc"], what="the worker")
        running = submit(queue, 30000)
        wait_for(lambda: status(queue, running) == "in_progress", what="the job to start")
        pending = submit(queue, 100)
        code, body = delete(api_b, pending)
        assert code == 200 and body["status"] == "cancelled"
        assert status(queue, pending) == "cancelled"
        assert pending not in client.zrange(queue.keys.pending, 0, -1)
        code, body = delete(api_a, running)
        assert code == 202 and body["status"] == "cancelling"
        asked = time.monotonic()
        wait_for(lambda: status(queue, running) == "cancelled", 10, "the running job to be cancelled")
        print(f"\nrunning job cancelled {time.monotonic() - asked:.2f}s after DELETE")
        assert terminal_events(client, queue, running) == ["cancelled"]
        code, body = delete(api_b, running)
        assert code == 409 and body["success"] is False
        after = submit(queue, 100)
        wait_for(lambda: status(queue, after) == "completed", 15, "a job on the freed slot")


def test_drain_finishes_running_jobs_then_deregisters(env_base: dict[str, str], queue: Queue) -> None:
    with workers(env_base, "wd", **FAST, WORKER_DRAIN_SECONDS="15") as procs:
        job_id = submit(queue, 1500)
        wait_for(lambda: status(queue, job_id) == "in_progress", what="the job to start")
        queued = submit(queue, 100, priority=1)
        procs["wd"].signal(signal.SIGTERM)
        assert procs["wd"].proc.wait(20) == 0
        assert status(queue, job_id) == "completed"
        assert status(queue, queued) == "pending", "a draining worker claims nothing new"
        assert queue.worker_ids() == []


def test_drain_hands_back_what_does_not_finish_in_time(env_base: dict[str, str], queue: Queue,
                                                       client: redis.Redis) -> None:
    with workers(env_base, "wh", **FAST, WORKER_DRAIN_SECONDS="1") as procs:
        job_id = submit(queue, 30000, priority=7)
        wait_for(lambda: status(queue, job_id) == "in_progress", what="the job to start")
        procs["wh"].signal(signal.SIGTERM)
        assert procs["wh"].proc.wait(20) == 0
        job = queue.get(job_id) or {}
        assert job["status"] == "pending" and job["retry_count"] == 0
        assert client.zrevrange(queue.keys.pending, 0, -1) == [job_id]
        assert "requeued" in [f["event"] for _, f in client.xrange(queue.keys.progress(job_id))]


def test_second_sigterm_hands_back_at_once(env_base: dict[str, str], queue: Queue) -> None:
    with workers(env_base, "w2", **FAST, WORKER_DRAIN_SECONDS="60") as procs:
        job_id = submit(queue, 30000)
        wait_for(lambda: status(queue, job_id) == "in_progress", what="the job to start")
        procs["w2"].signal(signal.SIGTERM)
        time.sleep(0.5)
        assert procs["w2"].proc.poll() is None, "the first SIGTERM drains"
        procs["w2"].signal(signal.SIGTERM)
        assert procs["w2"].proc.wait(15) == 0
        assert status(queue, job_id) == "pending"


@pytest.fixture()
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
def test_redis_stopped_and_restarted_under_load(env_base: dict[str, str], own_redis: RedisServer) -> None:
    env = {**env_base, "REDIS_URL": own_redis.url, "HUB_REDIS_URL": own_redis.url}
    client = connect(own_redis.url)
    queue = Queue(client, QueueSettings(redis_url=own_redis.url))
    with running_api(env) as api, workers(env, "wx", "wy", **FAST, WORKER_MAX_CONCURRENT_JOBS="3") as procs:
        wait_for(lambda: len(queue.worker_ids()) == 2, what="two workers")
        jobs = [submit(queue, 800) for _ in range(12)]
        wait_for(lambda: any(status(queue, j) == "in_progress" for j in jobs), what="jobs to run")
        own_redis.stop()
        started = time.monotonic()
        code, body = api.get_json("/health")
        elapsed = time.monotonic() - started
        assert code == 503 and body["success"] is False and "Redis" in body["error"]
        code, body = api.get_json("/api/jobs?limit=5")
        assert code == 503 and body["success"] is False
        print(f"\n/health answered {code} {elapsed * 1000:.0f} ms into the outage")
        time.sleep(2.5)
        own_redis.start()
        jobs += [submit(queue, 200) for _ in range(6)]
        wait_for(lambda: all(status(queue, j) == "completed" for j in jobs), 60, "every job to complete")
        for job_id in jobs:
            assert terminal_events(client, queue, job_id) == ["completed"]
        assert all(p.proc.poll() is None for p in procs.values()), "no worker crashed"
        assert api.get_json("/health")[0] == 200


@pytest.mark.slow
def test_chaos_kills_and_restarts_lose_nothing(tmp_path: Path) -> None:
    from loadtest.private import PrivateAppliance

    env = {**FAST, "WORKER_DRAIN_SECONDS": "2", "WORKER_MAX_CONCURRENT_JOBS": "2", "LOG_LEVEL": "warning"}
    rng = random.Random(7)
    with PrivateAppliance(tmp_path / "run", workers=4, env=env, quiet=True) as app:
        client = connect(app.redis_url)
        queue = Queue(client, QueueSettings(redis_url=app.redis_url))
        transport = SupervisorTransport(None, None, f"unix://{app.socket}")
        rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor
        jobs: list[str] = []
        actions = {"kill": 0, "group_restart": 0, "redis_restart": 0}
        deadline = time.monotonic() + 40
        redis_done = False
        while time.monotonic() < deadline:
            for _ in range(10):
                try:
                    jobs.append(submit(queue, rng.randint(50, 400), priority=rng.randint(0, 100), max_retries=20))
                except redis.RedisError:
                    pass  # not acknowledged: not counted
            roll = rng.random()
            if roll < 0.35:
                name = f"workers:worker{rng.randint(1, 4)}"
                if rpc.getProcessInfo(name)["statename"] == "RUNNING":
                    rpc.signalProcess(name, "KILL")
                    actions["kill"] += 1
            elif roll < 0.42:
                rpc.stopProcessGroup("workers", True)
                rpc.startProcessGroup("workers", False)
                actions["group_restart"] += 1
            elif not redis_done and time.monotonic() > deadline - 25:
                rpc.stopProcess("redis", True)
                rpc.startProcess("redis", True)
                redis_done = True
                actions["redis_restart"] += 1
            time.sleep(0.5)
        wait_for(lambda: _all_terminal(queue, jobs), 120, "every job to reach a terminal status")
        doubles = [j for j in jobs if len(terminal_events(client, queue, j)) != 1]
        not_done = [j for j in jobs if status(queue, j) != "completed"]
        print(f"\nchaos: jobs={len(jobs)} {actions} not_completed={len(not_done)} doubles={len(doubles)}")
        transport.close()
        assert actions["redis_restart"] == 1 and actions["kill"] > 0
        assert not_done == [] and doubles == []


def _all_terminal(queue: Queue, jobs: list[str]) -> bool:
    try:
        return all(status(queue, j) in ("completed", "failed", "timeout", "cancelled") for j in jobs)
    except redis.RedisError:
        return False
