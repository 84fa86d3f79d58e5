"""Hostile and careless input: nothing a client sends stops a shared task, every limit is a setting
answered clearly, every error is the envelope. In process (falcon.testing, the reader on the private Redis) and
against a real gunicorn (raw sockets where a client library would refuse to misbehave)."""

from __future__ import annotations

import os
import selectors
import socket
import stat
import struct
import time
from collections.abc import Iterator
from typing import Any

import falcon.testing
import gevent
import orjson
import pytest
import redis
import websocket

from appliance.api import monitor, render
from appliance.api.app import create_app
from appliance.api.fanout import Entry, Hub, Raw, Subscriber
from appliance.api.janitor import Janitor
from appliance.api.limits import TokenBuckets
from appliance.api.resources import Health
from appliance.api.tasks import Tasks, TaskState
from appliance.classes import ClassBook
from appliance.jobs import ORJSON_MAX_DEPTH, RENDER_DEPTH, JobSpec, public_job
from appliance.matching import RequirementClass
from appliance.queue import Queue
from appliance.runtime import Paths
from appliance.settings import ApiKey, ApiSettings, QueueSettings, WorkerSettings
from appliance.worker import Worker
from connectors.simulation import SimulationConnector, SimulationSettings
from live_api import Api, FakeWorker, recv, recv_until, running_api, send, sse, ws_connect
from procs import env_for, wait_for


def nested(levels: int) -> Any:
    """A JSON value nested `levels` arrays deep."""
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def deep_payload(levels: int) -> dict[str, Any]:
    """A payload object nested `levels` deep in all (`{"x": [[[...]]]}`)."""
    return {"x": nested(levels - 1)}


def make_api(settings: QueueSettings, client: redis.Redis, **limits: Any) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(ApiSettings(queue=settings, **limits), Queue(client, settings)))


@pytest.fixture()
def api(client: redis.Redis, settings: QueueSettings) -> falcon.testing.TestClient:
    return make_api(settings, client)


def error_of(result: falcon.testing.Result, status: int) -> dict[str, Any]:
    assert result.status_code == status, result.text
    body: dict[str, Any] = result.json
    assert body["success"] is False and isinstance(body["error"], str) and body["timestamp"]
    return body


# -- depth: refused at parse time, and every stored job still renders --------------------------------------------
def test_orjson_writes_exactly_254_levels() -> None:
    """The depth limits below rest on this (an orjson upgrade that changes it fails here first)."""
    orjson.dumps(nested(ORJSON_MAX_DEPTH))
    with pytest.raises(TypeError):
        orjson.dumps(nested(ORJSON_MAX_DEPTH + 1))


def test_a_body_deeper_than_the_limit_is_refused(api: falcon.testing.TestClient, queue: Queue) -> None:
    too_deep = {"service_required": "simulation", "payload": deep_payload(253)}
    body = error_of(api.simulate_post("/api/jobs", json=too_deep), 400)
    assert body["field"] == "body" and "API_MAX_JSON_DEPTH" in body["error"]
    at_limit = {"service_required": "simulation", "payload": deep_payload(63)}   # 64 with the body itself
    assert api.simulate_post("/api/jobs", json=at_limit).status_code == 201
    over = {"service_required": "simulation", "payload": deep_payload(64)}
    assert error_of(api.simulate_post("/api/jobs", json=over), 400)["field"] == "body"
    # deeper than the parser itself allows (1,024): the same answer
    raw = '{"service_required": "simulation", "payload": ' + "[" * 2000 + "]" * 2000 + "}"
    body = error_of(api.simulate_post("/api/jobs", body=raw, headers={"Content-Type": "application/json"}), 400)
    assert "API_MAX_JSON_DEPTH" in body["error"]
    assert queue.counts()["pending"] == 1


@pytest.mark.parametrize("levels", [251, 252, 253])
def test_stored_jobs_too_deep_to_write_are_listed_read_and_broadcast(api: falcon.testing.TestClient,
                                                                     queue: Queue, levels: int) -> None:
    """A job stored before the limit (or by another writer) renders with a marker, never a 500."""
    deep = queue.submit(JobSpec(service_required="simulation", payload=deep_payload(levels)))
    worker = FakeWorker(queue)
    done = worker.submit(priority=100)
    assert worker.claim() == done
    worker.complete(done, {"out": nested(levels - 1)})
    listed = api.simulate_get("/api/jobs")
    assert listed.status_code == 200, listed.text
    by_id = {job["id"]: job for job in listed.json["jobs"]}
    assert "_unrenderable" in by_id[deep]["payload"]
    assert "_unrenderable" in by_id[done]["result"]
    read = api.simulate_get(f"/api/jobs/{deep}")
    assert read.status_code == 200 and "_unrenderable" in read.json["job"]["payload"]
    broadcast = render.dumps(monitor.stats_broadcast(queue, {"client": [], "monitor": []}))
    assert deep.encode() in broadcast and b"payload" not in broadcast
    assert deep.encode() in render.dumps(monitor.snapshot(queue))


