"""Jobs of a service no registered worker offers are `unworkable` (with the reason) and go back in line when one
does; a worker restarting within the window churns nothing; a job waiting for an unhealthy service says why."""

from __future__ import annotations

import falcon.testing
import orjson
import pytest
import redis

from appliance import clock
from appliance.api.app import create_app
from appliance.jobs import JobSpec
from appliance.queue import Queue
from appliance.scripts import OFFERED_WINDOW_MS
from appliance.settings import ApiSettings, QueueSettings
from conftest import free_port
from procs import wait_for, worker_process

FAST_SIM = {"WORKER_SIMULATION_PROCESSING_TIME": "0.1", "WORKER_SIMULATION_STEPS": "2",
            "WORKER_HEARTBEAT_INTERVAL_MS": "500", "LOG_LEVEL": "warning"}


def submit(queue: Queue, service: str, priority: int = 50, now_ms: int | None = None, **more: object) -> str:
    return queue.submit(JobSpec.parse({"service_required": service, "priority": priority, **more}), now_ms=now_ms)


def offer(queue: Queue, worker_id: str, now_ms: int | None = None, **offers: str) -> None:
    """Register a stand-in worker offering `offers` (service → '' if healthy, else its health error), with the
    capabilities a real worker records."""
    fields = {"capabilities": orjson.dumps({"services": list(offers)}).decode()}
    queue.scripts.register_worker(worker_id, 60, fields, offers, now_ms=now_ms)


def events(client: redis.Redis, queue: Queue, job_id: str) -> list[str]:
    return [fields["event"] for _, fields in client.xrange(queue.keys.progress(job_id))]


def status(queue: Queue, job_id: str) -> str:
    job = queue.get(job_id)
    assert job is not None
    return str(job["status"])


# -- at submit ----------------------------------------------------------------------------------------------
def test_a_job_nobody_offers_is_unworkable_at_once_naming_what_is_offered(client: redis.Redis,
                                                                            settings: QueueSettings) -> None:
    queue = Queue(client, settings)
    offer(queue, "w1", simulation="")
    offer(queue, "w2", simulation="", comfyui="")
    api = falcon.testing.TestClient(create_app(ApiSettings(queue=settings), queue))
    result = api.simulate_post("/api/jobs", json={"service_required": "nop", "priority": 7})
    assert result.status_code == 201
    job = api.simulate_get(f"/api/jobs/{result.json['job_id']}").json["job"]
    assert job["status"] == "unworkable"
    assert job["unworkable_reason"] == ("no registered worker offers service 'nop'; "
                                        "services offered in the last 300s: comfyui, simulation")
    assert "waiting_reason" not in job
    assert events(client, queue, job["id"]) == ["submitted", "unworkable"]  # what SSE and WebSocket relay
    k = queue.keys
    assert client.zscore(k.pending, job["id"]) is None and client.zcard(k.pending_service("nop")) == 0
    assert client.zrange(k.unoffered("nop"), 0, -1) == [job["id"]]
    assert queue.counts()["unworkable"] == 1
    assert "unworkable: 1 jobs of service 'nop': no registered worker offers it" in queue.service_notes()
    served = submit(queue, "simulation")
    assert status(queue, served) == "pending"


def test_a_requirement_class_job_of_a_service_nobody_offers_is_unworkable_too(queue: Queue,
                                                                              client: redis.Redis) -> None:
    offer(queue, "w1", simulation="")
    job_id = submit(queue, "nop", requirements={"gpu_memory_gb": 8})
    assert status(queue, job_id) == "unworkable"
    assert "offers service 'nop'" in queue.get(job_id)["unworkable_reason"]  # type: ignore[index]
    offer(queue, "w2", nop="")
    assert status(queue, job_id) == "pending"
    queue_key = client.hget(queue.keys.job(job_id), "queue")
    assert queue_key != queue.keys.pending_service("nop") and client.zrange(queue_key, 0, -1) == [job_id]


def test_with_no_worker_at_all_jobs_wait_and_say_why(queue: Queue, client: redis.Redis) -> None:
    """No service offered lately (the appliance is starting, or every worker is down) judges no service."""
    job_id = submit(queue, "simulation")
    job = queue.get(job_id)
    assert job is not None and job["status"] == "pending"
    assert job["waiting_reason"].startswith(f"no worker offered any service in the last "
                                            f"{OFFERED_WINDOW_MS // 1000}s: it waits for a worker to register")
    offer(queue, "w1", simulation="")
    assert "waiting_reason" not in queue.get(job_id)  # type: ignore[operator]


