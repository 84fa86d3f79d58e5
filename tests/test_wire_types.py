"""One typed shape per value: every route and every message type, against a real gunicorn, checked field by field.

Numbers are JSON numbers, lists are lists, objects are objects (never JSON text in a string), and every `*_at`,
`timestamp` and other time is ISO 8601 UTC (README: "Wire types").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import websocket

from appliance.queue import Queue
from appliance.settings import DEFAULT_LEASE_MS, QueueSettings, WorkerSettings
from appliance.worker import Worker
from connectors.simulation import SimulationConnector, SimulationSettings
from live_api import Api, FakeWorker, iso_utc, recv, running_api, send, sse, ws_connect
from procs import env_for

NUMBERS = frozenset({
    "priority", "progress", "retry_count", "max_retries", "attempt", "current_step", "total_steps",
    "workflow_priority", "workflow_datetime", "step_number", "timeout_seconds", "lease_ms", "pid",
    "max_concurrent_jobs", "current_jobs", "total_jobs_completed", "total_jobs_failed", "jobs_completed",
    "jobs_failed", "jobs_processed", "heartbeat_ttl_s", "total", "limit", "offset", "latency_ms",
    "gpu_count", "gpu_memory_gb", "cpu_cores", "ram_gb", "total_processing_time", "sse_connections",
    "total_connections", "total_jobs", "total_workers",
})
LISTS = frozenset({"services", "connectors", "ids", "topics", "supported_job_types", "events"})
OBJECTS = frozenset({"payload", "requirements", "result", "capabilities", "telemetry", "job_data", "worker_data",
                     "job", "hardware"})
TIMES = frozenset({"timestamp", "last_heartbeat", "last_status_change", "last_activity", "cancel_requested"})
NUMBER_TEXT = re.compile(r"^-?\d+(\.\d+)?$")
FREE_TEXT = frozenset({"hostname", "message", "error"})   # text that may happen to look like anything


def problems(value: Any, path: str = "", name: str = "") -> list[str]:
    """Every field of `value` (recursively) that is not in its one wire type."""
    found: list[str] = []
    if name.endswith("_at") or name in TIMES:
        if not iso_utc(value):
            found.append(f"{path}: expected an ISO 8601 UTC time, got {value!r}")
        return found
    if name in NUMBERS and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        found.append(f"{path}: expected a number, got {value!r}")
    if name in LISTS and not isinstance(value, list):
        found.append(f"{path}: expected a list, got {value!r}")
    if name in OBJECTS and not isinstance(value, dict):
        found.append(f"{path}: expected an object, got {value!r}")
    if isinstance(value, str) and name not in FREE_TEXT:
        if NUMBER_TEXT.match(value):
            found.append(f"{path}: a number sent as text: {value!r}")
        if value[:1] in ("{", "["):
            found.append(f"{path}: JSON sent as text: {value[:40]!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(problems(item, f"{path}.{key}", key))
    elif isinstance(value, list):
        for n, item in enumerate(value):
            found.extend(problems(item, f"{path}[{n}]"))
    return found


@pytest.fixture(scope="module")
def api(redis_server: str) -> Iterator[Api]:
    with running_api(env_for(redis_server)) as running:
        yield running


def collect(ws: websocket.WebSocket, wanted: set[str], limit: int = 500) -> list[dict[str, Any]]:
    """Messages until each type in `wanted` has come at least once."""
    got: list[dict[str, Any]] = []
    missing = set(wanted)
    while missing:
        assert len(got) < limit, f"still waiting for {missing} after {[m['type'] for m in got]}"
        message = recv(ws)
        got.append(message)
        missing.discard(message["type"])
    return got


def real_worker(client: redis.Redis, settings: QueueSettings, worker_id: str) -> Worker:
    """A worker as a worker process registers it (every field of its record), run by hand."""
    worker_settings = WorkerSettings(queue=settings, worker_id=worker_id, services=("simulation",),
                                     connectors=("simulation",))
    worker = Worker(worker_settings, client, client, {"simulation": SimulationConnector(SimulationSettings())})
    worker.register()
    return worker


@pytest.mark.slow
def test_every_route_and_message_type_has_typed_fields(api: Api, queue: Queue, client: redis.Redis,
                                                       settings: QueueSettings) -> None:
    seen: list[tuple[str, Any]] = []
    real_worker(client, settings, "wt-1")
    hands = FakeWorker(queue, "wt-1", register=False)

    def post(body: dict[str, Any]) -> str:
        status, reply = api.post_json("/api/jobs", body)
        assert status == 201, reply
        seen.append(("POST /api/jobs", reply))
        return str(reply["job_id"])

    # before the monitors connect (their snapshot shows these): a completed, a failed, a running, a waiting job
    done = post({"service_required": "simulation", "payload": {"steps": 2}})
    assert hands.claim() == done
    hands.progress(done, 50, "half", 1, 2)
    hands.complete(done, {"images": 1, "nested": {"values": [1, 2]}})
    failed = post({"service_required": "simulation", "max_retries": 1})
    hands.claim()
    hands.fail(failed, "flaky", retryable=True)
    hands.claim()
    hands.fail(failed, "broken")
    running = post({"service_required": "simulation", "priority": 5, "payload": {"duration": 1000},
                    "workflow_id": "wf-1", "workflow_priority": 7, "workflow_datetime": 1700000000000,
                    "step_number": 2, "timeout_seconds": 60})
    hands.claim()
    hands.progress(running, 50, "half", 1, 2)
    waiting = post({"service_required": "simulation", "requirements": {"gpu_memory_gb": 8}})

    legacy = ws_connect(api, "/")
    client_ws = ws_connect(api, "/ws/client/client-wire")
    monitor = ws_connect(api, "/ws/monitor/monitor-wire")
    hub = ws_connect(api, "/ws/monitor/hub-wire")
    for ws in (legacy, client_ws, monitor, hub):
        assert recv(ws)["type"] == "connected"
    send(monitor, {"type": "monitor_connect", "monitor_id": "monitor-wire", "request_full_state": True})
    send(monitor, {"type": "subscribe", "topics": ["workers", "jobs", "jobs:progress", "jobs:status",
                                                   "system_stats"]})
    monitor_got = collect(monitor, {"monitor_connected", "full_state_snapshot", "subscribed"})

    send(client_ws, {"type": "submit_job", "job_type": "simulation", "priority": 3, "payload": {"steps": 2},
                     "workflow_id": "wf-2", "workflow_priority": 4, "workflow_datetime": 1700000000001,
                     "step_number": 1, "id": "m1", "timestamp": 1796007933085})
    client_got = collect(client_ws, {"job_submitted"})
    own = client_got[-1]["job_id"]
    send(legacy, {"type": "submit_job", "id": "m2", "data": {"service_required": "simulation", "priority": 0}})
    legacy_got = collect(legacy, {"job_submitted"})
    cancelled = legacy_got[-1]["job_id"]
    send(legacy, {"type": "cancel_job", "job_id": cancelled})
    send(legacy, {"type": "subscribe_progress", "job_id": running})
    legacy_got += collect(legacy, {"job_cancelled", "subscribed"})

    assert hands.claim() == own
    hands.progress(own, 50, "half", 1, 2)
    hands.complete(own, {"ok": True})
    send(client_ws, {"type": "submit_job", "data": {"job_type": "simulation", "max_retries": 1}})
    client_got += collect(client_ws, {"complete_job", "job_submitted"})
    retried = [m for m in client_got if m["type"] == "job_submitted"][-1]["job_id"]
    send(legacy, {"type": "subscribe_progress", "job_id": retried})
    hands.claim()
    hands.fail(retried, "flaky", retryable=True)
    hands.claim()
    hands.fail(retried, "broken")
    hands.complete(running, {"done": True})
    real_worker(client, settings, "wt-2")
    queue.scripts.deregister_worker("wt-2")

    client_got += collect(client_ws, {"job_failed"})
    send(legacy, {"type": "get_job_status", "job_id": running})
    send(legacy, {"type": "ping"})
    legacy_got += collect(legacy, {"progress", "complete_job", "job_failed", "job_status", "pong"})
    monitor_got += collect(monitor, {"job_submitted", "job_assigned", "worker_status_changed",
                                     "job_status_changed", "job_progress", "job_completed", "job_failed",
                                     "worker_connected", "worker_disconnected"})
    send(monitor, {"type": "heartbeat", "monitor_id": "monitor-wire"})
    send(monitor, {"type": "resync_request", "since_timestamp": 0, "max_events": 1000})
    monitor_got += collect(monitor, {"heartbeat_ack", "resync_response", "system_stats"})
    hub_got = collect(hub, {"stats_broadcast", "job_accepted", "update_job_progress", "complete_job", "fail_job",
                            "worker_status", "worker_connected", "worker_disconnected"})
    send(hub, {"type": "request_stats", "id": "r1"})
    hub_got += collect(hub, {"response_stats"})
    expected = {
        "legacy": (legacy_got, {"job_submitted", "job_cancelled", "subscribed", "progress", "complete_job",
                                "job_failed", "job_status", "pong"}),
        "client": (client_got, {"job_submitted", "job_assigned", "job_status_changed", "update_job_progress",
                                "complete_job", "job_failed"}),
        "monitor": (monitor_got, {"monitor_connected", "full_state_snapshot", "subscribed", "job_submitted",
                                  "job_assigned", "worker_status_changed", "job_status_changed", "job_progress",
                                  "job_completed", "job_failed", "worker_connected", "worker_disconnected",
                                  "heartbeat_ack", "resync_response", "system_stats"}),
        "hub": (hub_got, {"stats_broadcast", "job_accepted", "update_job_progress", "complete_job", "fail_job",
                          "worker_status", "worker_connected", "worker_disconnected", "response_stats"}),
    }
    for name, (got, types) in expected.items():
        assert {m["type"] for m in got} >= types, name
        seen.extend((f"{name} {m['type']}", m) for m in got)

    sse_events: set[str] = set()
    for job_id in (done, failed, running, own, retried, cancelled):
        for frame in sse(api, job_id).events():
            sse_events.add(frame.event)
            seen.append((f"SSE {frame.event}", frame.data))
    assert sse_events >= {"connected", "submitted", "assigned", "in_progress", "progress", "completed",
                          "retrying", "failed", "cancelled"}

    for path in [f"/api/jobs/{j}" for j in (done, failed, running, waiting, own, retried, cancelled)] + [
            "/api/jobs", "/api/jobs?status=completed", "/api/workers", "/health", "/api/connection-stats"]:
        status, body = api.get_json(path)
        assert status == 200, body
        seen.append((f"GET {path}", body))

    found = [problem for where, message in seen for problem in problems(message, where)]
    assert found == [], "\n".join(found)

    # the values themselves come through, in their types
    job = api.get_json(f"/api/jobs/{running}")[1]["job"]
    assert (job["workflow_priority"], job["workflow_datetime"], job["step_number"], job["timeout_seconds"]) == (
        7, 1700000000000, 2, 60.0)
    assert job["result"] == {"done": True} and job["payload"] == {"duration": 1000}
    assert api.get_json(f"/api/jobs/{waiting}")[1]["job"]["requirements"] == {"gpu_memory_gb": 8}
    submitted = next(m for m in monitor_got if m["type"] == "job_submitted" and m["job_id"] == own)
    assert submitted["job_data"]["workflow_datetime"] == 1700000000001
    [worker] = api.get_json("/api/workers")[1]["workers"]
    assert worker["services"] == ["simulation"] == worker["capabilities"]["services"]
    assert worker["lease_ms"] == DEFAULT_LEASE_MS and "last_heartbeat_ms" not in worker
    legacy_progress = [m for m in legacy_got if m["type"] == "progress" and m["event"] == "progress"]
    assert legacy_progress and legacy_progress[0]["data"]["progress"] == 50
    assert any(m.get("retry_at") for m in client_got if m["type"] == "job_status_changed")
    for ws in (legacy, client_ws, monitor, hub):
        ws.close()


def test_problems_finds_every_kind_of_mistyped_value() -> None:
    """The checker itself: each mistake the appliance once made is caught."""
    bad = {"priority": "5", "progress": "0", "result": '{"a": 1}', "services": "a,b", "created_at": 1700000000000,
           "updated_at": "2026-01-01 10:00:00", "timestamp": 1796007933085, "lease_ms": "15000",
           "data": {"retry_at": "1700000000000", "payload": "[]"}}
    found = problems(bad, "x")
    for name in ("priority", "progress", "result", "services", "created_at", "updated_at", "timestamp",
                 "lease_ms", "retry_at", "payload"):
        assert any(f".{name}:" in problem for problem in found), (name, found)
    assert problems({"priority": 5, "created_at": "2026-01-01T10:00:00.000Z", "result": {"a": [1]}}, "x") == []
