"""The HTTP API through falcon.testing against create_app, with the queue on the private redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import falcon.testing
import orjson
import pytest
import redis

from appliance.api.app import create_app
from appliance.queue import Queue
from appliance.redis_conn import connect
from appliance.settings import ApiSettings, QueueSettings
from conftest import free_port

ISO_RE = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


@pytest.fixture()
def api(client: redis.Redis, settings: QueueSettings) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(ApiSettings(queue=settings), Queue(client, settings)))


@pytest.fixture()
def dead_api() -> Iterator[falcon.testing.TestClient]:
    """An app whose Redis is a closed port."""
    settings = QueueSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    conn = connect(settings.redis_url)
    yield falcon.testing.TestClient(create_app(ApiSettings(queue=settings), Queue(conn, settings)))
    conn.close()


def post_job(api: falcon.testing.TestClient, body: Any) -> falcon.testing.Result:
    return api.simulate_post("/api/jobs", json=body)


def assert_error(result: falcon.testing.Result, status: int, field: str | None = None) -> dict[str, Any]:
    """A 4xx/5xx in the {success: false, error, timestamp} envelope, naming `field` in the message."""
    assert result.status_code == status, result.text
    body = result.json
    assert body["success"] is False
    assert isinstance(body["error"], str) and body["error"]
    assert "timestamp" in body
    if field is not None:
        assert field in body["error"]
        assert body.get("field") == field
    return body


# -- health ----------------------------------------------------------------------------------------------------
def test_health(api: falcon.testing.TestClient, client: redis.Redis) -> None:
    client.sadd("workers:active", "worker1-direct")
    post_job(api, {"service_required": "simulation"})
    for path in ("/health", "/api/health"):
        result = api.simulate_get(path)
        assert result.status_code == 200
        body = result.json
        assert body["success"] is True and body["status"] == "ok"
        assert body["redis"]["ok"] is True
        assert body["workers"] == {"active": 1, "ids": ["worker1-direct"]}
        assert body["queue"] == {"pending": 1}
        assert body["timestamp"]


def test_health_503_when_redis_unreachable(dead_api: falcon.testing.TestClient) -> None:
    result = dead_api.simulate_get("/health")
    body = assert_error(result, 503)
    assert body["status"] == "unavailable" and body["redis"]["ok"] is False
    assert "Redis" in body["error"]


def test_other_routes_503_when_redis_unreachable(dead_api: falcon.testing.TestClient) -> None:
    assert_error(post_job(dead_api, {"service_required": "simulation"}), 503)
    assert_error(dead_api.simulate_get("/api/jobs"), 503)
    assert_error(dead_api.simulate_get("/api/jobs/abc"), 503)
    assert_error(dead_api.simulate_get("/api/workers"), 503)


# -- submit and read --------------------------------------------------------------------------------------------
def test_submit_then_get(api: falcon.testing.TestClient, client: redis.Redis) -> None:
    """The guide's curl: POST /api/jobs → 201 {success, job_id, message, timestamp}; GET returns the job."""
    body = {"service_required": "simulation", "priority": 100, "payload": {"action": "test", "duration": 5000}}
    result = post_job(api, body)
    assert result.status_code == 201
    reply = result.json
    assert set(reply) == {"success", "job_id", "message", "timestamp"}
    assert reply["success"] is True and reply["message"] == "Job submitted successfully"
    assert reply["timestamp"].endswith("Z")
    job_id = reply["job_id"]
    assert client.zrevrange("jobs:pending", 0, -1) == [job_id]

    result = api.simulate_get(f"/api/jobs/{job_id}")
    assert result.status_code == 200
    got = result.json
    assert got["success"] is True and set(got) == {"success", "job", "timestamp"}
    job = got["job"]
    assert job["id"] == job_id and job["status"] == "pending"
    assert job["service_required"] == "simulation" and job["job_type"] == "simulation"
    assert job["priority"] == 100 and job["progress"] == 0 and job["retry_count"] == 0 and job["max_retries"] == 3
    assert job["payload"] == {"action": "test", "duration": 5000} and job["requirements"] == {}
    assert job["created_at"].endswith("Z")
    for hidden in ("seq", "score", "created_ms"):
        assert hidden not in job


