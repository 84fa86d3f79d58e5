"""Nothing lost, on real processes: kill -9 mid-job, timeouts, cancel from another API process and of a frozen
worker, graceful drain, Redis stopped and restarted under load (also for longer than the lease), a full Redis,
a job that kills its worker, and a bounded chaos run under supervisord."""

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


def submit(queue: Queue, duration_ms: int, payload: dict[str, object] | None = None, **fields: object) -> str:
    return queue.submit(JobSpec.parse({"service_required": "simulation",
                                       "payload": {"duration": duration_ms, **(payload or {})}, **fields}))


def status(queue: Queue, job_id: str) -> str:
    return str((queue.get(job_id) or {}).get("status"))


def terminal_events(client: redis.Redis, queue: Queue, job_id: str) -> list[str]:
    entries = client.xrange(queue.keys.progress(job_id))
    return [f["event"] for _, f in entries if f["event"] in ("completed", "failed", "timeout", "cancelled")]


def stream(client: redis.Redis, queue: Queue, job_id: str) -> list[tuple[str, dict[str, str]]]:
    return list(client.xrange(queue.keys.progress(job_id)))


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
        slow = submit(queue, 20000, {"steps": 200}, timeout_seconds=1, max_retries=0)   # a step every 100 ms
        wait_for(lambda: status(queue, slow) == "timeout", 20, "the job to time out")
        job = queue.get(slow) or {}
        assert "timed out" in job["error"]
        assert terminal_events(client, queue, slow) == ["timeout"]
        progress_at_timeout = [f for _, f in client.xrange(queue.keys.progress(slow)) if f["event"] == "progress"]
        # a second on the freed slot, in the same process: the abandoned run would have written ten steps by then
        after = submit(queue, 1000)
        wait_for(lambda: status(queue, after) == "completed", 15, "the next job on the freed slot")
        assert len([f for _, f in client.xrange(queue.keys.progress(slow)) if f["event"] == "progress"]) \
            == len(progress_at_timeout), "the abandoned run must not write progress after its timeout"
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


def test_second_sigterm_hands_back_at_once(env_base: dict[str, str], queue: Queue, client: redis.Redis) -> None:
    with workers(env_base, "w2", **FAST, WORKER_DRAIN_SECONDS="60") as procs:
        job_id = submit(queue, 30000, {"steps": 300})   # a step every 100 ms
        wait_for(lambda: status(queue, job_id) == "in_progress", what="the job to start")
        procs["w2"].signal(signal.SIGTERM)
        wait_for(lambda: "draining: waiting" in procs["w2"].text(), 10, "the first SIGTERM to start the drain")
        written = len(stream(client, queue, job_id))
        wait_for(lambda: len(stream(client, queue, job_id)) > written, 10, "the job's next step, while draining")
        assert procs["w2"].proc.poll() is None, "the first SIGTERM drains"
        procs["w2"].signal(signal.SIGTERM)
        assert procs["w2"].proc.wait(15) == 0
        assert status(queue, job_id) == "pending"


def test_cancel_of_a_frozen_worker_s_job_is_immediate_and_its_late_writes_are_refused(
        env_base: dict[str, str], queue: Queue, client: redis.Redis) -> None:
    """The worker is stopped (SIGSTOP) when its job is cancelled: the job is `cancelled` as soon as the cancel
    returns; when the worker wakes, what its attempt writes is refused and it stops the connector."""
    with workers(env_base, "wf", **FAST, WORKER_MAX_CONCURRENT_JOBS="1") as procs:
        job_id = submit(queue, 20_000, {"steps": 40})
        wait_for(lambda: status(queue, job_id) == "in_progress", what="the job to start")
        procs["wf"].signal(signal.SIGSTOP)
        try:
            assert queue.cancel(job_id) == "cancelling"
            assert status(queue, job_id) == "cancelled"
            cancelled_at = len(stream(client, queue, job_id))
            time.sleep(1.5)  # its connector would have reported three steps by now
        finally:
            procs["wf"].signal(signal.SIGCONT)
        after = submit(queue, 100)
        wait_for(lambda: status(queue, after) == "completed", 15, "the freed slot's next job")
        entries = stream(client, queue, job_id)
        assert len(entries) == cancelled_at and entries[-1][1]["event"] == "cancelled", "late writes were refused"
        assert terminal_events(client, queue, job_id) == ["cancelled"] and status(queue, job_id) == "cancelled"


