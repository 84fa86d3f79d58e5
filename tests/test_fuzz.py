"""Fuzzing a real API (gunicorn on a private port): schemathesis over /openapi.json, with and without API keys,
and hypothesis-made messages on the three WebSocket paths. Afterwards: no 5xx, every answer as documented, the
server and its background tasks still working, nothing half-written in Redis."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis.strategies as st
import orjson
import pytest
import redis
import requests
import schemathesis
import websocket
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from appliance.queue import Queue
from appliance.settings import QueueSettings
from live_api import Api, FakeWorker, Sse, recv, recv_until, running_api, send

pytestmark = pytest.mark.slow

HTTP_EXAMPLES = 40           # per operation and mode (positive, negative)
WS_EXAMPLES = 150            # per WebSocket path
KEY = "fuzz-key-0123456789abcdef"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
JOB_REQUIRED = ("id", "service_required", "status", "priority", "created_at")
SOCKETS = ("/", "/ws/client/fuzz-client", "/ws/monitor/fuzz-monitor")


@pytest.fixture()
def live_queue(client: redis.Redis, settings: QueueSettings) -> Queue:
    return Queue(client, settings)


def seed(queue: Queue) -> tuple[FakeWorker, str]:
    """A registered worker and jobs in several states, so lists and records are not empty; returns the worker
    and a pending job to watch."""
    worker = FakeWorker(queue)
    done = worker.submit(payload={"steps": 2})
    watched = worker.submit(priority=0)
    assert worker.claim() == done
    worker.progress(done, 50, "half", 1, 2)
    worker.complete(done, {"images": ["a.png"]})
    return worker, watched


def fuzz_http(api: Api, headers: dict[str, str]) -> int:
    """schemathesis over every documented operation; returns how many requests it made."""
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{api.port}/openapi.json", headers=dict(headers))
    base = f"http://127.0.0.1:{api.port}"
    calls = 0
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=HTTP_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                nonlocal calls
                calls += 1
                response = case.call(base_url=base, session=session, headers=dict(headers), timeout=10)
                case.validate_response(response, checks=CHECKS, headers=dict(headers))

            try:
                run()
            except Unsatisfiable:
                # nothing in the operation to make invalid (no parameters, no body)
                assert mode == GenerationMode.NEGATIVE, operation.label
    session.close()
    return calls


def assert_still_well(api: Api, queue: Queue, watched: str, stream: Any, headers: dict[str, str]) -> None:
    """After the fuzz: health and its tasks, the SSE stream opened before still live, a fresh client socket
    that submits and follows a job, and every job record complete, indexed, and no key with a newline."""
    status, body = get(api, "/health", headers)
    assert status == 200, body
    tasks = body.get("tasks", [])
    assert all(task["alive"] for task in tasks), tasks
    # the SSE stream opened before the fuzz gets the watched job's end (the stream reader survived)
    assert request(api, "DELETE", f"/api/jobs/{watched}", headers)[0] == 200
    events = [frame.event for frame in stream.events()]
    assert events[-1] == "job_cancelled" or "cancelled" in events[-1], events
    ws = websocket.create_connection(f"{api.ws_url}/ws/client/after-fuzz", timeout=10, header=headers)
    try:
        assert recv(ws)["type"] == "connected"
        send(ws, {"type": "submit_job", "service_required": "simulation", "priority": 0, "id": 1})
        submitted, _ = recv_until(ws, "job_submitted")
        send(ws, {"type": "cancel_job", "job_id": submitted["job_id"]})
        end, _ = recv_until(ws, "job_failed")       # the client socket's name for every unsuccessful end
        assert end["job_id"] == submitted["job_id"] and end["status"] == "cancelled", end
    finally:
        ws.close()
    keys = queue.keys
    client = queue.client
    for key in client.scan_iter(count=1000):
        assert "\n" not in key and "\r" not in key, repr(key)
    jobs = [key for key in client.scan_iter(match=f"{keys.job_prefix}*", count=1000)
            if client.type(key) == "hash"]
    assert len(jobs) > 10
    for key in jobs:
        fields = client.hgetall(key)
        missing = [name for name in JOB_REQUIRED if not fields.get(name)]
        assert not missing, (key, missing, fields)
        assert client.zscore(keys.index_all, fields["id"]) is not None, key
        assert client.zscore(keys.index_status(fields["status"]), fields["id"]) is not None, key


def request(api: Api, method: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    finally:
        conn.close()


def get(api: Api, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    return request(api, "GET", path, headers)


# -- WebSocket messages -----------------------------------------------------------------------------------------
KNOWN_TYPES = ["submit_job", "subscribe_progress", "unsubscribe_progress", "get_job_status", "cancel_job", "ping",
               "sync_job_state", "monitor_connect", "subscribe", "heartbeat", "subscribe_stats", "request_stats",
               "resync_request"]
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
FIELD_NAMES = ["job_id", "data", "service_required", "priority", "payload", "requirements", "last_event_id",
               "reason", "topics", "since_timestamp", "max_events", "request_full_state", "id", "message_id",
               "timeout_seconds", "max_retries", "customer_id", "step_number", "workflow_datetime"]
# json, not orjson: integers beyond 64 bits are part of the fuzz
messages = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(KNOWN_TYPES) | st.text(max_size=20) | json_values},
                          optional={name: json_values for name in FIELD_NAMES})
    .map(lambda message: ("text", json.dumps(message))),
    st.dictionaries(st.text(max_size=12), json_values, max_size=5).map(lambda m: ("text", json.dumps(m))),
    json_values.map(lambda value: ("text", json.dumps(value))),
    st.text(max_size=200).map(lambda text: ("text", text)),
    st.binary(max_size=200).map(lambda data: ("binary", data)),
)


def fuzz_socket(api: Api, path: str, headers: dict[str, str]) -> int:
    """Random messages on one path, each followed by a ping answered in order: the socket keeps serving, and no
    message is answered with an internal error. Returns how many messages went out."""
    state: dict[str, Any] = {"ws": None, "sent": 0}

    def connection() -> websocket.WebSocket:
        if state["ws"] is None:
            state["ws"] = websocket.create_connection(api.ws_url + path, timeout=10, header=headers)
            assert recv(state["ws"])["type"] == "connected"
        ws: websocket.WebSocket = state["ws"]
        return ws

    @given(message=messages)
    @settings(max_examples=WS_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(message: tuple[str, Any]) -> None:
        ws = connection()
        kind, data = message
        if kind == "binary":
            ws.send_binary(data)
        else:
            ws.send(data)
        state["sent"] += 1
        marker = f"after-{state['sent']}"
        send(ws, {"type": "ping", "id": marker})
        for _ in range(2000):
            opcode, raw = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(raw[:2], "big")
                state["ws"] = None
                assert code not in (1011, 1006), (path, message, code, raw[2:])
                return
            if opcode not in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                continue
            reply = orjson.loads(raw)
            if reply.get("type") == "error":
                assert "Internal error" not in reply.get("error", ""), (path, message, reply)
            if reply.get("type") == "pong" and reply.get("message_id") == marker:
                return
        raise AssertionError(f"no pong after {message!r} on {path}")

    try:
        run()
    finally:
        if state["ws"] is not None:
            state["ws"].close()
    return int(state["sent"])


def fuzz_all(api: Api, queue: Queue, headers: dict[str, str], report: Callable[[str], None]) -> None:
    _, watched = seed(queue)
    stream = sse_with(api, watched, headers)
    try:
        assert stream.status == 200
        assert stream.next() is not None     # `connected`
        calls = fuzz_http(api, headers)
        sent = {path: fuzz_socket(api, path, headers) for path in SOCKETS}
        report(f"{calls} HTTP requests, WebSocket messages {sent}")
        assert_still_well(api, queue, watched, stream, headers)
    finally:
        stream.close()
    assert "Traceback" not in api.log_text(), api.log_text()[-4000:]


def sse_with(api: Api, job_id: str, headers: dict[str, str]) -> Sse:
    """An open event stream of the job (live_api.sse, with the key's headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=20)
    conn.request("GET", f"/api/jobs/{job_id}/progress", headers={"Accept": "text/event-stream", **headers})
    resp = conn.getresponse()
    return Sse(resp.status, dict(resp.getheaders()), _resp=resp, _conn=conn)


@pytest.fixture()
def report(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[str], None]]:
    lines: list[str] = []
    yield lines.append
    with capsys.disabled():
        for line in lines:
            print("\n" + line)


def test_fuzz_without_keys(env_base: dict[str, str], live_queue: Queue, report: Callable[[str], None]) -> None:
    with running_api(env_base) as api:
        fuzz_all(api, live_queue, {}, report)


def test_fuzz_with_keys(env_base: dict[str, str], live_queue: Queue, report: Callable[[str], None]) -> None:
    with running_api(env_base, API_KEYS=f"fuzz:{KEY}:admin") as api:
        status, body = get(api, "/api/jobs", {})
        assert status == 401, body
        fuzz_all(api, live_queue, {"X-API-Key": KEY}, report)