def test_submit_with_fallback_names_and_text_json(api: falcon.testing.TestClient) -> None:
    """`job_type` stands in for service_required; a body sent without a Content-Type still parses as JSON, one
    declared as text is refused (415: a page of another site could send that without a preflight)."""
    body = '{"job_type":"simulation","priority":0}'
    assert api.simulate_post("/api/jobs", body=body, headers={"Content-Type": "text/plain"}).status_code == 415
    result = api.simulate_post("/api/jobs", body=body)
    assert result.status_code == 201
    job = api.simulate_get(f"/api/jobs/{result.json['job_id']}").json["job"]
    assert job["service_required"] == "simulation" and job["priority"] == 0


def test_get_unknown_job_is_404_envelope(api: falcon.testing.TestClient) -> None:
    body = assert_error(api.simulate_get("/api/jobs/no-such-job"), 404)
    assert body["error"] == "Job not found" and body["job_id"] == "no-such-job"


def test_unknown_route_and_method_in_envelope(api: falcon.testing.TestClient) -> None:
    assert_error(api.simulate_get("/api/nothing-here"), 404)
    assert_error(api.simulate_put("/api/jobs"), 405)


def test_get_finished_job_carries_result_or_error(api: falcon.testing.TestClient, client: redis.Redis,
                                                  settings: QueueSettings) -> None:
    queue = Queue(client, settings)
    done = post_job(api, {"service_required": "simulation", "priority": 2}).json["job_id"]
    bad = post_job(api, {"service_required": "simulation", "priority": 1, "max_retries": 0}).json["job_id"]
    jobs = queue.scripts.claim("w1", [queue.keys.pending_service("simulation")], 2, 20000).jobs
    queue.scripts.progress(done, "w1", jobs[0].attempt, 50, "half")
    job = api.simulate_get(f"/api/jobs/{done}").json["job"]
    assert job["status"] == "in_progress" and job["progress"] == 50 and job["worker_id"] == "w1"
    queue.scripts.complete(done, "w1", jobs[0].attempt, {"value": 1})
    queue.scripts.fail(bad, "w1", jobs[1].attempt, "it broke", retryable=True, delay_ms=0)
    job = api.simulate_get(f"/api/jobs/{done}").json["job"]
    assert job["status"] == "completed" and job["progress"] == 100 and job["result"] == {"value": 1}
    assert job["completed_at"]
    job = api.simulate_get(f"/api/jobs/{bad}").json["job"]
    assert job["status"] == "failed" and job["error"] == "it broke" and job["failed_at"]


def test_cancel_pending_job(api: falcon.testing.TestClient) -> None:
    job_id = post_job(api, {"service_required": "simulation"}).json["job_id"]
    result = api.simulate_delete(f"/api/jobs/{job_id}")
    assert result.status_code == 200 and result.json["status"] == "cancelled"
    assert api.simulate_get(f"/api/jobs/{job_id}").json["job"]["status"] == "cancelled"
    assert_error(api.simulate_delete(f"/api/jobs/{job_id}"), 409)
    assert_error(api.simulate_delete("/api/jobs/unknown"), 404)


# -- listing -----------------------------------------------------------------------------------------------------
def test_list_filters_totals_and_pages(api: falcon.testing.TestClient, client: redis.Redis,
                                       settings: QueueSettings) -> None:
    ids = [post_job(api, {"service_required": "simulation" if n % 2 else "other", "priority": n}).json["job_id"]
           for n in range(9)]
    queue = Queue(client, settings)
    claimed = queue.scripts.claim("w1", [queue.keys.pending_service("simulation")], 1, 20000).jobs[0]
    assert claimed.id == ids[7]

    body = api.simulate_get("/api/jobs").json
    assert body["success"] is True and body["total"] == 9 and body["limit"] == 50 and body["offset"] == 0
    assert [job["id"] for job in body["jobs"]] == ids[::-1]

    body = api.simulate_get("/api/jobs", params={"limit": 4, "offset": 2}).json
    assert body["total"] == 9 and [job["id"] for job in body["jobs"]] == ids[::-1][2:6]

    body = api.simulate_get("/api/jobs", params={"status": "pending"}).json
    assert body["total"] == 8 and ids[7] not in [job["id"] for job in body["jobs"]]
    body = api.simulate_get("/api/jobs", params={"status": "assigned"}).json
    assert body["total"] == 1 and body["jobs"][0]["id"] == ids[7]

    body = api.simulate_get("/api/jobs", params={"service_required": "other"}).json
    assert body["total"] == 5 and [job["id"] for job in body["jobs"]] == ids[8::-2]
    assert all(job["service_required"] == "other" for job in body["jobs"])

    body = api.simulate_get("/api/jobs", params={"service_required": "simulation", "status": "pending",
                                                 "limit": 2}).json
    assert body["total"] == 3 and [job["id"] for job in body["jobs"]] == [ids[5], ids[3]]

    body = api.simulate_get("/api/jobs", params={"status": "completed"}).json
    assert body["total"] == 0 and body["jobs"] == []
    body = api.simulate_get("/api/jobs", params={"offset": 100}).json
    assert body["total"] == 9 and body["jobs"] == []