def test_a_service_offered_lately_but_by_no_live_worker_now_says_so(queue: Queue) -> None:
    """Every worker down, or the one offering a service restarting without it: not unworkable yet, not silent."""
    offer(queue, "w1", simulation="", noop="")
    offer(queue, "w2", simulation="")
    queue.scripts.deregister_worker("w1")
    noop_job, sim_job = submit(queue, "noop"), submit(queue, "simulation")
    job = queue.get(noop_job)
    assert job is not None and job["status"] == "pending"
    assert job["waiting_reason"].startswith("no live worker offers service 'noop' now (last offered 0s ago); "
                                            f"its jobs become unworkable if none offers it within "
                                            f"{OFFERED_WINDOW_MS // 1000}s")
    assert "waiting_reason" not in queue.get(sim_job)  # type: ignore[operator]
    assert any(line.startswith("waiting: 1 jobs of service 'noop': no live worker") for line in queue.service_notes())
    queue.scripts.deregister_worker("w2")
    job = queue.get(sim_job)
    assert job is not None and job["waiting_reason"].startswith("no live worker offers service 'simulation' now")


# -- back in line -------------------------------------------------------------------------------------------
def test_unworkable_jobs_go_back_at_their_place_when_a_worker_offering_the_service_registers(
        queue: Queue, client: redis.Redis, env_base: dict[str, str]) -> None:
    offer(queue, "w1", simulation="")
    low = submit(queue, "noop", priority=1)
    first = submit(queue, "noop", priority=9)
    second = submit(queue, "noop", priority=9)
    assert [status(queue, j) for j in (low, first, second)] == ["unworkable"] * 3
    env = {**env_base, **FAST_SIM, "WORKER_CONNECTORS": "noop", "WORKER_SERVICES": "noop"}
    with worker_process(env, client, "noop-worker"):
        wait_for(lambda: all(status(queue, j) == "completed" for j in (low, first, second)), 30, "noop jobs done")
    for job_id in (low, first, second):
        assert events(client, queue, job_id)[:4] == ["submitted", "unworkable", "requeued", "assigned"]
        assert client.hget(queue.keys.job(job_id), "unworkable_reason") == ""
    started = [client.hget(queue.keys.job(j), "assigned_at") for j in (first, second, low)]
    assert started == sorted(started), "revived at their priority and place"
    assert client.zcard(queue.keys.unoffered("noop")) == 0


def test_a_requirement_class_is_kept_while_its_service_has_jobs_nobody_offers(queue: Queue,
                                                                              client: redis.Redis) -> None:
    """Revived jobs go back to their class's queue, which workers find through the class's record."""
    t0 = clock.now_ms()
    offer(queue, "w1", now_ms=t0, simulation="")
    job_id = submit(queue, "nop", now_ms=t0, requirements={"gpu_memory_gb": 1})
    assert status(queue, job_id) == "unworkable"
    later = t0 + 3_600_000
    assert queue.scripts.prune_classes(idle_ms=1000, now_ms=later) == 0
    offer(queue, "w2", now_ms=later, nop="")
    assert client.smembers(queue.keys.requirement_classes("nop")), "the class is still known"
    assert queue.cancel(job_id) == "cancelled"
    assert queue.scripts.prune_classes(idle_ms=1000, now_ms=later + 1000) == 1


def test_a_cancelled_unworkable_job_stays_cancelled(queue: Queue) -> None:
    offer(queue, "w1", simulation="")
    job_id = submit(queue, "noop")
    assert queue.cancel(job_id) == "cancelled"
    offer(queue, "w2", noop="")
    assert status(queue, job_id) == "cancelled"