@pytest.mark.slow
def test_a_job_that_kills_its_worker_backs_off_like_any_failure(env_base: dict[str, str], queue: Queue,
                                                                client: redis.Redis) -> None:
    """Each attempt SIGKILLs the worker running it: the job is retried after a backoff (jobs:delayed, a retry_at
    ahead of the event), not at once on the next worker, and ends failed after max_retries."""
    with workers(env_base, "ka", "kb", "kc", **FAST, JOB_RETRY_BASE_MS="1500",
                 WORKER_SIMULATION_ALLOW_KILL="1") as procs:
        wait_for(lambda: len(queue.worker_ids()) == 3, what="three workers")
        job_id = submit(queue, 5000, {"kill_worker": True}, max_retries=2)

        def ended() -> bool:
            queue.scripts.recover()  # as the API's janitor does: the last attempt leaves no worker to do it
            return status(queue, job_id) == "failed"

        wait_for(ended, 40, "the job to run out of retries")
        entries = stream(client, queue, job_id)
        retries = [(int(entry_id.split("-")[0]), f) for entry_id, f in entries if f["event"] == "retrying"]
        assert len(retries) == 2
        for at_ms, fields in retries:
            assert fields["error"].startswith("worker lost: ") and int(fields["retry_at"]) > at_ms + 500
        job = queue.get(job_id) or {}
        assert job["retry_count"] == 2 and "no retries are left" in job["error"]
        assert sorted(p.proc.poll() for p in procs.values()) == [-signal.SIGKILL] * 3
        gone = {f["worker_id"] for _, f in client.xrange(queue.keys.events) if f["event"] == "worker_disconnected"}
        assert gone >= {str(job["last_failed_worker"])}, "a worker whose lease expired is reported lost at once"


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
def test_a_redis_stop_longer_than_the_lease_loses_no_finished_work(env_base: dict[str, str],
                                                                   own_redis: RedisServer) -> None:
    """Redis stopped for 2.5 leases while jobs run: jobs whose connector finished meanwhile end completed with no
    retry counted (their outcome was held, their lease judged on the time Redis was there); a worker killed
    during the outage has its job running again soon after Redis is back."""
    env = {**env_base, "REDIS_URL": own_redis.url, "HUB_REDIS_URL": own_redis.url}
    client = connect(own_redis.url)
    queue = Queue(client, QueueSettings(redis_url=own_redis.url))
    with workers(env, "wx", "wy", **FAST, WORKER_MAX_CONCURRENT_JOBS="3") as procs, \
            workers(env, "wz", **FAST, WORKER_MAX_CONCURRENT_JOBS="1") as doomed:
        wait_for(lambda: len(queue.worker_ids()) == 3, what="three workers")
        jobs = [submit(queue, 1500, max_retries=1) for _ in range(7)]
        wait_for(lambda: all(status(queue, j) == "in_progress" for j in jobs), 15, "every slot to run a job")
        [victim] = [j for j in jobs if (queue.get(j) or {}).get("worker_id") == "wz"]
        own_redis.stop()
        doomed["wz"].signal(signal.SIGKILL)  # a worker that really dies during the outage
        time.sleep(2.5 * int(FAST["WORKER_LEASE_MS"]) / 1000)  # every running connector finishes meanwhile
        own_redis.start()
        # the first script after Redis is back may be anyone's (the API's janitor, an idle worker's claim), before
        # the holders have renewed: here, at once
        queue.scripts.recover()
        wait_for(lambda: all(status(queue, j) == "completed" for j in jobs), 30, "every job to complete")
        for job_id in jobs:
            job = queue.get(job_id) or {}
            assert terminal_events(client, queue, job_id) == ["completed"]
            if job_id == victim:
                assert job["retry_count"] == 1 and job["last_failed_worker"] == "wz"
            else:
                assert job["retry_count"] == 0, (job, stream(client, queue, job_id))
                assert "retrying" not in [f["event"] for _, f in stream(client, queue, job_id)]
        assert all(p.proc.poll() is None for p in procs.values()), "no worker crashed"
        assert sorted(queue.worker_ids()) == ["wx", "wy"]
        # the outage outlasted the heartbeat TTL (3 s here): only the worker that died is reported lost
        gone = {f["worker_id"] for _, f in client.xrange(queue.keys.events) if f["event"] == "worker_disconnected"}
        assert gone <= {"wz"}