# -- workers -----------------------------------------------------------------------------------------------------
def test_workers(api: falcon.testing.TestClient, client: redis.Redis, settings: QueueSettings) -> None:
    assert api.simulate_get("/api/workers").json["workers"] == []
    queue = Queue(client, settings)
    capabilities = {"worker_id": "worker1-direct", "services": ["simulation"], "hardware": {"gpu_count": 0}}
    queue.scripts.register_worker("worker1-direct", 30, {
        "capabilities": orjson.dumps(capabilities).decode(), "services": "simulation",
        "max_concurrent_jobs": "2", "last_heartbeat_ms": "0"})
    body = api.simulate_get("/api/workers").json
    assert body["success"] is True and body["total"] == 1
    worker = body["workers"][0]
    assert worker["id"] == "worker1-direct" and worker["status"] == "idle"
    assert worker["capabilities"] == capabilities
    assert worker["max_concurrent_jobs"] == 2 and worker["current_jobs"] == 0
    assert worker["services"] == ["simulation"] and "last_heartbeat_ms" not in worker
    assert worker["connected_at"].endswith("Z") and worker["last_heartbeat"].endswith("Z")
    assert worker["alive"] is True and 0 < worker["heartbeat_ttl_s"] <= 30
    assert isinstance(worker["heartbeat_age_s"], float) and worker["heartbeat_age_s"] > 0


# -- bad input --------------------------------------------------------------------------------------------------
BAD_SUBMISSIONS = [
    ({"priority": 5}, "service_required"),
    ({"service_required": ""}, "service_required"),
    ({"service_required": None}, "service_required"),
    ({"service_required": "   "}, "service_required"),
    ({"service_required": 12}, "service_required"),
    ({"service_required": "has space"}, "service_required"),
    ({"service_required": "comfyui:req:ab12"}, "service_required"),
    ({"service_required": "simulation", "priority": -1}, "priority"),
    ({"service_required": "simulation", "priority": 1_000_001}, "priority"),
    (b'{"service_required": "simulation", "priority": 1000000000000000000000000000000}', "priority"),
    ({"service_required": "simulation", "priority": 2.5}, "priority"),
    ({"service_required": "simulation", "priority": True}, "priority"),
    ({"service_required": "simulation", "priority": False}, "priority"),
    ({"service_required": "simulation", "priority": "5"}, "priority"),
    ({"service_required": "simulation", "priority": "high"}, "priority"),
    ({"service_required": "simulation", "priority": [1]}, "priority"),
    ({"service_required": "simulation", "payload": [1, 2]}, "payload"),
    ({"service_required": "simulation", "payload": "text"}, "payload"),
    ({"service_required": "simulation", "payload": 3}, "payload"),
    ({"service_required": "simulation", "payload": False}, "payload"),
    ({"service_required": "simulation", "requirements": [1]}, "requirements"),
    ({"service_required": "simulation", "max_retries": -1}, "max_retries"),
    ({"service_required": "simulation", "max_retries": "3"}, "max_retries"),
    ({"service_required": "simulation", "customer_id": {"a": 1}}, "customer_id"),
    ([{"service_required": "simulation"}], "body"),
    ("simulation", "body"),
    (None, "body"),
]


@pytest.mark.parametrize(("body", "field"), BAD_SUBMISSIONS, ids=[repr(b) for b, _ in BAD_SUBMISSIONS])
def test_bad_submission_is_400_and_writes_nothing(api: falcon.testing.TestClient, client: redis.Redis,
                                                  body: Any, field: str) -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    assert_error(api.simulate_post("/api/jobs", body=raw, content_type="application/json"), 400, field)
    assert client.dbsize() == 0


