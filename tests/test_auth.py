"""API keys, origins and Redis memory: every route, SSE stream and WebSocket path needs a key once keys are set;
a plain key sees only its own jobs; admin keys see all; CORS and WebSocket Origin follow CORS_ORIGINS; keys never
reach the logs; submits stop at the Redis memory limit with 503 "queue is full"."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import falcon.inspect
import falcon.testing
import orjson
import pytest
import redis
import websocket

from appliance.api.app import create_app
from appliance.api.auth import OPEN_ROUTES, Keyring, token_of
from appliance.api.live import LiveServices, create_live
from appliance.queue import Queue
from appliance.redis_conn import DirectCalls, connect
from appliance.settings import ApiKey, ApiSettings, QueueSettings, SettingsError, redact_token
from live_api import Api, FakeWorker, recv, recv_until, running_api, send
from procs import RedisServer, env_for, wait_for

ALICE, BOB, ROOT = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef", "root-key-0123456789abcdef"
KEYS = f"alice:{ALICE},bob:{BOB},root:{ROOT}:admin"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- settings -------------------------------------------------------------------------------------------------
def test_keys_from_both_variables_and_defaults_that_follow_them(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# name key [admin]\ncarol {'c' * 20}\n\n  dave {'d' * 20} admin  # ops\n")
    settings = ApiSettings.from_env({"API_KEYS": f"alice:{ALICE}", "API_KEYS_FILE": str(keys_file)})
    assert [(k.name, k.admin) for k in settings.api_keys] == [("alice", False), ("carol", False), ("dave", True)]
    assert settings.bind == "0.0.0.0" and settings.cors_origins == ()
    assert ALICE not in repr(settings) and "c" * 20 not in repr(settings)
    assert "3 keys (1 admin)" in settings.access_note()
    open_settings = ApiSettings.from_env({})
    assert open_settings.bind == "127.0.0.1" and open_settings.cors_origins == ()
    assert "no API keys" in open_settings.access_note() and "loopback" in open_settings.access_note()
    assert "anyone who reaches" in ApiSettings.from_env({"API_BIND": "0.0.0.0"}).access_note()
    assert ApiSettings.from_env({"API_KEYS": KEYS, "API_BIND": "127.0.0.1",
                                 "CORS_ORIGINS": "https://a.example"}).cors_origins == ("https://a.example",)


@pytest.mark.parametrize("value", ["alice", f"alice:{ALICE}:root", "alice:short", f"bad name:{ALICE}",
                                   f"alice:{ALICE},alice:{BOB}", f"alice:{ALICE},bob:{ALICE}"])
def test_bad_keys_name_the_variable_never_the_key(value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        ApiSettings.from_env({"API_KEYS": value})
    message = str(caught.value)
    assert message.startswith("API_KEYS") and "\n" not in message
    assert ALICE not in message and "short" not in message


def test_keys_file_errors_name_the_line(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"alice {ALICE}\nbob {BOB} root\n")
    with pytest.raises(SettingsError, match="line 2") as caught:
        ApiSettings.from_env({"API_KEYS_FILE": str(keys_file)})
    assert BOB not in str(caught.value)
    with pytest.raises(SettingsError, match="API_KEYS_FILE.*cannot read"):
        ApiSettings.from_env({"API_KEYS_FILE": str(tmp_path / "missing")})


def test_keyring_and_token_forms() -> None:
    ring = Keyring([ApiKey("alice", ALICE), ApiKey("root", ROOT, admin=True)])
    assert ring.identify(ALICE) == ring.identify(ALICE) and ring.identify(ALICE).name == "alice"  # type: ignore[union-attr]
    assert ring.identify(ROOT).admin is True  # type: ignore[union-attr]
    assert ring.identify(ALICE[:-1]) is None and ring.identify("") is None and ring.identify(None) is None
    assert Keyring([]).identify(None).admin is True  # type: ignore[union-attr]  # no keys: everyone
    assert token_of({"HTTP_AUTHORIZATION": "Bearer abc"}) == "abc"
    assert token_of({"HTTP_AUTHORIZATION": "bearer  abc "}) == "abc"
    assert token_of({"HTTP_X_API_KEY": "xyz"}) == "xyz"
    assert token_of({"QUERY_STRING": "a=1&token=t%2Bk"}) == "t+k"
    assert token_of({"HTTP_AUTHORIZATION": "Basic Zm9v"}) is None
    assert redact_token("GET /ws/monitor/m?token=secret&x=1 HTTP/1.1") == "GET /ws/monitor/m?token=***&x=1 HTTP/1.1"


# -- HTTP through falcon.testing ------------------------------------------------------------------------------
def keyed_app(client: redis.Redis, settings: QueueSettings, **env: str) -> falcon.testing.TestClient:
    api_settings = ApiSettings.from_env({"API_KEYS": KEYS, "REDIS_URL": settings.redis_url, **env})
    queue = Queue(client, api_settings.queue)
    return falcon.testing.TestClient(create_app(api_settings, queue, create_live(api_settings, queue)))


def test_every_route_needs_a_key(client: redis.Redis, settings: QueueSettings) -> None:
    api = keyed_app(client, settings)
    routes = falcon.inspect.inspect_routes(api.app)
    assert {"/api/jobs", "/api/jobs/{job_id}/progress", "/api/workers", "/api/connection-stats"} <= \
        {r.path for r in routes}
    checked = 0
    for route in routes:
        if route.path in OPEN_ROUTES:
            continue
        path = route.path.replace("{job_id}", "some-job").replace("{name}", "out.png")
        for method in {m.method for m in route.methods if m.internal is False} - {"OPTIONS"}:
            for headers in ({}, bearer("wrong-key-0123456789abcdef"), {"X-API-Key": ALICE[:-1]}):
                result = api.simulate_request(method, path, headers=headers, json={} if method == "POST" else None)
                assert result.status_code == 401, (method, path, headers, result.text)
                assert result.headers["WWW-Authenticate"] == "Bearer"
                assert result.json["success"] is False and "key" in result.json["error"]
                checked += 1
    assert checked >= 8 * 3
    assert api.simulate_get("/api/no-such-route").status_code == 401  # nothing answers without a key


def test_health_is_open_but_tells_anonymous_callers_nothing(client: redis.Redis, settings: QueueSettings,
                                                           queue: Queue) -> None:
    FakeWorker(queue, "w-secret-name")
    api = keyed_app(client, settings)
    anonymous = api.simulate_get("/health")
    assert anonymous.status_code == 200 and anonymous.json["status"] == "ok"
    text = anonymous.text
    assert "w-secret-name" not in text and "redis://" not in text and "url" not in anonymous.json["redis"]
    assert anonymous.json["workers"] == {"active": 1}
    known = api.simulate_get("/health", headers=bearer(ALICE)).json
    assert known["workers"]["ids"] == ["w-secret-name"] and known["redis"]["url"].startswith("redis://")


def test_plain_keys_see_only_their_own_jobs(client: redis.Redis, settings: QueueSettings, queue: Queue) -> None:
    api = keyed_app(client, settings)
    body = {"service_required": "simulation", "payload": {"n": 1}, "submitted_by": "root"}
    via = [bearer(ALICE), {"X-API-Key": ALICE}, {}]
    alice = [api.simulate_post("/api/jobs", json=body, headers=h, params={"token": ALICE} if not h else None)
             for h in via]
    assert [r.status_code for r in alice] == [201, 201, 201], [r.text for r in alice]
    alice_ids = [r.json["job_id"] for r in alice]
    bob_id = api.simulate_post("/api/jobs", json=body, headers=bearer(BOB)).json["job_id"]
    root_id = api.simulate_post("/api/jobs", json=body, headers=bearer(ROOT)).json["job_id"]
    assert queue.get(alice_ids[0])["submitted_by"] == "alice"   # the key's name, not the body's
    assert queue.get(root_id)["submitted_by"] == "root"

    listing = api.simulate_get("/api/jobs", headers=bearer(ALICE)).json
    assert [j["id"] for j in listing["jobs"]] == alice_ids[::-1] and listing["total"] == 3
    assert api.simulate_get("/api/jobs", params={"status": "pending", "limit": 1}, headers=bearer(ALICE)).json[
        "total"] == 3
    assert api.simulate_get("/api/jobs", params={"status": "completed"}, headers=bearer(ALICE)).json["total"] == 0
    assert api.simulate_get("/api/jobs", headers=bearer(ROOT)).json["total"] == 5

    missing = api.simulate_get("/api/jobs/no-such-job", headers=bearer(ALICE))
    for path in (f"/api/jobs/{bob_id}", f"/api/jobs/{bob_id}/progress", f"/api/jobs/{bob_id}/outputs/x.png"):
        other = api.simulate_get(path, headers=bearer(ALICE))
        assert other.status_code == 404 and other.json["error"] == missing.json["error"], (path, other.text)
    assert api.simulate_delete(f"/api/jobs/{bob_id}", headers=bearer(ALICE)).status_code == 404
    assert queue.get(bob_id)["status"] == "pending"
    assert api.simulate_get(f"/api/jobs/{bob_id}", headers=bearer(BOB)).json["job"]["id"] == bob_id
    assert api.simulate_get(f"/api/jobs/{bob_id}", headers=bearer(ROOT)).status_code == 200
    assert api.simulate_delete(f"/api/jobs/{alice_ids[0]}", headers=bearer(ALICE)).status_code == 200
    assert api.simulate_delete(f"/api/jobs/{bob_id}", headers=bearer(ROOT)).status_code == 200

    workers = api.simulate_get("/api/workers", headers=bearer(ALICE))
    assert workers.status_code == 403 and "admin" in workers.json["error"]
    assert api.simulate_get("/api/workers", headers=bearer(ROOT)).status_code == 200


def test_listing_index_drops_expired_jobs(client: redis.Redis, settings: QueueSettings, queue: Queue) -> None:
    api = keyed_app(client, settings)
    body = {"service_required": "simulation"}
    ids = [api.simulate_post("/api/jobs", json=body, headers=bearer(ALICE)).json["job_id"] for _ in range(3)]
    client.zrem(queue.keys.index_all, ids[0])      # as prune_jobs does when a finished job's retention ends
    client.zadd(queue.keys.index_submitter("alice"), {"never-stored": 1})  # a submit that failed
    listing = api.simulate_get("/api/jobs", headers=bearer(ALICE)).json
    assert [j["id"] for j in listing["jobs"]] == ids[:0:-1] and listing["total"] == 2
    assert queue.prune_submitted(grace_ms=0) == 2
    assert client.zcard(queue.keys.index_submitter("alice")) == 2


def test_without_keys_everyone_is_admin_and_nothing_is_recorded(client: redis.Redis, settings: QueueSettings,
                                                                queue: Queue) -> None:
    api = falcon.testing.TestClient(create_app(ApiSettings(queue=settings), Queue(client, settings)))
    job_id = api.simulate_post("/api/jobs", json={"service_required": "simulation"}).json["job_id"]
    assert "submitted_by" not in queue.get(job_id)
    assert api.simulate_get("/api/workers").status_code == 200
    assert api.simulate_get("/api/jobs").json["total"] == 1


def test_cors_follows_cors_origins(client: redis.Redis, settings: QueueSettings) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "DELETE",
                 "Access-Control-Request-Headers": "authorization"}
    api = keyed_app(client, settings)   # keys set, CORS_ORIGINS unset: no origin allowed
    result = api.simulate_options("/api/jobs/x", headers=preflight)
    assert "Access-Control-Allow-Origin" not in result.headers
    got = api.simulate_get("/api/jobs", headers={**bearer(ALICE), "Origin": "https://evil.example"})
    assert got.status_code == 403 and "Access-Control-Allow-Origin" not in got.headers
    assert "CORS_ORIGINS" in got.json["error"]
    assert api.simulate_get("/api/jobs", headers={**bearer(ALICE), "Origin": "http://localhost:3000"}
                            ).status_code == 403     # with keys, loopback pages are not special

    api = keyed_app(client, settings, CORS_ORIGINS="https://ok.example")
    assert "Access-Control-Allow-Origin" not in api.simulate_options("/api/jobs/x", headers=preflight).headers
    allowed = api.simulate_options("/api/jobs/x", headers={**preflight, "Origin": "https://ok.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://ok.example"
    assert "authorization" in allowed.headers["Access-Control-Allow-Headers"].lower()
    assert "DELETE" in allowed.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in allowed.headers
    refused = api.simulate_get("/api/jobs", headers={"Origin": "https://ok.example"})
    assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == "https://ok.example"


def open_app(client: redis.Redis, settings: QueueSettings, **env: str) -> falcon.testing.TestClient:
    api_settings = ApiSettings.from_env({"REDIS_URL": settings.redis_url, **env})
    return falcon.testing.TestClient(create_app(api_settings, Queue(client, api_settings.queue)))


def test_without_keys_only_loopback_pages_may_call(client: redis.Redis, settings: QueueSettings) -> None:
    """Keyless (loopback) API: a page of another site cannot drive it, even with a request browsers send without
    a preflight (text/plain); local monitor pages still can."""
    api = open_app(client, settings)
    job = b'{"service_required": "simulation"}'
    evil = api.simulate_post("/api/jobs", body=job, headers={"Origin": "http://evil.example",
                                                            "Content-Type": "text/plain"})
    assert evil.status_code == 403 and "Access-Control-Allow-Origin" not in evil.headers
    assert client.dbsize() == 0 or not client.keys("*job:*")
    for origin in ("http://localhost:3000", "http://127.0.0.1:8080", "https://[::1]", "http://localhost"):
        local = api.simulate_post("/api/jobs", body=job, headers={"Origin": origin,
                                                                 "Content-Type": "application/json"})
        assert local.status_code == 201 and local.headers["Access-Control-Allow-Origin"] == origin, origin
    for origin in ("http://localhost.evil.example", "null", "http://127.0.0.2"):
        assert api.simulate_get("/api/jobs", headers={"Origin": origin}).status_code == 403, origin
    star = open_app(client, settings, CORS_ORIGINS="*")
    assert star.simulate_get("/api/jobs", headers={"Origin": "http://a.example"}
                             ).headers["Access-Control-Allow-Origin"] == "*"


def test_bodies_must_be_json(client: redis.Redis, settings: QueueSettings) -> None:
    api = open_app(client, settings)
    job = b'{"service_required": "simulation"}'
    for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        refused = api.simulate_post("/api/jobs", body=job, headers={"Content-Type": media})
        assert refused.status_code == 415 and refused.json["success"] is False, media
        assert "application/json" in refused.json["error"]
    assert api.simulate_post("/api/jobs", body=job, headers={"Content-Type": "application/json; charset=utf-8"}
                             ).status_code == 201
    assert api.simulate_post("/api/jobs", body=job).status_code == 201      # no Content-Type at all


# -- Redis memory: the submit limit ---------------------------------------------------------------------------
@pytest.fixture()
def maxmemory(client: redis.Redis) -> Iterator[redis.Redis]:
    """The test's private Redis, whose maxmemory the test may set (put back to none afterwards)."""
    yield client
    client.config_set("maxmemory", 0)