@pytest.mark.slow
def test_a_frozen_redis_loses_no_finished_work_and_reports_no_worker_lost(env_base: dict[str, str],
                                                                          own_redis: RedisServer) -> None:
    """Redis frozen (SIGSTOP) for 11 s, over 3 leases and longer than the heartbeat TTL, while jobs run: the calls
    that waited in its input (beats, claims, recoveries, outcomes, each with the clock of its sending, some sent
    after the clients' 5 s timeout on new connections) run late when it resumes. Every job ends completed with
    no retry counted, and no worker is reported lost."""
    env = {**env_base, "REDIS_URL": own_redis.url, "HUB_REDIS_URL": own_redis.url}
    client = connect(own_redis.url)
    queue = Queue(client, QueueSettings(redis_url=own_redis.url))
    assert own_redis.proc is not None
    settings = {**FAST, "WORKER_LEASE_MS": "3000", "WORKER_MAX_CONCURRENT_JOBS": "2"}
    with running_api(env), workers(env, "wf1", "wf2", "wf3", **settings) as procs:
        wait_for(lambda: len(queue.worker_ids()) == 3, what="three workers")
        jobs = [submit(queue, 3000, max_retries=0) for _ in range(4)]
        wait_for(lambda: all(status(queue, j) == "in_progress" for j in jobs), 15, "the jobs to run")
        own_redis.proc.signal(signal.SIGSTOP)
        try:
            time.sleep(11)  # every running connector finishes meanwhile
        finally:
            own_redis.proc.signal(signal.SIGCONT)
        wait_for(lambda: all(status(queue, j) == "completed" for j in jobs), 30, "every job to complete")
        for job_id in jobs:
            assert terminal_events(client, queue, job_id) == ["completed"]
            assert (queue.get(job_id) or {})["retry_count"] == 0, stream(client, queue, job_id)
        gone = [f for _, f in client.xrange(queue.keys.events) if f["event"] == "worker_disconnected"]
        assert gone == []
        assert all(p.proc.poll() is None for p in procs.values()), "no worker crashed"


@pytest.mark.slow
def test_a_worker_stopped_during_an_outage_records_its_finished_job(env_base: dict[str, str],
                                                                    own_redis: RedisServer) -> None:
    """Redis stopped while a job runs; its connector finishes (its outcome held), then the worker is told to stop
    and Redis comes back only after the drain (2 s here) and what a stopping worker used to wait for a job: the
    finished job is not taken for a running one, its outcome is held as long as supervisord lets the worker live
    (drain + STOP_MARGIN_S), so it ends completed with no retry, and the worker exits 0."""
    env = {**env_base, "REDIS_URL": own_redis.url, "HUB_REDIS_URL": own_redis.url}
    client = connect(own_redis.url)
    queue = Queue(client, QueueSettings(redis_url=own_redis.url))
    with workers(env, "wd", **FAST, WORKER_DRAIN_SECONDS="2") as procs:
        wait_for(lambda: queue.worker_ids() == ["wd"], what="the worker")
        job_id = submit(queue, 1000, max_retries=0)
        wait_for(lambda: status(queue, job_id) == "in_progress", 15, "the job to run")
        own_redis.stop()
        time.sleep(2)  # the connector finishes: its progress and outcome are held
        procs["wd"].signal(signal.SIGTERM)
        time.sleep(9.5)
        own_redis.start()
        wait_for(lambda: procs["wd"].proc.poll() is not None, 20, "the worker to exit")
        assert procs["wd"].proc.returncode == 0
        job = queue.get(job_id) or {}
        assert job["status"] == "completed" and job["retry_count"] == 0, stream(client, queue, job_id)
        assert queue.worker_ids() == []


@pytest.mark.slow
def test_a_full_redis_refuses_new_jobs_and_lets_running_ones_finish(env_base: dict[str, str],
                                                                   own_redis: RedisServer) -> None:
    """At maxmemory (noeviction) submits are refused, while the running jobs' heartbeats, progress and outcomes
    go through: all complete, no worker is lost; once memory is freed new jobs run again."""
    env = {**env_base, "REDIS_URL": own_redis.url, "HUB_REDIS_URL": own_redis.url}
    client = connect(own_redis.url)
    queue = Queue(client, QueueSettings(redis_url=own_redis.url))
    with workers(env, "wm", "wn", **FAST, WORKER_MAX_CONCURRENT_JOBS="3") as procs:
        wait_for(lambda: len(queue.worker_ids()) == 2, what="two workers")
        jobs = [submit(queue, 4000, {"steps": 8}, max_retries=0) for _ in range(6)]
        wait_for(lambda: all(status(queue, j) == "in_progress" for j in jobs), 15, "every job to run")
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)
        try:
            with pytest.raises(redis.RedisError, match="maxmemory"):
                submit(queue, 100)
            wait_for(lambda: all(status(queue, j) == "completed" for j in jobs), 30, "the running jobs")
            assert sorted(queue.worker_ids()) == ["wm", "wn"]
        finally:
            client.config_set("maxmemory", 0)
        for job_id in jobs:
            job = queue.get(job_id) or {}
            assert job["retry_count"] == 0 and terminal_events(client, queue, job_id) == ["completed"]
            assert [int(f["progress"]) for _, f in stream(client, queue, job_id) if f["event"] == "progress"][-1] \
                == 100
        after = submit(queue, 100)
        wait_for(lambda: status(queue, after) == "completed", 15, "a job after memory was freed")
        assert all(p.proc.poll() is None for p in procs.values())