def test_values_that_cannot_be_written_become_markers() -> None:
    """The last line of defence: whatever a message holds, writing it never raises."""
    odd = {"deep": nested(300), "big": 2**70, "surrogate": "a\ud800b", "fine": [1, "x", None, 1.5]}
    out = orjson.loads(render.dumps(odd))
    assert out["big"] == str(2**70) and out["surrogate"] == "a?b" and out["fine"] == [1, "x", None, 1.5]
    assert "_unrenderable" in orjson.dumps(out["deep"]).decode()
    assert public_job({"id": "j", "payload": orjson.dumps(nested(RENDER_DEPTH + 1)).decode()})["payload"] == {
        "_unrenderable": f"stored value nested deeper than {RENDER_DEPTH} levels; not shown"}


# -- names, echoes, sizes --------------------------------------------------------------------------------------
def test_a_service_name_with_a_newline_is_refused(api: falcon.testing.TestClient, client: redis.Redis) -> None:
    body = error_of(api.simulate_post("/api/jobs", json={"service_required": "simulation\n"}), 400)
    assert body["field"] == "service_required"
    assert error_of(api.simulate_get("/api/jobs", params={"service_required": "simulation\n"}), 400)
    assert not [key for key in client.keys("*") if "\n" in key]


def test_long_input_is_never_echoed_whole(api: falcon.testing.TestClient) -> None:
    huge = "s" * (1024 * 1024)
    for result in (api.simulate_post("/api/jobs", json={"service_required": huge}),
                   api.simulate_post("/api/jobs", json={"service_required": "simulation", "priority": huge}),
                   api.simulate_post("/api/jobs", json={"service_required": "simulation",
                                                        "requirements": {"gpu_model": [huge]}}),
                   api.simulate_get("/api/jobs", params={"status": huge}),
                   api.simulate_get(f"/api/jobs/{huge[:5000]}"),
                   api.simulate_get(f"/api/jobs/x/outputs/{huge[:3900]}"),
                   api.simulate_get(f"/api/jobs/{huge[:3900]}/preview"),
                   api.simulate_get(f"/nowhere/{huge[:5000]}")):
        assert result.status_code in (400, 404), result.text[:200]
        assert len(result.text) < 1000 and "s" * 100 not in result.text


@pytest.mark.parametrize("name", ["step_number", "workflow_priority", "workflow_datetime"])
def test_a_long_digit_string_is_a_400_naming_its_field(api: falcon.testing.TestClient, name: str) -> None:
    body = error_of(api.simulate_post("/api/jobs", json={"service_required": "simulation", name: "9" * 5000}),
                    400)
    assert body["field"] == name and "9" * 100 not in body["error"]


def test_long_digit_query_parameters_are_a_400(api: falcon.testing.TestClient) -> None:
    assert error_of(api.simulate_get("/api/jobs", params={"limit": "9" * 5000}), 400)["field"] == "limit"


def test_requirements_are_bounded_in_bytes_and_counts(api: falcon.testing.TestClient) -> None:
    def submit(requirements: Any) -> falcon.testing.Result:
        return api.simulate_post("/api/jobs", json={"service_required": "simulation", "requirements": requirements})

    body = error_of(submit({"models": [f"m{n}" for n in range(100_000)]}), 400)
    assert body["field"] == "requirements" and "API_MAX_REQUIREMENTS_BYTES" in body["error"]
    body = error_of(submit({"models": [f"m{n}" for n in range(300)]}), 400)
    assert body["field"] == "requirements.models" and "256" in body["error"]
    assert error_of(submit({"gpu_model": "g" * 300}), 400)["field"] == "requirements.gpu_model"
    assert error_of(submit({"custom.tags": ["t"] * 300}), 400)["field"] == "requirements.custom.tags"
    assert error_of(submit({"custom.region": "r" * 300}), 400)["field"] == "requirements.custom.region"
    assert submit({"models": [f"m{n}" for n in range(256)]}).status_code == 201