def test_submits_stop_at_the_memory_limit(maxmemory: redis.Redis, settings: QueueSettings, queue: Queue) -> None:
    api = falcon.testing.TestClient(create_app(ApiSettings(queue=settings), Queue(maxmemory, settings)))
    used = int(maxmemory.info("memory")["used_memory"])
    maxmemory.config_set("maxmemory", int(used / 0.99))   # 99% used: well above the default 90% limit
    body = {"service_required": "simulation"}
    refused = api.simulate_post("/api/jobs", json=body)
    assert refused.status_code == 503, refused.text
    assert "queue is full" in refused.json["error"] and "Redis is not reachable" not in refused.json["error"]
    assert refused.headers["Retry-After"] == "5" and refused.json["retry_after_s"] == 5
    assert queue.depth() == 0 and maxmemory.zcard(queue.keys.index_all) == 0
    health = api.simulate_get("/health")
    assert health.status_code == 200 and health.json["redis"]["memory_full"] is True
    assert "queue is full" in health.json["warnings"][0]
    assert health.json["redis"]["memory"]["accepting_submits"] is False

    # Redis's own refusal (the soft limit off: 100%) reads the same
    api = falcon.testing.TestClient(create_app(ApiSettings(queue=settings, submit_memory_percent=100),
                                               Queue(maxmemory, settings)))
    maxmemory.config_set("maxmemory", used // 2)
    refused = api.simulate_post("/api/jobs", json=body)
    assert refused.status_code == 503 and "queue is full" in refused.json["error"], refused.text

    maxmemory.config_set("maxmemory", 0)
    time.sleep(1.1)   # the memory reading is cached for a second
    assert api.simulate_post("/api/jobs", json=body).status_code == 201
    assert api.simulate_get("/health").json["redis"]["memory_full"] is False


# -- Redis URLs with passwords and ACL users ------------------------------------------------------------------
def test_password_and_acl_user_reach_the_script_calls() -> None:
    with RedisServer(appendonly=False, args=("--requirepass", "topsecret"), password="topsecret") as server:
        port = server.port
        admin = redis.Redis(port=port, password="topsecret", decode_responses=True)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        admin.acl_setuser("app", enabled=True, passwords=["+app-pass"], keys=["*"], channels=["*"],
                          commands=["+@all"])
        for url in (f"redis://:topsecret@127.0.0.1:{port}/0", f"redis://app:app-pass@127.0.0.1:{port}/0"):
            queue = Queue(connect(url), QueueSettings(redis_url=url))
            job_id = FakeWorker(queue).submit()       # EVALSHA through DirectCalls' own connections
            assert queue.get(job_id)["status"] == "pending"
        tls = DirectCalls(connect("rediss://app:app-pass@127.0.0.1:1/3"))._new
        assert tls.func is redis.SSLConnection  # type: ignore[attr-defined]
        assert (tls.keywords["username"], tls.keywords["password"], tls.keywords["db"]) == ("app", "app-pass", 3)  # type: ignore[attr-defined]


# -- a real gunicorn: SSE, WebSocket, logs --------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_api(redis_server: str) -> Iterator[Api]:
    with running_api(env_for(redis_server), API_KEYS=KEYS, CORS_ORIGINS="https://ok.example",
                     API_ACCESS_LOG="1", LOG_LEVEL="info") as api:
        yield api


def handshake(api: Api, path: str, origin: str | None = None, **headers: str) -> websocket.WebSocket:
    """A WebSocket to `path`; `origin` None sends no Origin header (a non-browser client)."""
    return websocket.create_connection(f"{api.ws_url}{path}", timeout=10, origin=origin,
                                       suppress_origin=origin is None,
                                       header=[f"{k.replace('_', '-')}: {v}" for k, v in headers.items()])


def refused(api: Api, path: str, origin: str | None = None, **headers: str) -> int:
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        handshake(api, path, origin, **headers)
    return int(caught.value.status_code)


def request(api: Api, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        conn.request(method, path, orjson.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}})
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read() or b"null")
    finally:
        conn.close()


