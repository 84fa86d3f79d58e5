"""Requirements: checked at submit, matched per kind, requirement-class queues, starvation and `unworkable`."""

from __future__ import annotations

import time
from typing import Any

import falcon.testing
import orjson
import pytest
import redis

from appliance import clock
from appliance.api.app import create_app
from appliance.classes import ClaimPlanner, ClassBook
from appliance.errors import ValidationError
from appliance.jobs import JobSpec
from appliance.matching import WorkerProfile, parse_requirements
from appliance.queue import Queue
from appliance.settings import ApiSettings, QueueSettings, SettingsError

LEASE_MS = 60_000


def caps(**over: Any) -> dict[str, Any]:
    """A worker's capabilities: a 24 GB RTX 4090 box serving simulation, overridable per part."""
    base: dict[str, Any] = {
        "services": ["simulation"],
        "hardware": {"gpu_count": 1, "gpu_memory_gb": 24, "gpu_model": "NVIDIA GeForce RTX 4090",
                     "cpu_cores": 16, "ram_gb": 64},
        "models": {"simulation": ["sdxl", "flux-dev"]},
        "customer_access": {"isolation": "loose", "allowed_customers": [], "denied_customers": []},
        "custom": {"region": "eu", "features": ["upscale", "inpaint"], "vram_class": 3, "fast": True},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def register(queue: Queue, worker_id: str, capabilities: dict[str, Any]) -> None:
    queue.scripts.register_worker(worker_id, 60, {"capabilities": orjson.dumps(capabilities).decode()})


def submit(queue: Queue, requirements: dict[str, Any] | None = None, customer_id: str = "",
           priority: int = 50, service: str = "simulation") -> str:
    return queue.submit(JobSpec(service_required=service, priority=priority, requirements=requirements or {},
                                customer_id=customer_id))


def claim(queue: Queue, worker_id: str, capabilities: dict[str, Any], telemetry: dict[str, Any] | None = None,
          count: int = 1) -> list[str]:
    """What this worker claims now, through the same planner the worker uses."""
    planner = ClaimPlanner(ClassBook(queue.client, queue.keys, queue.scripts))
    queues = planner.queues(list(capabilities["services"]), lambda: capabilities, telemetry)
    return [job.id for job in queue.scripts.claim(worker_id, queues, count, LEASE_MS).jobs]


# -- parsing ------------------------------------------------------------------------------------------------
def test_unknown_requirement_is_refused_naming_it() -> None:
    with pytest.raises(ValidationError) as err:
        parse_requirements({"gpu_memory_gb": 8, "timeout_minutes": 5})
    assert err.value.field == "requirements.timeout_minutes"
    with pytest.raises(ValidationError) as err:
        parse_requirements({"negative_requirements": {"quality_level": "high"}})
    assert err.value.field == "requirements.negative_requirements.quality_level"


@pytest.mark.parametrize("raw, field", [
    ({"gpu_memory_gb": "lots"}, "requirements.gpu_memory_gb"),
    ({"gpu_memory_gb": -1}, "requirements.gpu_memory_gb"),
    ({"cpu_cores": True}, "requirements.cpu_cores"),
    ({"models": [1, 2]}, "requirements.models"),
    ({"customer_isolation": "paranoid"}, "requirements.customer_isolation"),
    ({"custom.region": {"a": 1}}, "requirements.custom.region"),
    ({"custom..x": 1}, "requirements.custom..x"),
    ({"positive_requirements": [1]}, "requirements.positive_requirements"),
    ({"positive_requirements": {"negative_requirements": {}}},
     "requirements.positive_requirements.negative_requirements"),
    ([1], "requirements"),
])
def test_bad_values_are_refused(raw: Any, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_requirements(raw)
    assert err.value.field == field


def test_canonical_form() -> None:
    assert parse_requirements({}) == {}
    assert parse_requirements({"gpu_memory_gb": "all", "customer_isolation": "loose", "models": []}) == {}
    assert parse_requirements({"gpu_memory_gb": 8.0, "models": "b", "positive_requirements": {"ram_gb": 4},
                               "negative_requirements": {"gpu_model": ["T4", "K80", "T4"]}}) == {
        "gpu_memory_gb": 8, "models": ["b"], "ram_gb": 4, "negative_requirements": {"gpu_model": ["K80", "T4"]}}


def test_api_answers_400_for_an_unknown_requirement(queue: Queue, settings: QueueSettings) -> None:
    app = falcon.testing.TestClient(create_app(ApiSettings(queue=settings), queue))
    reply = app.simulate_post("/api/jobs", json={"service_required": "simulation",
                                                 "requirements": {"quality_level": "high"}})
    assert reply.status_code == 400
    assert reply.json["success"] is False
    assert reply.json["field"] == "requirements.quality_level"
    assert queue.depth() == 0
    ok = app.simulate_post("/api/jobs", json={"service_required": "simulation",
                                              "requirements": {"gpu_memory_gb": 8}})
    assert ok.status_code == 201


def test_worker_profile_settings() -> None:
    profile = WorkerProfile.from_env({"WORKER_CUSTOMER_ISOLATION": "strict", "WORKER_ALLOWED_CUSTOMERS": "a,b",
                                      "WORKER_CUSTOM_CAPABILITIES": '{"region": "eu"}'})
    assert profile.customer_access() == {"isolation": "strict", "allowed_customers": ["a", "b"],
                                         "denied_customers": []}
    assert profile.custom == {"region": "eu"}
    with pytest.raises(SettingsError, match="WORKER_CUSTOM_CAPABILITIES"):
        WorkerProfile.from_env({"WORKER_CUSTOM_CAPABILITIES": "[1]"})


# -- classes ------------------------------------------------------------------------------------------------
def test_jobs_with_requirements_live_in_their_class_queue(queue: Queue, client: redis.Redis) -> None:
    register(queue, "any", caps())
    register(queue, "acme-only", caps(customer_access={"allowed_customers": ["acme"]}))  # names acme
    plain = submit(queue)
    a = submit(queue, {"gpu_memory_gb": 8})
    b = submit(queue, {"gpu_memory_gb": 8.0, "models": "all"})
    c = submit(queue, {"gpu_memory_gb": 8}, customer_id="acme")
    d = submit(queue, {"gpu_memory_gb": 8}, customer_id="nobody-names-them")
    e = submit(queue, customer_id="nobody-names-them")
    k = queue.keys
    assert client.hget(k.job(plain), "queue") == client.hget(k.job(e), "queue") == k.pending_service("simulation")
    qa, qb, qc, qd = (client.hget(k.job(j), "queue") for j in (a, b, c, d))
    assert qa == qb == qd != qc, "a customer makes a class of its own only when a worker names it"
    assert qa.startswith("jobs:pending:simulation:req:")
    assert set(client.zrange(qa, 0, -1)) == {a, b, d}
    assert client.scard(k.requirement_classes("simulation")) == 2
    assert int(client.get(k.classes_version)) == 2
    assert client.zcard(k.pending) == 6  # the guide's global view still shows every pending job


def test_idle_empty_classes_are_forgotten_and_come_back_with_their_next_job(queue: Queue,
                                                                            client: redis.Redis) -> None:
    k = queue.keys
    worker = caps(customer_access={"allowed_customers": ["gone", "waiting"]})  # named: a class each
    register(queue, "w", worker)
    gone = submit(queue, {"gpu_memory_gb": 1}, customer_id="gone")
    waiting = submit(queue, {"gpu_memory_gb": 1}, customer_id="waiting", priority=1)
    assert claim(queue, "w", worker) == [gone]  # its class queue is empty now; the other still holds a job
    gone_class, waiting_class = (client.hget(k.job(j), "queue").rsplit(":", 1)[1] for j in (gone, waiting))
    version = int(client.get(k.classes_version))
    later = clock.now_ms() + 5_000
    assert queue.scripts.prune_classes(idle_ms=10_000, now_ms=later) == 0, "not idle long enough"
    assert queue.scripts.prune_classes(idle_ms=1_000, now_ms=later) == 0, "kept: its job runs (it may come back)"
    assert queue.scripts.fail(gone, "w", "1", "boom", retryable=True, delay_ms=60_000).retrying
    assert queue.scripts.prune_classes(idle_ms=1_000, now_ms=later + 5_000) == 0, "kept: its job awaits a retry"
    client.zadd(k.delayed, {gone: 0})  # the retry is due
    assert claim(queue, "w", worker) == [gone], "back in its class's queue, which workers still read"
    queue.scripts.complete(gone, "w", "2", {})
    assert queue.scripts.prune_classes(idle_ms=1_000, now_ms=later + 10_000) == 1
    assert client.smembers(k.requirement_classes("simulation")) == {waiting_class}
    assert not client.exists(k.requirement_class(gone_class))
    assert client.zrange(k.classes_used, 0, -1) == [waiting_class]
    assert int(client.get(k.classes_version)) == version + 1, "workers plan their claim queues again"
    assert queue.scripts.prune_classes(idle_ms=1_000, now_ms=later) == 0, "a class with a job waiting is kept"
    back = submit(queue, {"gpu_memory_gb": 1}, customer_id="gone", priority=90)
    assert client.sismember(k.requirement_classes("simulation"), gone_class)
    assert int(client.get(k.classes_version)) == version + 2
    assert claim(queue, "w", worker, count=2) == [back, waiting]


@pytest.mark.parametrize("service", ["version", "used"])
def test_a_service_named_like_a_class_key_keeps_its_own_classes(queue: Queue, service: str) -> None:
    job_id = queue.submit(JobSpec.parse({"service_required": service, "requirements": {"gpu_memory_gb": 1}}))
    assert queue.get(job_id)["status"] == "pending"


# -- one test per requirement kind: a worker that fits claims, one that does not claims nothing -------------
KINDS = [
    ("gpu_memory_gb", {"gpu_memory_gb": 40}, "", caps(hardware={"gpu_memory_gb": 80}), caps()),
    ("gpu_count", {"gpu_count": 2}, "", caps(hardware={"gpu_count": 2}), caps()),
    ("cpu_cores", {"cpu_cores": 32}, "", caps(hardware={"cpu_cores": 64}), caps()),
    ("ram_gb", {"ram_gb": 128}, "", caps(hardware={"ram_gb": 256}), caps()),
    ("gpu_model", {"gpu_model": ["A100", "H100"]}, "", caps(hardware={"gpu_model": "NVIDIA H100 80GB HBM3"}), caps()),
    ("models", {"models": ["sdxl", "flux-dev"]}, "", caps(), caps(models={"simulation": ["sdxl"]})),
    ("isolation", {"customer_isolation": "strict"}, "acme",
     caps(customer_access={"isolation": "strict"}), caps()),
    ("allowed", {}, "acme", caps(customer_access={"allowed_customers": ["acme"]}),
     caps(customer_access={"allowed_customers": ["other"]})),
    ("denied", {}, "acme", caps(), caps(customer_access={"denied_customers": ["acme"]})),
    ("custom equal", {"custom.region": "eu"}, "", caps(), caps(custom={"region": "us"})),
    ("custom number", {"custom.vram_class": 3}, "", caps(), caps(custom={"vram_class": 2})),
    ("custom list", {"custom.features": ["upscale", "inpaint"]}, "", caps(), caps(custom={"features": ["upscale"]})),
    ("custom contains", {"custom.features": "inpaint"}, "", caps(), caps(custom={"features": []})),
    ("custom missing", {"custom.fast": True}, "", caps(), {**caps(), "custom": {}}),
    ("dot path", {"hardware.gpu_count": 1}, "", caps(), caps(hardware={"gpu_count": 0})),
    ("positive", {"positive_requirements": {"gpu_memory_gb": 40}}, "", caps(hardware={"gpu_memory_gb": 48}), caps()),
    ("negative", {"negative_requirements": {"gpu_model": "4090"}}, "", caps(hardware={"gpu_model": "L40S"}), caps()),
    ("service", {"gpu_memory_gb": 1}, "", caps(), caps(services=["simulation-other"])),
]


@pytest.mark.parametrize("name, requirements, customer, fits, misfits", KINDS, ids=[k[0] for k in KINDS])
def test_claim_per_requirement_kind(queue: Queue, name: str, requirements: dict[str, Any], customer: str,
                                    fits: dict[str, Any], misfits: dict[str, Any]) -> None:
    register(queue, "fits", fits)
    register(queue, "misfits", misfits)
    job_id = submit(queue, requirements, customer_id=customer)
    assert queue.get(job_id)["status"] == "pending"
    assert claim(queue, "misfits", misfits) == []
    assert claim(queue, "fits", fits) == [job_id]


def test_free_gpu_memory_is_judged_from_the_latest_heartbeat(queue: Queue) -> None:
    worker = caps()
    register(queue, "w", worker)
    job_id = submit(queue, {"gpu_memory_free_gb": 16})
    busy = {"gpu": {"ok": True, "memory_free_gb": 6.5}}
    idle = {"gpu": {"ok": True, "memory_free_gb": 22.0}}
    unreadable = {"gpu": {"ok": False, "error": "GPU is lost"}}
    assert claim(queue, "w", worker, busy) == []
    assert claim(queue, "w", worker, unreadable) == []
    assert queue.get(job_id)["status"] == "pending"  # 24 GB total: it could serve it, so not unworkable
    assert claim(queue, "w", worker, idle) == [job_id]


def test_priority_order_holds_across_class_queues(queue: Queue) -> None:
    worker = caps()
    register(queue, "w", worker)
    low = submit(queue, priority=10)
    high = submit(queue, {"gpu_memory_gb": 8}, priority=90)
    mid = submit(queue, {"models": ["sdxl"]}, priority=50)
    assert claim(queue, "w", worker, count=3) == [high, mid, low]


# -- starvation ---------------------------------------------------------------------------------------------
def bulk_submit(queue: Queue, count: int, requirements: dict[str, Any], priority: int) -> None:
    """`count` jobs of one class, through the submit script in pipelines (fast)."""
    job_class = queue.classes.for_job("simulation", parse_requirements(requirements), "")
    assert job_class is not None
    fields = JobSpec(service_required="simulation", requirements=requirements).stored_fields()
    for start in range(0, count, 5000):
        pipe = queue.client.pipeline(transaction=False)
        for n in range(start, min(count, start + 5000)):
            queue.scripts.submit_into(pipe, f"big-{n}", "simulation", priority, fields, job_class)
        pipe.execute()


@pytest.mark.slow
def test_100000_unservable_jobs_do_not_starve_a_servable_one(queue: Queue, client: redis.Redis) -> None:
    big, small = caps(hardware={"gpu_memory_gb": 80}), caps()
    register(queue, "big", big)  # someone can serve the big jobs, so they stay pending in front
    register(queue, "small", small)
    started = time.perf_counter()
    bulk_submit(queue, 100_000, {"gpu_memory_gb": 80}, priority=100)
    built_s = time.perf_counter() - started
    servable = submit(queue, {"gpu_memory_gb": 16}, priority=1)
    assert client.zcard(queue.keys.pending) == 100_001
    assert client.zrevrange(queue.keys.pending, 0, 0) != [servable]
    started = time.perf_counter()
    assert claim(queue, "small", small) == [servable]
    print(f"\n100,000 unservable jobs built in {built_s:.1f}s; first claim past them "
          f"(planner + claim) {1000 * (time.perf_counter() - started):.2f} ms")
    assert claim(queue, "big", big) == ["big-0"]


# -- unworkable ---------------------------------------------------------------------------------------------
def events(client: redis.Redis, queue: Queue, job_id: str) -> list[str]:
    return [fields["event"] for _, fields in client.xrange(queue.keys.progress(job_id))]


def test_unworkable_then_back_to_pending_when_a_capable_worker_registers(queue: Queue, client: redis.Redis) -> None:
    register(queue, "small", caps())
    job_id = submit(queue, {"gpu_memory_gb": 80})
    job = queue.get(job_id)
    assert job["status"] == "unworkable"
    assert "gpu_memory_gb 24 < 80" in job["unworkable_reason"]
    assert events(client, queue, job_id) == ["submitted", "unworkable"]
    assert client.zscore(queue.keys.pending, job_id) is None
    assert queue.counts()["unworkable"] == 1
    second = submit(queue, {"gpu_memory_gb": 80})
    assert queue.get(second)["status"] == "unworkable"
    big = caps(hardware={"gpu_memory_gb": 80})
    register(queue, "big", big)
    assert claim(queue, "big", big, count=2) == [job_id, second]  # revived in order, then claimed
    assert events(client, queue, job_id)[-2:] == ["requeued", "assigned"]
    assert queue.get(job_id)["status"] == "assigned"


def test_no_registered_worker_means_no_judgement(queue: Queue) -> None:
    job_id = submit(queue, {"gpu_memory_gb": 80})
    assert queue.get(job_id)["status"] == "pending"


def test_a_worker_sweep_marks_classes_left_without_a_capable_worker(queue: Queue) -> None:
    big = caps(hardware={"gpu_memory_gb": 80})
    register(queue, "big", big)
    register(queue, "small", caps())
    job_id = submit(queue, {"gpu_memory_gb": 80})
    assert queue.get(job_id)["status"] == "pending"
    queue.scripts.deregister_worker("big")
    assert claim(queue, "small", caps()) == []
    assert queue.get(job_id)["status"] == "unworkable"


def test_cancelled_unworkable_job_stays_cancelled(queue: Queue) -> None:
    register(queue, "small", caps())
    job_id = submit(queue, {"gpu_memory_gb": 80})
    assert queue.cancel(job_id) == "cancelled"
    big = caps(hardware={"gpu_memory_gb": 80})
    register(queue, "big", big)
    assert claim(queue, "big", big) == []
    assert queue.get(job_id)["status"] == "cancelled"