def test_an_unworkable_reason_is_short_whatever_the_requirements() -> None:
    wanted = [f"model-{n:03d}-" + "x" * 200 for n in range(256)]
    job_class = RequirementClass("c1", "simulation", {"models": wanted}, "", "q")
    workers = {f"worker-{n}": {"services": ["simulation"], "models": {"simulation": ["other"]}} for n in range(20)}
    reason = ClassBook.judge(job_class, workers)
    assert reason is not None and len(reason) <= 512, len(reason or "")
    assert "worker-0: lacks models [" in reason and "and 253 more" in reason


def test_a_payload_over_its_limit_is_refused(client: redis.Redis, settings: QueueSettings) -> None:
    api = make_api(settings, client, max_payload_bytes=1000)
    body = error_of(api.simulate_post("/api/jobs", json={"service_required": "simulation",
                                                         "payload": {"blob": "b" * 2000}}), 400)
    assert body["field"] == "payload" and "API_MAX_PAYLOAD_BYTES" in body["error"]
    assert api.simulate_post("/api/jobs", json={"service_required": "simulation",
                                                "payload": {"blob": "b" * 500}}).status_code == 201


# -- submits per caller ----------------------------------------------------------------------------------------
def test_token_buckets() -> None:
    buckets = TokenBuckets(2.0)
    assert [buckets.take("a", now=100.0) for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a", now=100.0) == pytest.approx(0.5)
    assert buckets.take("b", now=100.0) == 0.0, "each caller has its own bucket"
    assert buckets.take("a", now=100.6) == 0.0, "refilled at the rate"
    assert TokenBuckets(0).take("a") == 0.0, "0: no limit"


def test_submits_per_second_per_key(client: redis.Redis, settings: QueueSettings) -> None:
    keys = (ApiKey("alpha", "a" * 32), ApiKey("beta", "b" * 32))
    api = make_api(settings, client, submits_per_second=2.0, api_keys=keys)
    job = {"service_required": "simulation"}
    alpha, beta = ({"Authorization": f"Bearer {key.key}"} for key in keys)
    assert [api.simulate_post("/api/jobs", json=job, headers=alpha).status_code for _ in range(2)] == [201, 201]
    refused = api.simulate_post("/api/jobs", json=job, headers=alpha)
    body = error_of(refused, 429)
    assert refused.headers["Retry-After"] == "1" and body["retry_after_s"] == 1
    assert "API_SUBMITS_PER_SECOND" in body["error"]
    assert api.simulate_post("/api/jobs", json=job, headers=beta).status_code == 201, "another key's bucket"


def test_submits_per_second_per_address_without_keys(client: redis.Redis, settings: QueueSettings) -> None:
    api = make_api(settings, client, submits_per_second=1.0)
    job = {"service_required": "simulation"}
    assert api.simulate_post("/api/jobs", json=job, remote_addr="10.0.0.1").status_code == 201
    assert api.simulate_post("/api/jobs", json=job, remote_addr="10.0.0.1").status_code == 429
    assert api.simulate_post("/api/jobs", json=job, remote_addr="10.0.0.2").status_code == 201


# -- requirement classes ---------------------------------------------------------------------------------------
def test_requirement_classes_per_service_are_capped(client: redis.Redis, settings: QueueSettings,
                                                    queue: Queue) -> None:
    api = make_api(settings, client, max_classes_per_service=2)
    for n in (1, 2):
        assert api.simulate_post("/api/jobs", json={"service_required": "simulation",
                                                    "requirements": {"cpu_cores": n}}).status_code == 201
    refused = api.simulate_post("/api/jobs", json={"service_required": "simulation",
                                                   "requirements": {"cpu_cores": 3}})
    body = error_of(refused, 503)
    assert "API_MAX_CLASSES_PER_SERVICE" in body["error"] and int(refused.headers["Retry-After"]) > 0
    assert api.simulate_post("/api/jobs", json={"service_required": "simulation",
                                                "requirements": {"cpu_cores": 2}}).status_code == 201
    assert api.simulate_post("/api/jobs", json={"service_required": "other",
                                                "requirements": {"cpu_cores": 3}}).status_code == 201
    # customers no worker names make no class at all: the claim stays one queue read
    for n in range(20):
        assert api.simulate_post("/api/jobs", json={"service_required": "simulation",
                                                    "customer_id": f"customer-{n}"}).status_code == 201
    assert client.scard(queue.keys.requirement_classes("simulation")) == 2


# -- the reader and the other background tasks survive ------------------------------------------------------
class Boom(RuntimeError):
    pass


def test_the_reader_survives_a_client_it_cannot_serve(client: redis.Redis, queue: Queue) -> None:
    """An enricher or a client's rendering that raises costs that batch (for that client), never the reader."""
    hub = Hub(client, client, queue.keys)   # not started: the test hands it what its loop would read

    def broken_enricher(_: redis.Redis, entries: list[Entry]) -> None:
        raise Boom("enricher")

    def explode(batch: list[Entry]) -> list[Entry] | Raw | None:
        raise Boom("rendering")

    hub.enrichers[queue.keys.events] = broken_enricher
    stream = queue.keys.progress("job-1")
    bad, good, watcher = Subscriber("sse", 100), Subscriber("sse", 100), Subscriber("monitor", 100)
    bad.direct, bad.idle = explode, True
    for sub in (bad, good):
        hub.join(sub, stream, None, sub.offer)
    hub.join(watcher, queue.keys.events, None, watcher.offer)
    for n in range(3):
        client.xadd(stream, {"job_id": "job-1", "event": "progress", "progress": str(n)})
        client.xadd(queue.keys.events, {"job_id": "job-1", "event": "progress"})
        hub._dispatch(client.xread(dict(hub.cursors), count=500))   # one read of the reader's loop
    got = [entry.fields["progress"] for item in list(good.queue.queue) for entry in item]
    assert got == ["0", "1", "2"]
    assert sum(len(item) for item in watcher.queue.queue) == 3, "handed out without enrichment"
    assert bad.queue.empty() and hub.errors == 6 and "Boom" in (hub.last_error or "")
    assert hub.cursors[stream] == client.xrevrange(stream, count=1)[0][0]


def test_a_subscriber_is_bounded_in_bytes() -> None:
    reasons: list[str] = []
    sub = Subscriber("monitor", 1000, reasons.append, max_bytes=10_000)
    assert sub.offer("x" * 20_000), "one message larger than the bound fits an empty queue"
    assert not sub.offer("y"), "but nothing more"
    assert sub.overflowed and "API_CLIENT_QUEUE_BYTES" in reasons[0]
    sub = Subscriber("monitor", 1000, max_bytes=10_000)
    for _ in range(9):
        assert sub.offer("z" * 1000)
    assert sub.queued_bytes == 9000 and not sub.offer("z" * 2000)
    sub = Subscriber("monitor", 1000, max_bytes=10_000)
    assert sub.offer("z" * 6000)
    sub.release(sub.queue.get())
    assert sub.queued_bytes == 0 and sub.offer("z" * 6000) and sub.offer("z" * 4000)


class FakeTask(TaskState):
    name = "fake"

    def start(self) -> None:
        self.spawn(self.run)

    def run(self) -> None:
        raise Boom("it died")


def test_health_names_a_dead_task_and_the_watchdog_acts(client: redis.Redis, settings: QueueSettings) -> None:
    tasks = Tasks()
    task = FakeTask()
    tasks.add(task)
    app = falcon.App()
    app.add_route("/health", Health(Queue(client, settings), "redis://x", tasks))
    health = falcon.testing.TestClient(app)
    assert health.simulate_get("/health").status_code == 200, "not started: not dead"
    told: list[str] = []
    tasks.watch(told.append, interval_s=0.05)
    task.start()
    gevent.sleep(0.3)
    assert told and "fake" in told[0] and "Boom" in told[0]
    result = health.simulate_get("/health")
    assert result.status_code == 503 and "fake" in result.json["error"]
    assert result.json["tasks"] == [{"name": "fake", "alive": False, "errors": 1,
                                     "last_error": "Boom: it died", "last_error_at": result.json["tasks"][0][
                                         "last_error_at"]}]
    tasks.unwatch()


def test_one_failing_janitor_chore_leaves_the_others_running(queue: Queue,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    janitor = Janitor(queue)
    ran: list[str] = []

    def broken() -> int:
        raise Boom("a job it cannot handle")

    monkeypatch.setattr(queue.classes, "forget_idle", broken)
    monkeypatch.setattr(queue.scripts, "recover", lambda: _recovered(ran))
    janitor.tick(1)
    assert ran == ["recover"] and janitor.errors == 1 and "Boom" in (janitor.last_error or "")


def _recovered(ran: list[str]) -> Any:
    ran.append("recover")

    class Nothing:
        jobs, dead_workers = 0, []
    return Nothing()


# -- against gunicorn ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(redis_server: str) -> Iterator[Api]:
    with running_api(env_for(redis_server), API_MAX_WS_CONNECTIONS="20", API_MAX_SSE_CONNECTIONS="2000",
                     API_BODY_TIMEOUT_SECONDS="0.5", API_SUBMITS_PER_SECOND="0") as running:
        yield running


def raw_request(api: Api, data: bytes, timeout_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; the answer's status, headers and body."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=timeout_s) as sock:
        sock.sendall(data)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.title(): value for name, value in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    length = int(headers.get("Content-Length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def test_deep_jobs_leave_live_progress_running(live: Api, queue: Queue) -> None:
    """First probe: jobs nested 251-253 deep, stored and streamed while monitors and streams are
    open; the reader goes on, every route answers, and another job's progress still arrives live."""
    monitor_ws = ws_connect(live, "/ws/monitor/m1")
    assert recv(monitor_ws)["type"] == "connected"
    send(monitor_ws, {"type": "monitor_connect"})
    recv_until(monitor_ws, "full_state_snapshot")
    hub_era = ws_connect(live, "/ws/monitor/m2")
    assert recv(hub_era)["type"] == "connected"
    worker = FakeWorker(queue)
    deep_jobs = [queue.submit(JobSpec(service_required="simulation", payload=deep_payload(n)))
                 for n in (251, 252, 253)]
    deep_stream = sse(live, deep_jobs[-1])
    assert deep_stream.next().event == "connected"
    # a deep result goes through the reader too (the job's stream and `events`)
    for _ in deep_jobs:
        worker.claim()
    worker.complete(deep_jobs[-1], {"out": nested(252)})
    frames = deep_stream.events()
    assert frames[-1].event == "completed" and "_unrenderable" in frames[-1].data["result"]
    normal = worker.submit()
    stream = sse(live, normal)
    assert [stream.next().event, stream.next().event] == ["connected", "submitted"]
    worker.claim()
    worker.progress(normal, 50)
    assert [stream.next().event, stream.next().event, stream.next().event] == ["assigned", "in_progress",
                                                                               "progress"]
    progress, _ = recv_until(monitor_ws, "job_progress")
    assert progress["job_id"] == normal
    broadcast, _ = recv_until(hub_era, "stats_broadcast")
    assert "payload" not in orjson.dumps(broadcast).decode()
    for path in ["/api/jobs", *(f"/api/jobs/{job_id}" for job_id in deep_jobs), "/api/connection-stats"]:
        assert live.get_json(path)[0] == 200, path
    status, health = live.get_json("/health")
    assert status == 200 and all(task["alive"] for task in health["tasks"])
    assert {task["name"] for task in health["tasks"]} == {"stream reader", "connection counts",
                                                          "monitor statistics", "lease recovery"}
    send(monitor_ws, {"type": "monitor_connect"})
    snapshot, _ = recv_until(monitor_ws, "full_state_snapshot")
    assert "payload" not in orjson.dumps(snapshot).decode()
    for ws in (monitor_ws, hub_era):
        ws.close()
    stream.close()


def test_a_burst_of_event_streams_all_get_200(live: Api, queue: Queue) -> None:
    """Third probe, bounded: 500 streams open at once on a job with 1,000 events."""
    worker = FakeWorker(queue)
    job_id = worker.submit()
    worker.claim()
    for n in range(1000):
        worker.progress(job_id, n % 100, "step", n)
    socks: list[socket.socket] = []
    request = f"GET /api/jobs/{job_id}/progress HTTP/1.1\r\nHost: test\r\n\r\n".encode()
    try:
        for _ in range(500):
            sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
            sock.sendall(request)
            socks.append(sock)
        statuses: dict[socket.socket, bytes] = {}
        selector = selectors.DefaultSelector()
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        got = {sock: b"" for sock in socks}
        deadline = time.monotonic() + 60
        while len(statuses) < len(socks) and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                got[sock] += sock.recv(65536)
                if b"\r\n" in got[sock] or not got[sock]:
                    statuses[sock] = got[sock].split(b"\r\n", 1)[0]
                    selector.unregister(sock)
        selector.close()
        assert sorted(set(statuses.values())) == [b"HTTP/1.1 200 OK"] and len(statuses) == 500
    finally:
        for sock in socks:
            sock.close()


def test_a_chunked_post_is_read(live: Api) -> None:
    body = b'{"service_required": "simulation", "payload": {"steps": 2}}'
    chunks = b"".join(b"%X\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
    status, _, answer = raw_request(live, b"POST /api/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                                          b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    assert status == 201, answer
    assert orjson.loads(answer)["job_id"]


@pytest.mark.parametrize("body, status", [
    (b"ZZ\r\nabc\r\n0\r\n\r\n", 400),
    (b"3\r\nabcXX0\r\n\r\n", 400),
    (b"FFFFFFFFFFFFFFFFFFFF\r\nabc", 413),
], ids=["bad size", "no terminator", "huge chunk"])
def test_a_bad_chunked_body_is_answered_at_once_and_closed(live: Api, body: bytes, status: int) -> None:
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + body)
        got, _, answer = read_answer(sock)
        assert got == status and orjson.loads(answer)["success"] is False, answer
        assert sock.recv(65536) == b""          # closed: no second answer from the leftover bytes


def test_a_body_that_arrives_too_slowly_is_cut_off(live: Api) -> None:
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"service")
        started = time.monotonic()
        status, _, answer = read_answer(sock)
        assert time.monotonic() - started < 5
    assert status == 408
    body = orjson.loads(answer)
    assert body["success"] is False and "API_BODY_TIMEOUT_SECONDS" in body["error"]


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    (b"GET /health HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-H%d: v\r\n" % n for n in range(150)) + b"\r\n", 431),
    (b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n", 431),
    (b"GET /" + b"b" * 300 + b" NOTHTTP\r\n\r\n", 400),
], ids=["414 request line", "431 fields", "431 field size", "400 bad request line"])
def test_gunicorns_own_errors_are_envelopes(live: Api, request_bytes: bytes, status: int) -> None:
    got, headers, body = raw_request(live, request_bytes)
    assert got == status and headers["Content-Type"] == "application/json"
    envelope = orjson.loads(body)
    assert envelope["success"] is False and envelope["status"] == status and envelope["timestamp"]
    assert b"a" * 200 not in body and b"b" * 200 not in body and b"v" * 200 not in body


def test_stream_and_socket_counts_are_limited(redis_server: str, queue: Queue) -> None:
    with running_api(env_for(redis_server), API_MAX_WS_CONNECTIONS="2", API_MAX_SSE_CONNECTIONS="1") as api:
        worker = FakeWorker(queue)
        job_id = worker.submit()
        first = sse(api, job_id)
        assert first.status == 200 and first.next().event == "connected"
        second = sse(api, job_id)
        assert second.status == 503 and "API_MAX_SSE_CONNECTIONS" in second.body["error"]
        assert second.headers["retry-after"] == "5"
        sockets = [ws_connect(api, "/") for _ in range(2)]
        for ws in sockets:
            assert recv(ws)["type"] == "connected"
        handshake = (b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        status, headers, body = raw_request(api, handshake)
        assert status == 503 and headers["Retry-After"] == "5" and b"API_MAX_WS_CONNECTIONS" in body
        for ws in sockets:
            ws.close()
        first.close()


# -- WebSocket protocol errors: a close frame with the right code, at once ----------------------------------------
def ws_open(api: Api) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        got += sock.recv(4096)
    assert got.startswith(b"HTTP/1.1 101"), got
    rest = got.split(b"\r\n\r\n", 1)[1]
    first = read_frame(sock, rest)            # the `connected` message
    assert first[0] == 0x1
    return sock


def read_frame(sock: socket.socket, pending: bytes = b"") -> tuple[int, bytes]:
    buf = pending

    def need(n: int) -> bytes:
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError("closed without a close frame")
            buf += chunk
        out, buf = buf[:n], buf[n:]
        return out

    head = need(2)
    size = head[1] & 0x7F
    if size == 126:
        size = struct.unpack(">H", need(2))[0]
    elif size == 127:
        size = struct.unpack(">Q", need(8))[0]
    return head[0] & 0x0F, need(size)


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False, masked: bool = True) -> bytes:
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    size = len(payload)
    bit = 0x80 if masked else 0
    if size < 126:
        length = bytes([size | bit])
    elif size < 65536:
        length = bytes([126 | bit]) + struct.pack(">H", size)
    else:
        length = bytes([127 | bit]) + struct.pack(">Q", size)
    if not masked:
        return bytes([first]) + length + payload
    mask = os.urandom(4)
    return bytes([first]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("bad, code", [
    (frame(0x1, b"\xff\xfe not utf-8"), 1007),
    (frame(0x3, b"reserved opcode"), 1002),
    (frame(0x1, b"{}", rsv1=True), 1002),
    (frame(0x1, b'{"type": "ping"}', masked=False), 1002),
    (frame(0x1, b"x" * 70_000), 1009),
], ids=["invalid utf-8", "reserved opcode", "rsv1", "unmasked", "oversized"])
def test_a_websocket_protocol_error_gets_its_close_code_at_once(live: Api, bad: bytes, code: int) -> None:
    sock = ws_open(live)
    try:
        sock.settimeout(3)       # far below the ping timeout: the close must come at once
        sock.sendall(bad)
        while True:
            opcode, payload = read_frame(sock)
            if opcode == 0x8:
                break
        assert struct.unpack(">H", payload[:2])[0] == code, payload
    finally:
        sock.close()


def test_a_websocket_submit_too_deep_is_an_error(live: Api, queue: Queue) -> None:
    ws = ws_connect(live, "/ws/client/deep")
    assert recv(ws)["type"] == "connected"
    send(ws, {"type": "submit_job", "service_required": "simulation", "payload": deep_payload(100)})
    error = recv(ws)
    assert error["type"] == "error" and "API_MAX_JSON_DEPTH" in error["error"]
    send(ws, {"type": "submit_job", "service_required": "simulation\n"})
    error = recv(ws)
    assert error["type"] == "error" and error["field"] == "service_required"
    ws.close()


@pytest.mark.slow
def test_an_idle_monitor_holds_a_bounded_queue(redis_server: str, queue: Queue) -> None:
    """Second probe: big payloads, a monitor socket that never reads. Broadcasts carry summaries;
    what waits for the monitor stays within API_CLIENT_QUEUE_BYTES; the monitor is then closed as too slow."""
    limit = 65536
    for _ in range(10):
        queue.submit(JobSpec(service_required="simulation", payload={"blob": "p" * (5 * 1024 * 1024)}))
    with running_api(env_for(redis_server), API_CLIENT_QUEUE_BYTES=str(limit)) as api:
        idle = websocket.create_connection(api.ws_url + "/ws/monitor/idle", timeout=10,
                                           sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
        assert recv(idle)["type"] == "connected"
        broadcast, _ = recv_until(idle, "stats_broadcast")
        pending = broadcast["system"]["jobs"]["pending_jobs"]
        assert len(pending) == 10 and all("payload" not in job for job in pending)
        assert len(orjson.dumps(broadcast)) < 20_000
        worker = FakeWorker(queue)
        job_id = worker.submit(priority=100)
        assert worker.claim() == job_id
        biggest = 0
        for step in range(300):             # ~9 MB of progress messages the monitor never reads
            worker.progress(job_id, step % 100, "m" * 30_000, step)
            time.sleep(0.004)
            if step % 20 == 0:
                mine = api.get_json("/api/connection-stats")[1]["this_process"]
                biggest = max(biggest, mine["queued_bytes_max"])
        assert 0 < biggest <= limit + 40_000, biggest   # the bound, or one message over it into an empty queue
        deadline = time.monotonic() + 15
        while api.get_json("/api/connection-stats")[1]["websocket_connections"]["monitor"]:
            assert time.monotonic() < deadline, "the idle monitor was not closed"
            time.sleep(0.2)
        assert "client too slow" in api.log_text()
        idle.close()


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _api_worker_pid(api: Api) -> int:
    with open(f"/proc/{api.proc.pid}/task/{api.proc.pid}/children") as children:
        pids = [int(pid) for pid in children.read().split()]
    assert len(pids) == 1, pids
    return pids[0]


def _idle_streams(api: Api, job_id: str, count: int) -> list[socket.socket]:
    """`count` event streams of a job whose clients read nothing (a small receive buffer)."""
    request = f"GET /api/jobs/{job_id}/progress HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", api.port))
        sock.sendall(request)
        socks.append(sock)
    return socks


def _sse_open(api: Api) -> int:
    return int(api.get_json("/api/connection-stats")[1]["sse_connections"])


@pytest.mark.slow
def test_idle_event_streams_share_a_large_event_and_stay_bounded(redis_server: str, queue: Queue) -> None:
    """A 3 MB `completed` event, idle streams that never read: live ones (following when it came) and late ones
    (replaying it). Each holds the shared rendering, not a copy: the API process grows by far less than one
    event per client, and what each waits to write is counted (queued_bytes)."""
    limit, clients, result = 65536, 40, {"blob": "r" * (3 * 1024 * 1024)}
    with running_api(env_for(redis_server), API_CLIENT_QUEUE_BYTES=str(limit),
                     API_MAX_SSE_CONNECTIONS="1000") as api:
        pid = _api_worker_pid(api)
        worker = FakeWorker(queue)
        warm = worker.submit()
        worker.claim()
        worker.complete(warm, result)
        assert sse(api, warm).events()[-1].event == "completed"     # the process has rendered one such event
        before = _rss_bytes(pid)
        live_job = worker.submit()
        socks = _idle_streams(api, live_job, clients)
        try:
            wait_for(lambda: _sse_open(api) == clients, 20, "the live streams to open")
            assert worker.claim() == live_job
            worker.complete(live_job, result)
            late = _idle_streams(api, live_job, clients)
            socks += late
            wait_for(lambda: _sse_open(api) == 2 * clients, 20, "the late streams to open")
            # every stuck client counts the event it is writing, once
            stats = wait_for(lambda: (lambda s: s if s["queued_bytes"] >= 2 * clients * 3_000_000 else None)(
                api.get_json("/api/connection-stats")[1]["this_process"]), 30, "every stream to count the event")
            assert stats["queued_bytes_max"] <= 3 * 1024 * 1024 + 4096
            grown = _rss_bytes(pid) - before
            # a copy per client would be 80 x 3 MB; shared, it is one event's renderings plus small change
            assert grown < 2 * clients * limit + 30 * 1024 * 1024, grown
        finally:
            for sock in socks:
                sock.close()


# -- one job cannot flood the followers ----------------------------------------------------------------------
def test_the_simulation_refuses_more_steps_than_its_bound(api: falcon.testing.TestClient) -> None:
    body = error_of(api.simulate_post("/api/jobs", json={"service_required": "simulation",
                                                         "payload": {"duration": 1, "steps": 100_000}}), 400)
    assert "steps" in body["error"]


@pytest.mark.slow
def test_progress_writes_are_throttled_per_job_and_the_last_step_arrives(client: redis.Redis,
                                                                         settings: QueueSettings,
                                                                         queue: Queue) -> None:
    """10,000 steps meant for 1.5 s: at most WORKER_PROGRESS_MAX_PER_SECOND progress events a second (a second's worth
    at once), and the final step is among them."""
    worker = Worker(WorkerSettings(queue=settings, worker_id="w1", services=("simulation",),
                                   connectors=("simulation",), progress_max_per_second=10),
                    client, client, {"simulation": SimulationConnector(SimulationSettings())})
    worker.register()
    job_id = queue.submit(JobSpec(service_required="simulation", payload={"duration": 1500, "steps": 10_000}))
    started = time.monotonic()
    assert worker.run_once() == 1
    deadline = time.monotonic() + 60
    while worker.running:
        assert time.monotonic() < deadline, "the job did not finish"
        gevent.sleep(0.05)
    took_s = time.monotonic() - started
    progress = [fields for _, fields in client.xrange(queue.keys.progress(job_id)) if fields["event"] == "progress"]
    assert progress[-1]["current_step"] == "10000" and progress[-1]["progress"] == "100"
    assert 3 <= len(progress) <= 10 + 10 * (took_s + 1), (len(progress), took_s)   # the bound, not 10,001
    assert queue.get(job_id)["status"] == "completed"


# -- small edges -----------------------------------------------------------------------------------------------
def test_integers_beyond_64_bits_are_refused_not_rounded(api: falcon.testing.TestClient) -> None:
    raw = b'{"service_required": "simulation", "payload": {"n": [1, 123456789012345678901234567890]}}'
    body = error_of(api.simulate_post("/api/jobs", body=raw, headers={"Content-Type": "application/json"}), 400)
    assert body["field"] == "payload.n[1]" and "2^63" in body["error"]
    for fits in (b'{"service_required": "simulation", "payload": {"n": 9223372036854775807}}',
                 b'{"service_required": "simulation", "payload": {"f": 1e30}}'):
        assert api.simulate_post("/api/jobs", body=fits, headers={"Content-Type": "application/json"}
                                 ).status_code == 201


def test_invalid_utf8_is_named_as_such(api: falcon.testing.TestClient) -> None:
    raw = b'{"service_required": "simulation", "payload": {"s": "\xed\xa0\x80"}}'
    body = error_of(api.simulate_post("/api/jobs", body=raw, headers={"Content-Type": "application/json"}), 400)
    assert body["error"] == "body: not valid UTF-8; send JSON text in UTF-8"


def test_the_run_folder_makes_supervisords_log_private(tmp_path: Any) -> None:
    paths = Paths(tmp_path / "run")
    paths.make()
    log = paths.logs / "supervisord.log"
    assert log.is_file() and stat.S_IMODE(log.stat().st_mode) == 0o600