def test_websocket_handshakes_need_keys_and_allowed_origins(keyed_api: Api) -> None:
    api = keyed_api
    for path in ("/", "/ws/client/c1", "/ws/monitor/m1", "/anything"):
        assert refused(api, path) == 401, path
        assert refused(api, path, Authorization="Bearer wrong-key-0123456789abcdef") == 401, path
        assert refused(api, f"{path}?token={ALICE[:-1]}") == 401, path
    assert refused(api, "/ws/monitor/m1", Authorization=f"Bearer {ALICE}") == 403   # plain key: no monitor
    assert refused(api, f"/ws/client/c1?token={ROOT}", origin="https://evil.example") == 403
    assert refused(api, f"/ws/client/c1?token={ROOT}", origin="http://localhost:3000") == 403   # keys: not special
    ws = handshake(api, f"/ws/client/c1?token={ALICE}", origin="https://ok.example")
    assert recv(ws)["type"] == "connected"
    ws.close()
    ws = handshake(api, "/", origin=f"http://127.0.0.1:{api.port}", X_API_Key=BOB)   # the API's own origin
    assert recv(ws)["type"] == "connected"
    ws.close()

    # the original monitors send ?token=: an admin key opens the monitor socket
    monitor = handshake(api, f"/ws/monitor/monitor-id-1?token={ROOT}")
    assert recv(monitor)["type"] == "connected"
    send(monitor, {"type": "monitor_connect", "monitor_id": "monitor-id-1", "request_full_state": True})
    snapshot, _ = recv_until(monitor, "full_state_snapshot")
    assert set(snapshot["data"]["jobs"]) == {"pending", "active", "completed", "failed"}
    monitor.close()


