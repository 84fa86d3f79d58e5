"""The worker driven in-process under gevent with run_once(now_ms), and as a real process for its lifecycle."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from xmlrpc.server import SimpleXMLRPCServer

import gevent
import orjson
import pytest
import redis

from appliance import clock
from appliance.connector import Connector, JobContext
from appliance.jobs import JobSpec
from appliance.keys import Keys
from appliance.queue import Queue
from appliance.settings import QueueSettings, WorkerSettings
from appliance.worker import Worker
from conftest import ROOT
from connectors.simulation import SimulationConnector, SimulationSettings
from procs import Listener, wait_alive, worker_process

SIM_ENV = {"WORKER_SIMULATION_PROCESSING_TIME": "0.05", "WORKER_SIMULATION_STEPS": "2"}


class BrokenConnector(Connector):
    """Fails in the ways a real connector can: raising, or returning something that is not JSON."""

    name = "broken"

    def run(self, job: JobContext) -> Any:
        if job.payload.get("mode") == "unserialisable":
            return {"value": object()}
        raise RuntimeError("the backend exploded")


def make_worker(client: redis.Redis, settings: QueueSettings, *, max_concurrent: int = 1,
                worker_id: str = "w1") -> Worker:
    worker_settings = WorkerSettings(queue=settings, worker_id=worker_id, services=("simulation", "broken"),
                                     connectors=("simulation", "broken"), max_concurrent_jobs=max_concurrent,
                                     job_timeout_minutes=1.0)
    connectors: dict[str, Connector] = {"simulation": SimulationConnector(SimulationSettings.from_env(SIM_ENV)),
                                        "broken": BrokenConnector()}
    return Worker(worker_settings, client, client, connectors)


@pytest.fixture()
def worker(client: redis.Redis, settings: QueueSettings) -> Iterator[Worker]:
    w = make_worker(client, settings, max_concurrent=3)
    w.register()
    yield w
    for job in list(w.running.values()):
        job.context.stop("shutdown")
    wait_idle(w)


def wait_idle(worker: Worker, timeout_s: float = 20) -> None:
    """Let the job greenlets run until the worker holds no job."""
    deadline = time.monotonic() + timeout_s
    while worker.running:
        assert time.monotonic() < deadline, f"jobs still running: {list(worker.running)}"
        gevent.sleep(0.01)


def idle_listener(client: redis.Redis, queue: Queue) -> Listener:
    """Stands in for w1's wake-up listener (the worker under test is driven by hand), with w1 marked idle as if
    its last claim had found nothing: a job submitted now is handed to w1 through this listener."""
    listener = Listener(client, queue, ["w1"])
    client.sadd(queue.keys.idle_workers("simulation"), "w1")
    return listener


def wait_status(client: redis.Redis, queue: Queue, job_id: str, status: str, timeout_s: float = 5) -> None:
    """Let greenlets run until the job has `status`."""
    deadline = time.monotonic() + timeout_s
    while client.hget(queue.keys.job(job_id), "status") != status:
        assert time.monotonic() < deadline, f"job {job_id} never became {status}"
        gevent.sleep(0.01)


def submit(queue: Queue, **body: Any) -> str:
    return queue.submit(JobSpec.parse({"service_required": "simulation", **body}))


def stream(client: redis.Redis, queue: Queue, job_id: str) -> list[dict[str, str]]:
    return [fields for _, fields in client.xrange(queue.keys.progress(job_id))]


# -- claiming -----------------------------------------------------------------------------------------------------
def test_claims_up_to_max_concurrent_and_never_more(worker: Worker, queue: Queue, client: redis.Redis) -> None:
    k = queue.keys
    ids = [submit(queue, priority=10 - n, payload={"duration": 60, "steps": 2}) for n in range(8)]
    assert worker.run_once() == 3
    assert set(worker.running) == set(ids[:3])
    assert client.smembers(k.worker_jobs("w1")) == set(ids[:3])
    assert worker.run_once() == 0  # no free slot: nothing claimed
    assert client.zcard(k.pending) == 5
    seen_max = 0
    deadline = time.monotonic() + 30
    while client.zcard(k.index_status("completed")) < len(ids):
        assert time.monotonic() < deadline
        worker.run_once()
        active = client.zcard(k.index_status("assigned")) + client.zcard(k.index_status("in_progress"))
        assert len(worker.running) <= 3 and active <= 3
        assert client.scard(k.worker_jobs("w1")) <= 3
        seen_max = max(seen_max, len(worker.running))
        gevent.sleep(0.005)
    assert seen_max == 3
    wait_idle(worker)
    assert all(client.hget(k.job(job_id), "status") == "completed" for job_id in ids)
    assert client.hget(k.worker("w1"), "total_jobs_completed") == "8"
    assert client.hget(k.worker("w1"), "status") == "idle"


def test_partial_slots_claim_only_what_is_free(client: redis.Redis, settings: QueueSettings, queue: Queue) -> None:
    w = make_worker(client, settings, max_concurrent=2)
    w.register()
    long_job = submit(queue, priority=100, payload={"duration": 10_000, "steps": 1})
    assert w.run_once() == 1
    for _ in range(3):
        submit(queue, payload={"duration": 10_000, "steps": 1})
    assert w.run_once() == 1
    assert w.run_once() == 0
    assert len(w.running) == 2 and long_job in w.running and client.zcard(queue.keys.pending) == 2
    for job in list(w.running.values()):
        job.context.stop("shutdown")
    wait_idle(w)
    # handed back on shutdown, not failed: all four wait in line again
    assert client.zcard(queue.keys.pending) == 4
    assert client.hget(queue.keys.job(long_job), "retry_count") == "0"


def test_worker_ignores_services_it_does_not_serve(worker: Worker, queue: Queue, client: redis.Redis) -> None:
    queue.scripts.register_worker("w2", 60, {}, {"comfyui": ""})  # another worker offers comfyui
    other = queue.submit(JobSpec.parse({"service_required": "comfyui", "priority": 1000}))
    assert worker.run_once() == 0
    assert client.hget(queue.keys.job(other), "status") == "pending"


def test_a_running_worker_learns_of_a_new_requirement_class_from_its_claim(worker: Worker, queue: Queue,
                                                                           client: redis.Redis) -> None:
    submit(queue, payload={"duration": 1, "steps": 1})
    assert worker.run_once() == 1  # plans its claim queues: no requirement class exists yet
    wait_idle(worker)
    job_id = submit(queue, requirements={"cpu_cores": 0}, payload={"duration": 1, "steps": 1})  # a new class
    assert client.hget(queue.keys.job(job_id), "queue") != queue.keys.pending_service("simulation")
    # the claim reports the new class version: the worker plans its queues again and claims at once
    assert worker.run_once() == 1
    assert job_id in worker.running


def test_bursts_and_trickles_need_no_polling(env_base: dict[str, str], client: redis.Redis, queue: Queue) -> None:
    """With a one-minute poll interval, only wake-ups, freed slots and due retries can drive these claims: a
    burst larger than the worker's slots (claims after completions, without wake-ups), single jobs into an idle
    worker (one wake-up each), a job retried after a 300 ms backoff, then a burst again."""
    k = queue.keys
    env = {**env_base, "WORKER_POLL_INTERVAL_MS": "60000", "WORKER_MAX_CONCURRENT_JOBS": "2",
           "JOB_RETRY_BASE_MS": "300", **SIM_ENV}

    def all_completed(ids: list[str]) -> Callable[[], bool]:
        return lambda: all(client.hget(k.job(job_id), "status") == "completed" for job_id in ids)

    with worker_process(env, client, "burst-worker") as proc:
        for shape in ("burst", "trickle", "retry", "burst"):
            if shape == "retry":
                job_id = submit(queue, payload={"duration": 20, "steps": 1, "fail": 1})
                wait_alive(proc, all_completed([job_id]), 5, "a job retried once")
                assert client.hget(k.job(job_id), "retry_count") == "1"
            elif shape == "burst":
                ids = [submit(queue, payload={"duration": 20, "steps": 1}) for _ in range(12)]
                wait_alive(proc, all_completed(ids), 15, f"a {shape} of 12 jobs")
            else:
                for _ in range(5):
                    wait_alive(proc, all_completed([submit(queue, payload={"duration": 20, "steps": 1})]), 5,
                               "a single job")


def test_two_jobs_at_once_go_to_two_single_slot_workers(env_base: dict[str, str], client: redis.Redis,
                                                        queue: Queue) -> None:
    """Each job arriving in an empty queue is handed to one idle worker, not to the same one twice. With a
    one-minute poll interval, the second job runs at once only if that works."""
    k = queue.keys
    env = {**env_base, "WORKER_POLL_INTERVAL_MS": "60000", "WORKER_MAX_CONCURRENT_JOBS": "1", **SIM_ENV}
    with worker_process(env, client, "single-a") as a, worker_process(env, client, "single-b"):
        wait_alive(a, lambda: client.smembers(k.idle_workers("simulation")) >= {"single-a", "single-b"}, 10,
                   "both workers to go idle")
        ids = [submit(queue, payload={"duration": 2000, "steps": 1}) for _ in range(2)]
        wait_alive(a, lambda: all(client.hget(k.job(j), "status") == "in_progress" for j in ids), 5,
                   "both jobs to run")
        assert {client.hget(k.job(j), "worker_id") for j in ids} == {"single-a", "single-b"}
        for job_id in ids:
            queue.cancel(job_id)


def test_a_job_handed_over_without_a_free_slot_is_given_back(client: redis.Redis, settings: QueueSettings,
                                                              queue: Queue) -> None:
    """A claim that Redis ran after a hand-off, but whose reply the worker read first, filled the last slot:
    the handed job is given back."""
    k = queue.keys
    w = make_worker(client, settings, max_concurrent=1)
    w.register()
    listener = idle_listener(client, queue)
    handed = submit(queue, payload={"duration": 10, "steps": 1})
    [(_, data)] = listener.messages()
    assert client.hget(k.job(handed), "worker_id") == "w1"
    busy = submit(queue, payload={"duration": 10_000, "steps": 1})
    assert w.run_once() == 1 and list(w.running) == [busy]
    w._handed(data)
    wait_status(client, queue, handed, "pending")  # given back
    assert handed not in w.running and busy in w.running
    assert client.smembers(k.worker_jobs("w1")) == {busy}
    assert client.hget(k.job(handed), "retry_count") == "0", "a hand-back is not a failure"
    listener.close()
    for job in list(w.running.values()):
        job.context.stop("shutdown")
    wait_idle(w)


def test_a_claim_that_crossed_a_hand_off_gives_back_what_has_no_slot(client: redis.Redis, settings: QueueSettings,
                                                                     queue: Queue) -> None:
    """The other order: a claim was on its way when a hand-off arrived and took the last slot."""
    k = queue.keys
    w = make_worker(client, settings, max_concurrent=1)
    w.register()
    claimed = submit(queue, payload={"duration": 10_000, "steps": 1})
    in_flight = queue.scripts.claim("w1", w.claim_queues(), 1, w.settings.lease_ms, services=w.services)
    assert [job.id for job in in_flight.jobs] == [claimed]
    listener = idle_listener(client, queue)
    client.hset(k.worker("w1"), "max_concurrent_jobs", "2")  # Redis cannot count the in-flight claim's job
    handed = submit(queue, payload={"duration": 10_000, "steps": 1})
    [(_, data)] = listener.messages()
    w._handed(data)
    assert list(w.running) == [handed]
    w._start_claimed(in_flight.jobs)
    assert list(w.running) == [handed], "never more than max_concurrent_jobs"
    wait_status(client, queue, claimed, "pending")  # given back
    assert client.hget(k.job(claimed), "retry_count") == "0"
    listener.close()
    for job in list(w.running.values()):
        job.context.stop("shutdown")
    wait_idle(w)


def test_a_worker_serving_nothing_idles_and_stops_on_term(env_base: dict[str, str], client: redis.Redis) -> None:
    """WORKER_SERVICES naming no service of its connectors: it waits (no busy loop) and SIGTERM still ends it."""
    env = {**env_base, "WORKER_SERVICES": "nothing-serves-this", "WORKER_HEARTBEAT_INTERVAL_MS": "200"}
    with worker_process(env, client, "serves-nothing") as proc:
        beat = client.get(Keys().worker_heartbeat("serves-nothing"))
        wait_alive(proc, lambda: client.get(Keys().worker_heartbeat("serves-nothing")) != beat, 5,
                   "a heartbeat (its loop yields)")


def test_a_hand_off_whose_message_was_lost_is_given_back_at_the_next_heartbeat(
        client: redis.Redis, settings: QueueSettings, queue: Queue) -> None:
    k = queue.keys
    w = make_worker(client, settings, max_concurrent=2)
    w.register()
    listener = idle_listener(client, queue)  # its message never reaches the worker
    lost = submit(queue, payload={"duration": 10, "steps": 1})
    assert client.hget(k.job(lost), "worker_id") == "w1"
    w.heartbeat()
    assert client.hget(k.job(lost), "status") == "assigned", "a hand-off may still be on its way"
    w.heartbeat(now_ms=clock.now_ms() + 6_000)
    wait_status(client, queue, lost, "pending")  # given back
    assert client.hget(k.job(lost), "retry_count") == "0" and client.smembers(k.worker_jobs("w1")) == set()
    listener.close()


# -- running jobs through the simulation connector ------------------------------------------------------------------
def test_simulation_progress_lands_in_the_stream(worker: Worker, queue: Queue, client: redis.Redis) -> None:
    payload = {"duration": 40, "steps": 4, "job": 7}
    job_id = submit(queue, priority=5, payload=payload)
    assert worker.run_once() == 1
    wait_idle(worker)
    entries = stream(client, queue, job_id)
    kinds = [e["event"] for e in entries]
    assert kinds == ["submitted", "assigned", "in_progress"] + ["progress"] * 5 + ["completed"]
    progress = [e for e in entries if e["event"] == "progress"]
    assert [int(e["progress"]) for e in progress] == [0, 25, 50, 75, 100]
    assert [e["current_step"] for e in progress] == ["0", "1", "2", "3", "4"]
    assert all(e["total_steps"] == "4" and e["worker_id"] == "w1" for e in progress)
    job = queue.get(job_id)
    assert job is not None
    assert job["status"] == "completed" and job["progress"] == 100 and job["worker_id"] == "w1"
    assert job["result"]["job_payload"] == payload and job["result"]["steps_completed"] == 4
    assert job["started_at"] and job["completed_at"]
    assert orjson.loads(entries[-1]["result"]) == job["result"]


def test_connector_failure_is_a_failure_never_completed(worker: Worker, queue: Queue, client: redis.Redis) -> None:
    job_id = submit(queue, max_retries=0, payload={"fail": True, "duration": 10})
    assert worker.run_once() == 1
    wait_idle(worker)
    job = queue.get(job_id)
    assert job is not None
    assert job["status"] == "failed" and job["error"] == "Simulated failure on attempt 1"
    assert "result" not in job
    kinds = [e["event"] for e in stream(client, queue, job_id)]
    assert kinds[-1] == "failed" and "completed" not in kinds
    assert client.hget(queue.keys.worker("w1"), "total_jobs_failed") == "1"


def test_non_retryable_connector_failure_ends_at_once(worker: Worker, queue: Queue) -> None:
    job_id = submit(queue, max_retries=3, payload={"fail": True, "fail_retryable": False, "duration": 10})
    worker.run_once()
    wait_idle(worker)
    job = queue.get(job_id)
    assert job is not None and job["status"] == "failed" and job["retry_count"] == 0


@pytest.mark.parametrize("mode", ["raise", "unserialisable"])
def test_broken_connector_fails_the_job(worker: Worker, queue: Queue, client: redis.Redis, mode: str) -> None:
    job_id = queue.submit(JobSpec.parse({"service_required": "broken", "max_retries": 0, "payload": {"mode": mode}}))
    assert worker.run_once() == 1
    wait_idle(worker)
    job = queue.get(job_id)
    assert job is not None
    assert job["status"] == "failed", job
    assert job["error"]
    assert "completed" not in [e["event"] for e in stream(client, queue, job_id)]
    assert client.smembers(queue.keys.worker_jobs("w1")) == set()


def test_failed_attempt_retries_with_backoff_then_completes(worker: Worker, queue: Queue,
                                                             client: redis.Redis) -> None:
    k = queue.keys
    job_id = submit(queue, max_retries=2, payload={"fail": 1, "duration": 10})  # the first attempt fails
    before = clock.now_ms()
    worker.run_once()
    wait_idle(worker)
    after = clock.now_ms()
    due = client.zscore(k.delayed, job_id)
    assert due is not None
    base = queue.settings.retry_base_ms
    assert before + base // 2 <= due <= after + base  # first retry: between half and all of the base step
    record = client.hgetall(k.job(job_id))
    assert record["status"] == "pending" and record["retry_count"] == "1" and record["last_failed_worker"] == "w1"
    assert worker.run_once(now_ms=int(due) - 1) == 0
    assert worker._next_due_ms == int(due)
    assert worker.run_once(now_ms=int(due)) == 1
    wait_idle(worker)
    job = queue.get(job_id)
    assert job is not None and job["status"] == "completed" and job["retry_count"] == 1 and job["attempt"] == 2


def test_timeout_ends_the_attempt(client: redis.Redis, settings: QueueSettings, queue: Queue) -> None:
    w = make_worker(client, settings)
    w.register()
    job_id = queue.submit(JobSpec.parse({"service_required": "simulation", "max_retries": 0, "timeout_seconds": 0.2,
                                         "payload": {"duration": 30_000, "steps": 3}}))
    w.run_once()
    wait_idle(w)
    job = queue.get(job_id)
    assert job is not None and job["status"] == "timeout" and "timed out" in job["error"]


def test_cancel_stops_a_running_job(worker: Worker, queue: Queue) -> None:
    job_id = submit(queue, payload={"duration": 30_000, "steps": 3})
    worker.run_once()
    gevent.sleep(0.05)
    assert queue.cancel(job_id) == "cancelling"
    assert worker.stop_job(job_id, "cancel")
    wait_idle(worker)
    job = queue.get(job_id)
    assert job is not None and job["status"] == "cancelled" and "result" not in job


def test_reclaiming_a_lost_job_voids_the_old_attempt(client: redis.Redis, settings: QueueSettings,
                                                     queue: Queue) -> None:
    """The worker stalls past its lease, the job is recovered, and the same worker claims it again."""
    w = make_worker(client, settings, max_concurrent=2)
    w.register()
    job_id = submit(queue, payload={"duration": 30_000, "steps": 1})
    assert w.run_once() == 1
    gevent.sleep(0.05)
    first = w.running[job_id]
    later = clock.now_ms() + w.settings.lease_ms + 1
    assert queue.scripts.recover(now_ms=later, jitter=0.0).jobs == 1  # the job waits half the base step
    assert w.run_once(now_ms=later + settings.retry_base_ms // 2) == 1
    second = w.running[job_id]
    assert second is not first and second.claimed.attempt == "2"
    w.heartbeat()
    assert first.greenlet is not None
    first.greenlet.join(5)
    assert first.greenlet.dead, "the void attempt is still running"
    assert first.context.stop_reason == "lost"
    assert w.running.get(job_id) is second, "the void attempt's end dropped the live one"
    record = client.hgetall(queue.keys.job(job_id))
    assert record["status"] in ("assigned", "in_progress") and record["attempt"] == "2"
    second.context.stop("shutdown")
    wait_idle(w)
    assert client.hget(queue.keys.job(job_id), "status") == "pending"


# -- registration ---------------------------------------------------------------------------------------------------
def test_register_heartbeat_and_deregister_keys(client: redis.Redis, settings: QueueSettings, queue: Queue) -> None:
    k = queue.keys
    w = make_worker(client, settings, max_concurrent=2, worker_id="worker9-direct")
    w.register()
    record = client.hgetall(k.worker("worker9-direct"))
    assert record["worker_id"] == "worker9-direct" and record["status"] == "idle"
    assert record["max_concurrent_jobs"] == "2" and record["services"] == "simulation,broken"
    capabilities = orjson.loads(record["capabilities"])
    assert capabilities["services"] == ["simulation", "broken"]
    assert capabilities["performance"]["concurrent_jobs"] == 2
    assert "simulation-model-v1" in capabilities["models"]["simulation"]
    ttl = client.ttl(k.worker_heartbeat("worker9-direct"))
    assert 0 < ttl <= w.settings.heartbeat_ttl_s
    assert client.smembers(k.workers_active) == {"worker9-direct"}
    last = client.xrevrange(k.events, count=1)[0][1]
    assert last["event"] == "worker_connected" and last["worker_id"] == "worker9-direct"

    client.delete(k.worker_heartbeat("worker9-direct"))
    w.heartbeat()
    assert client.ttl(k.worker_heartbeat("worker9-direct")) > 0
    client.delete(k.worker("worker9-direct"))  # as after a Redis flush: the next beat registers again
    w.heartbeat()
    assert client.hget(k.worker("worker9-direct"), "worker_id") == "worker9-direct"

    assert w.scripts.deregister_worker("worker9-direct") == 0
    assert not client.exists(k.worker("worker9-direct"), k.worker_heartbeat("worker9-direct"))
    assert client.smembers(k.workers_active) == set()
    last = client.xrevrange(k.events, count=1)[0][1]
    assert last["event"] == "worker_disconnected"


def test_worker_process_runs_jobs_and_deregisters_on_term(env_base: dict[str, str], client: redis.Redis,
                                                          queue: Queue) -> None:
    """A real worker process: wakes on submit, completes, and removes its keys on SIGTERM."""
    k = queue.keys
    env = {**env_base, "WORKER_POLL_INTERVAL_MS": "60000", "WORKER_HEARTBEAT_INTERVAL_MS": "200", **SIM_ENV}
    with worker_process(env, client, "proc-worker") as proc:
        job_id = submit(queue, payload={"duration": 20, "steps": 2})
        # the poll interval is a minute: only the wake-up signal can make this finish in time
        wait_alive(proc, lambda: client.hget(k.job(job_id), "status") == "completed", 10, "the job")
        assert client.hget(k.job(job_id), "worker_id") == "proc-worker"
    assert "proc-worker" not in client.smembers(k.workers_active)
    assert not client.exists(k.worker("proc-worker"), k.worker_heartbeat("proc-worker"))


# -- the edges of a worker's life: stop signals at any moment, errors that are not outages ------------------------
def spawn_worker(env: dict[str, str], worker_id: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "appliance.worker_process"],
                            env={**env, "WORKER_ID": worker_id, **SIM_ENV, **extra}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def left_no_trace(client: redis.Redis, worker_id: str) -> bool:
    """Not registered, and every registration it made was followed by its deregistration."""
    k = Keys()
    seen = [f["event"] for _, f in client.xrange(k.events) if f.get("worker_id") == worker_id]
    return (worker_id not in client.smembers(k.workers_active) and not client.exists(k.worker(worker_id))
            and seen.count("worker_connected") == seen.count("worker_disconnected"))


@pytest.mark.parametrize("delay_s", [0.0, 0.01, 0.025, 0.05, 0.3])
def test_sigterm_at_any_moment_of_a_start_ends_the_worker_cleanly(env_base: dict[str, str], client: redis.Redis,
                                                                 delay_s: float) -> None:
    """SIGTERM while the process starts: before Python runs it is killed by the signal; after that, its early
    handler remembers the stop, and it exits 0 without registering (or, once registered, deregisters)."""
    proc = spawn_worker(env_base, "term-early")
    time.sleep(delay_s)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert left_no_trace(client, "term-early"), out


def test_a_stop_supervisord_sent_before_the_process_could_catch_it_is_not_lost(env_base: dict[str, str],
                                                                              client: redis.Redis) -> None:
    """supervisord's SIGTERM can land between its fork and exec, where no handler of ours exists yet: the worker
    asks supervisord (SUPERVISOR_SERVER_URL) and, told it is STOPPING, exits without registering."""
    asked: list[str] = []

    def get_process_info(name: str) -> dict[str, str]:
        asked.append(name)
        return {"name": name, "statename": "STOPPING"}

    server = SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False, allow_none=True)
    server.register_function(get_process_info, "supervisor.getProcessInfo")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        proc = spawn_worker(env_base, "worker7", SUPERVISOR_SERVER_URL=f"http://127.0.0.1:{server.server_address[1]}",
                            SUPERVISOR_GROUP_NAME="workers", SUPERVISOR_PROCESS_NAME="worker7")
        out, _ = proc.communicate(timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, out
    assert asked == ["workers:worker7"] and "told to stop before it registered" in out
    assert left_no_trace(client, "worker7") and not client.xrange(Keys().events)


@pytest.mark.slow
def test_an_error_that_is_no_outage_ends_the_worker_with_the_error_logged(env_base: dict[str, str],
                                                                          client: redis.Redis) -> None:
    """A script that fails (here: a key of the wrong type) is a bug, not an outage: the worker does not go on
    looking alive while it claims nothing, it exits 1 with the error in its log (supervisord restarts it)."""
    client.set(Keys().leases, "not a sorted set")
    proc = spawn_worker(env_base, "broken-redis", WORKER_POLL_INTERVAL_MS="100")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert "WRONGTYPE" in out and "not a Redis outage" in out and "Redis unavailable" not in out
    assert left_no_trace(client, "broken-redis"), out