# -- the window ---------------------------------------------------------------------------------------------
def test_a_worker_restart_within_the_window_churns_nothing(queue: Queue, client: redis.Redis,
                                                           env_base: dict[str, str]) -> None:
    offer(queue, "other", other="")  # some service stays offered throughout, so services are judged
    env = {**env_base, **FAST_SIM, "WORKER_CONNECTORS": "simulation", "WORKER_SERVICES": "simulation"}
    with worker_process(env, client, "sim-worker"):
        pass  # registered, then stopped cleanly (deregistered): as across `bin/appliance restart workers`
    assert "sim-worker" not in queue.worker_ids()
    job_id = submit(queue, "simulation")
    assert queue.classes.sweep_services() == (0, 0)  # the API's janitor
    assert status(queue, job_id) == "pending"
    with worker_process(env, client, "sim-worker"):
        wait_for(lambda: status(queue, job_id) == "completed", 30, "the job done")
    assert "unworkable" not in events(client, queue, job_id)


def test_past_the_window_the_janitor_marks_waiting_jobs_and_a_heartbeat_brings_them_back(
        queue: Queue, client: redis.Redis) -> None:
    t0 = clock.now_ms()
    offer(queue, "sim", now_ms=t0, simulation="")
    job_id = submit(queue, "simulation", now_ms=t0)
    score = client.zscore(queue.keys.pending_service("simulation"), job_id)
    queue.scripts.deregister_worker("sim")
    later = t0 + OFFERED_WINDOW_MS + 1000
    offer(queue, "other", now_ms=later, other="")
    assert queue.classes.sweep_services(now_ms=later - 2000) == (0, 0)  # still within the window
    assert queue.classes.sweep_services(now_ms=later) == (1, 0)
    job = queue.get(job_id)
    assert job is not None and job["status"] == "unworkable"
    assert job["unworkable_reason"] == ("no registered worker offers service 'simulation'; "
                                        "services offered in the last 300s: other")
    assert events(client, queue, job_id)[-1] == "unworkable"
    offer(queue, "sim", now_ms=later + 1, simulation="")
    assert queue.scripts.heartbeat_worker("sim", 60, 20_000, {}, {}, {"simulation": ""}, now_ms=later + 2)
    assert status(queue, job_id) == "pending"
    assert client.zscore(queue.keys.pending_service("simulation"), job_id) == score
    assert events(client, queue, job_id)[-1] == "requeued"


def test_the_janitor_revives_what_a_worker_left_unworkable(queue: Queue) -> None:
    offer(queue, "w1", simulation="")
    job_id = submit(queue, "noop")
    queue.client.zadd(queue.keys.services_offered, {"noop": clock.now_ms()})  # offered, not yet revived
    assert queue.classes.sweep_services() == (0, 1)
    assert status(queue, job_id) == "pending"


# -- unhealthy ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_job_waiting_for_an_unhealthy_service_says_why(queue: Queue, client: redis.Redis,
                                                         env_base: dict[str, str]) -> None:
    port = free_port()  # nothing listens: ComfyUI is down
    env = {**env_base, "WORKER_CONNECTORS": "comfyui,simulation", "WORKER_SERVICES": "comfyui,simulation",
           "WORKER_COMFYUI_PORT": str(port), "WORKER_COMFYUI_HOST": "127.0.0.1", "LOG_LEVEL": "warning",
           "WORKER_COMFYUI_HEALTH_INTERVAL_SECONDS": "0.2", "WORKER_HEARTBEAT_INTERVAL_MS": "500"}
    with worker_process(env, client, "gpu-worker"):
        job_id = submit(queue, "comfyui")
        job = queue.get(job_id)
        assert job is not None and job["status"] == "pending", "servable once ComfyUI answers"
        reason = job["waiting_reason"]
        assert reason.startswith(f"service 'comfyui' is configured on gpu-worker but unhealthy: ComfyUI at "
                                 f"http://127.0.0.1:{port} does not answer")
        assert f"waiting: 1 jobs of service 'comfyui': {reason}" in queue.service_notes()
        sim_job = queue.get(submit(queue, "simulation", priority=0))  # healthy there: it does not wait
        assert sim_job is not None and "waiting_reason" not in sim_job
    offer(queue, "gpu-2", comfyui="")  # a worker where ComfyUI answers
    job = queue.get(job_id)
    assert job is not None and job["status"] == "pending" and "waiting_reason" not in job


def test_an_unhealthy_note_waits_while_another_worker_serves_the_service(queue: Queue) -> None:
    offer(queue, "healthy", comfyui="")
    offer(queue, "sick", comfyui="connection refused")
    job_id = submit(queue, "comfyui")
    assert "waiting_reason" not in queue.get(job_id)  # type: ignore[operator]
    assert queue.service_notes() == []