def test_websocket_sessions_see_only_their_keys_jobs(keyed_api: Api, queue: Queue) -> None:
    api = keyed_api
    bob = handshake(api, "/ws/client/bob-1", Authorization=f"Bearer {BOB}")
    assert recv(bob)["type"] == "connected"
    send(bob, {"type": "submit_job", "job_type": "simulation", "priority": 5, "submitted_by": "alice"})
    bob_job = recv_until(bob, "job_submitted")[0]["job_id"]
    assert queue.get(bob_job)["submitted_by"] == "bob"

    alice = handshake(api, "/", X_API_Key=ALICE)
    assert recv(alice)["type"] == "connected"
    send(alice, {"type": "subscribe_progress", "job_id": bob_job})
    answer = recv(alice)
    assert answer["type"] == "error" and answer["error"] == "Job not found"
    send(alice, {"type": "get_job_status", "job_id": bob_job})
    assert recv(alice)["job"] is None
    send(alice, {"type": "cancel_job", "job_id": bob_job})
    assert recv(alice)["error"] == "Job not found" and queue.get(bob_job)["status"] == "pending"
    send(alice, {"type": "submit_job", "data": {"service_required": "simulation"}})
    own = recv_until(alice, "job_submitted")[0]["job_id"]
    send(alice, {"type": "subscribe_progress", "job_id": own})
    assert recv(alice)["type"] == "subscribed"
    alice.close()

    send(bob, {"type": "cancel_job", "job_id": bob_job})
    assert recv_until(bob, "job_cancelled")[0]["status"] == "cancelled"
    bob.close()

    # SSE: the owner follows with ?token= (EventSource sends no headers); another key gets 404
    status, body = request(api, "GET", f"/api/jobs/{bob_job}/progress?token={ALICE}")
    assert status == 404 and body["error"] == "Job not found"
    status, _ = request(api, "GET", f"/api/jobs/{bob_job}/progress")
    assert status == 401
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    conn.request("GET", f"/api/jobs/{bob_job}/progress?token={BOB}")
    resp = conn.getresponse()
    assert resp.status == 200 and b"event: cancelled" in resp.read()
    conn.close()