@pytest.mark.parametrize("raw", [b"", b"   ", b"not json", b"{\"service_required\": ", b"\xff\xfe"])
def test_non_json_body_is_400_and_writes_nothing(api: falcon.testing.TestClient, client: redis.Redis,
                                                 raw: bytes) -> None:
    assert_error(api.simulate_post("/api/jobs", body=raw, content_type="application/json"), 400, "body")
    assert client.dbsize() == 0


BAD_OVERRIDES = [
    ({"duration": -5}, "payload.duration"),
    ({"duration": 0}, "payload.duration"),
    ({"duration": "5000"}, "payload.duration"),
    ({"duration": True}, "payload.duration"),
    ({"duration": 86_400_001}, "payload.duration"),
    ({"simulation_time": -1}, "payload.simulation_time"),
    ({"simulation_time": "5"}, "payload.simulation_time"),
    ({"steps": 0}, "payload.steps"),
    ({"steps": 2.5}, "payload.steps"),
    ({"steps": "3"}, "payload.steps"),
    ({"steps": 100_001}, "payload.steps"),
    ({"fail": "yes"}, "payload.fail"),
    ({"fail": -1}, "payload.fail"),
    ({"fail": 1.5}, "payload.fail"),
    ({"fail": [1]}, "payload.fail"),
    ({"fail": 1, "fail_retryable": "no"}, "payload.fail_retryable"),
]


@pytest.mark.parametrize(("payload", "field"), BAD_OVERRIDES, ids=[repr(p) for p, _ in BAD_OVERRIDES])
def test_simulation_override_it_cannot_use_is_400(api: falcon.testing.TestClient, client: redis.Redis,
                                                  payload: dict[str, Any], field: str) -> None:
    result = post_job(api, {"service_required": "simulation", "payload": payload})
    assert_error(result, 400, field)
    assert client.dbsize() == 0


def test_simulation_overrides_it_can_use_are_accepted(api: falcon.testing.TestClient) -> None:
    for payload in ({"duration": 5000, "steps": 3, "fail": 2, "fail_retryable": False},
                    {"simulation_time": 0.5, "steps": 1.0, "fail": True}, {"fail": 0}, {"fail": False},
                    {"action": "test", "duration": 5000}):
        result = post_job(api, {"service_required": "simulation", "payload": payload})
        assert result.status_code == 201, (payload, result.text)
    # a service no installed connector is named after has no payload check here; noop takes anything
    for service in ("other", "noop"):
        assert post_job(api, {"service_required": service, "payload": {"fail": "yes"}}).status_code == 201


BAD_QUERIES = [
    ({"limit": "-1"}, "limit"),
    ({"limit": "0"}, "limit"),
    ({"limit": str(10**9)}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": "1.5"}, "limit"),
    ({"offset": "-1"}, "offset"),
    ({"offset": "x"}, "offset"),
    ({"status": "running"}, "status"),
    ({"status": "PENDING!"}, "status"),
    ({"service_required": "bad name"}, "service_required"),
]


@pytest.mark.parametrize(("params", "field"), BAD_QUERIES, ids=[repr(p) for p, _ in BAD_QUERIES])
def test_bad_list_query_is_400(api: falcon.testing.TestClient, params: dict[str, str], field: str) -> None:
    assert_error(api.simulate_get("/api/jobs", params=params), 400, field)


def test_list_limit_bounds_accepted(api: falcon.testing.TestClient) -> None:
    for limit in ("1", "1000"):
        result = api.simulate_get("/api/jobs", params={"limit": limit})
        assert result.status_code == 200 and result.json["limit"] == int(limit)


def test_body_too_large_is_413_envelope(client: redis.Redis, settings: QueueSettings) -> None:
    api = falcon.testing.TestClient(create_app(ApiSettings(queue=settings, max_body_bytes=1024),
                                               Queue(client, settings)))
    body = orjson.dumps({"service_required": "simulation", "payload": {"blob": "x" * 2000}})
    assert_error(api.simulate_post("/api/jobs", body=body, content_type="application/json"), 413)
    assert client.dbsize() == 0


def test_cors_preflight(api: falcon.testing.TestClient) -> None:
    """Without keys, a local page (a loopback origin) may call the API; a page of another site may not."""
    result = api.simulate_options("/api/jobs", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert result.status_code == 200
    assert result.headers.get("Access-Control-Allow-Origin") == "http://localhost:3000"
    assert "POST" in result.headers["Access-Control-Allow-Methods"]
    other = api.simulate_options("/api/jobs", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST"})
    assert other.status_code == 403 and "Access-Control-Allow-Origin" not in other.headers