@pytest.mark.slow
def test_chaos_kills_and_restarts_lose_nothing(tmp_path: Path) -> None:
    """Kills and group restarts at random, and Redis stopped for 2.5 leases while jobs run. No job is lost or
    finished twice, and the outage costs no retry: with no worker killed for two leases before it and after it,
    no job is retried as "worker lost" from the outage's start until two leases after Redis is back."""
    from loadtest.private import PrivateAppliance

    env = {**FAST, "WORKER_DRAIN_SECONDS": "2", "WORKER_MAX_CONCURRENT_JOBS": "2", "LOG_LEVEL": "warning"}
    lease_s = int(FAST["WORKER_LEASE_MS"]) / 1000
    rng = random.Random(7)
    with PrivateAppliance(tmp_path / "run", workers=4, env=env, quiet=True) as app:
        client = connect(app.redis_url)
        queue = Queue(client, QueueSettings(redis_url=app.redis_url))
        transport = SupervisorTransport(None, None, f"unix://{app.socket}")
        rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor
        jobs: list[str] = []
        actions = {"kill": 0, "group_restart": 0, "redis_outage": 0}
        started = time.monotonic()
        outage_at = started + 15
        outage: tuple[float, float] | None = None
        quiet = (outage_at - 2 * lease_s - 1, outage_at + 2.5 * lease_s + 2 * lease_s + 1)
        while time.monotonic() < started + 40:
            for _ in range(10):
                try:
                    jobs.append(submit(queue, rng.randint(50, 400), priority=rng.randint(0, 100), max_retries=20))
                except redis.RedisError:
                    pass  # not acknowledged: not counted
            now = time.monotonic()
            roll = rng.random()
            if outage is None and now >= outage_at:
                began = time.time()
                rpc.stopProcess("redis", True)
                time.sleep(2.5 * lease_s)  # the jobs running now finish meanwhile and hold their outcomes
                rpc.startProcess("redis", True)
                outage = (began, time.time())
                actions["redis_outage"] += 1
            elif quiet[0] <= now <= quiet[1]:
                pass  # no kill near the outage: any "worker lost" then would be the outage's doing
            elif roll < 0.35:
                name = f"workers:worker{rng.randint(1, 4)}"
                if rpc.getProcessInfo(name)["statename"] == "RUNNING":
                    rpc.signalProcess(name, "KILL")
                    actions["kill"] += 1
            elif roll < 0.42:
                rpc.stopProcessGroup("workers", True)
                rpc.startProcessGroup("workers", False)
                actions["group_restart"] += 1
            time.sleep(0.5)
        wait_for(lambda: _all_terminal(queue, jobs), 120, "every job to reach a terminal status")
        doubles = [j for j in jobs if len(terminal_events(client, queue, j)) != 1]
        not_done = [j for j in jobs if status(queue, j) != "completed"]
        assert outage is not None
        window_ms = (outage[0] * 1000, (outage[1] + 2 * lease_s) * 1000)
        outage_retries = [(j, f["error"]) for j in jobs for entry_id, f in stream(client, queue, j)
                          if f["event"] == "retrying" and f["error"].startswith("worker lost")
                          and window_ms[0] <= int(entry_id.split("-")[0]) <= window_ms[1]]
        print(f"\nchaos: jobs={len(jobs)} {actions} not_completed={len(not_done)} doubles={len(doubles)} "
              f"retried for the outage={len(outage_retries)}")
        transport.close()
        assert actions["redis_outage"] == 1 and actions["kill"] > 0
        assert not_done == [] and doubles == []
        assert outage_retries == [], "a Redis outage counted retries"


def _all_terminal(queue: Queue, jobs: list[str]) -> bool:
    try:
        return all(status(queue, j) in ("completed", "failed", "timeout", "cancelled") for j in jobs)
    except redis.RedisError:
        return False