def test_websocket_submits_stop_at_the_memory_limit(keyed_api: Api, maxmemory: redis.Redis, queue: Queue) -> None:
    ws = handshake(keyed_api, "/ws/client/full", X_API_Key=ALICE)
    assert recv(ws)["type"] == "connected"
    used = int(maxmemory.info("memory")["used_memory"])
    maxmemory.config_set("maxmemory", int(used / 0.99))  # well above the 90% limit, whatever Redis frees meanwhile
    time.sleep(1.1)   # the API's memory reading is a second old at most
    send(ws, {"type": "submit_job", "id": "m1", "job_type": "simulation"})
    answer = recv(ws)
    assert answer["type"] == "error" and "queue is full" in answer["error"], answer
    assert answer["retry_after_s"] == 5 and answer["message_id"] == "m1"
    assert queue.depth() == 0
    maxmemory.config_set("maxmemory", 0)
    time.sleep(1.1)
    send(ws, {"type": "submit_job", "id": "m2", "job_type": "simulation"})
    assert recv_until(ws, "job_submitted")[0]["message_id"] == "m2"
    ws.close()


def test_keys_never_reach_the_log(keyed_api: Api) -> None:
    api = keyed_api
    assert request(api, "GET", f"/api/jobs?token={ALICE}")[0] == 200
    assert request(api, "GET", "/api/jobs", Authorization=f"Bearer {BOB}")[0] == 200
    assert request(api, "GET", "/api/jobs", X_API_Key=ROOT)[0] == 200
    assert request(api, "GET", "/api/jobs?token=not-a-key-0123456789")[0] == 401
    refused(api, f"/ws/monitor/m2?token={ALICE}")
    assert request(api, "GET", f"/api/jobs?%74oken={BOB}")[0] == 200      # a percent-encoded name: still masked
    for raw in (f"GET /api/jobs?token={ROOT}\x01 HTTP/1.1\r\nHost: t\r\n\r\n".encode(),
                f"GET /api/jobs HTTP/1.1\r\nHost: t\r\nX-API-Key {ALICE}\r\n\r\n".encode(),
                f"GET /api/jobs HTTP/1.1\r\nHost: t\r\nAuthorization Bearer {BOB}\r\n\r\n".encode()):
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
            sock.sendall(raw)
            assert sock.recv(65536).startswith(b"HTTP/1.1 400")
    wait_for(lambda: "%74oken=***" in api.log_text(), 10, "the access log line")
    wait_for(lambda: "Invalid HTTP" in api.log_text(), 10, "gunicorn's invalid-request lines")
    log = api.log_text()
    assert "GET /api/jobs?token=*** HTTP/1.1\" 200" in log, log
    for secret in (ALICE, BOB, ROOT, "not-a-key-0123456789"):
        assert secret not in log, log
    assert "API keys required" in log and "3 keys (1 admin)" in log


def test_without_keys_the_api_says_it_is_open(redis_server: str) -> None:
    with running_api(env_for(redis_server), LOG_LEVEL="info") as api:
        assert "no API keys" in api.log_text() and "loopback" in api.log_text()
        status, _ = request(api, "GET", "/api/workers")
        assert status == 200



def test_anonymous_health_names_tasks_without_their_errors(client: redis.Redis, settings: QueueSettings) -> None:
    api_settings = ApiSettings.from_env({"API_KEYS": KEYS, "REDIS_URL": settings.redis_url})
    queue = Queue(client, api_settings.queue)
    live = create_live(api_settings, queue)
    LiveServices(live, on_dead=lambda why: None)    # its tasks, named in /health (not started: none alive)
    api = falcon.testing.TestClient(create_app(api_settings, queue, live))
    anonymous = api.simulate_get("/health").json["tasks"]
    assert anonymous and all(set(task) == {"name", "alive"} for task in anonymous), anonymous
    known = api.simulate_get("/health", headers=bearer(ROOT)).json["tasks"]
    assert all(set(task) > {"name", "alive"} for task in known), known
