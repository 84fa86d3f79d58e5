"""The legacy and client WebSocket sockets against a real gunicorn: flows, event order, bad input, close
codes."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import orjson
import pytest

from appliance.queue import Queue
from live_api import Api, FakeWorker, close_frame, iso_utc, recv, recv_until, running_api, send, ws_connect
from procs import env_for


@pytest.fixture(scope="module")
def api(redis_server: str) -> Iterator[Api]:
    with running_api(env_for(redis_server)) as running:
        yield running


# -- legacy socket -----------------------------------------------------------------------------------------
def test_legacy_submit_subscribe_and_events_in_order(api: Api, queue: Queue) -> None:
    ws = ws_connect(api, "/")
    hello = recv(ws)
    assert hello["type"] == "connected" and hello["client_id"] and hello["timestamp"].endswith("Z")
    send(ws, {"type": "submit_job", "id": "m1", "data": {"service_required": "simulation", "priority": 9,
                                                        "payload": {"steps": 3}}})
    submitted = recv(ws)
    assert submitted["type"] == "job_submitted" and submitted["message_id"] == "m1"
    job_id = submitted["job_id"]
    assert queue.get(job_id)["priority"] == 9

    send(ws, {"type": "subscribe_progress", "id": "m2", "job_id": job_id})
    assert recv(ws)["type"] == "subscribed"
    first = recv(ws)
    assert first["type"] == "progress" and first["event"] == "submitted" and first["data"]["job_id"] == job_id
    worker = FakeWorker(queue)
    worker.claim()
    worker.progress(job_id, 50, "half", 2)
    worker.complete(job_id, {"ok": 1})
    events = [recv(ws) for _ in range(5)]
    assert [(m["type"], m.get("event")) for m in events] == [
        ("progress", "assigned"), ("progress", "in_progress"), ("progress", "progress"),
        ("progress", "completed"), ("complete_job", None)]
    assert events[2]["progress"] == 50 and events[2]["data"]["message"] == "half"
    assert [m["id"] for m in [first, *events[:4]]] == worker.stream_ids(job_id)
    assert events[4]["result"] == {"ok": 1}

    send(ws, {"type": "get_job_status", "id": "m3", "job_id": job_id})
    status = recv(ws)
    assert status["type"] == "job_status" and status["job"]["status"] == "completed"
    send(ws, {"type": "get_job_status", "job_id": "missing"})
    assert recv(ws)["job"] is None
    ws.close()


def test_legacy_failure_with_retry_then_final_failure(api: Api, queue: Queue) -> None:
    worker = FakeWorker(queue)
    job_id = worker.submit(max_retries=1)
    ws = ws_connect(api)
    recv(ws)
    send(ws, {"type": "subscribe_progress", "job_id": job_id})
    recv_until(ws, "subscribed")
    worker.claim()
    worker.fail(job_id, "flaky", retryable=True)
    worker.claim()
    worker.fail(job_id, "broken", retryable=True)
    got = [recv(ws) for _ in range(6)]
    assert [m.get("event") or m["type"] for m in got] == ["submitted", "assigned", "retrying", "assigned",
                                                          "failed", "job_failed"]
    assert got[-1]["error"] == "broken"
    ws.close()


def test_legacy_cancel_pending_job_and_unsubscribe(api: Api, queue: Queue) -> None:
    worker = FakeWorker(queue)
    job_id = worker.submit()
    ws = ws_connect(api)
    recv(ws)
    send(ws, {"type": "subscribe_progress", "job_id": job_id})
    recv_until(ws, "subscribed")
    recv(ws)                                            # submitted
    send(ws, {"type": "cancel_job", "id": "c1", "job_id": job_id})
    reply, _ = recv_until(ws, "job_cancelled")
    assert reply["status"] == "cancelled" and reply["job_id"] == job_id
    assert queue.get(job_id)["status"] == "cancelled"
    assert queue.depth() == 0
    send(ws, {"type": "cancel_job", "job_id": job_id})
    err, _ = recv_until(ws, "error")
    assert err["status"] == "cancelled"
    other = worker.submit()
    send(ws, {"type": "subscribe_progress", "job_id": other})
    recv_until(ws, "subscribed")
    recv(ws)
    send(ws, {"type": "unsubscribe_progress", "job_id": other})
    assert recv(ws)["type"] == "unsubscribed"
    worker.claim()
    send(ws, {"type": "ping"})
    assert recv(ws)["type"] == "pong"                   # nothing of `other` arrives after unsubscribing
    ws.close()


def test_bad_input_gets_error_and_connection_keeps_working(api: Api, queue: Queue) -> None:
    ws = ws_connect(api, "/anything/else")
    recv(ws)
    cases: list[str | bytes] = [
        "not json", "[1, 2]", '{"no": "type"}', '{"type": "launch_rockets"}',
        '{"type": "subscribe_progress"}',
        '{"type": "subscribe_progress", "job_id": "nope"}', '{"type": "submit_job", "data": {"priority": 1}}',
        '{"type": "submit_job"}', '{"type": "submit_job", "data": "simulation"}', b"\x00\x01binary",
        '{"type": "subscribe_progress", "job_id": "x", "last_event_id": "bad"}',
    ]
    for case in cases:
        if isinstance(case, bytes):
            ws.send_binary(case)
        else:
            ws.send(case)
        reply = recv(ws)
        assert reply["type"] == "error" and reply["error"], (case, reply)
    send(ws, {"type": "submit_job", "data": {"service_required": "simulation"}})
    assert recv(ws)["type"] == "job_submitted"
    ws.send("x" * 70000)                                # API_WS_MAX_MESSAGE_BYTES=65536 in these tests
    assert close_frame(ws)[0] == 1009
    ws.close()


SUBMIT_PATHS = ["/", "/ws/client/shape-client", "/ws/monitor/shape-monitor"]


@pytest.mark.parametrize("path", SUBMIT_PATHS)
def test_every_socket_takes_submit_fields_top_level_or_under_data(api: Api, queue: Queue, path: str) -> None:
    """The guide's shapes on every socket; the message's own `type` is never read as the job's service."""
    ws = ws_connect(api, path)
    recv(ws)
    shapes = [
        {"type": "submit_job", "id": "a", "data": {"service_required": "simulation", "priority": 7,
                                                   "payload": {"steps": 2}}},
        {"type": "submit_job", "id": "b", "job_type": "simulation", "priority": 7, "payload": {"steps": 2},
         "timestamp": 1796007933085},
        {"type": "submit_job", "id": "c", "data": {"type": "simulation", "priority": 7, "payload": {"steps": 2}}},
        {"type": "submit_job", "id": "d", "service_required": "noop", "priority": 1,
         "data": {"service_required": "simulation", "priority": 7, "payload": {"steps": 2}}},
    ]
    for shape in shapes:
        send(ws, shape)
        reply, _ = recv_until(ws, "job_submitted")
        assert reply["message_id"] == shape["id"]
        job = queue.get(reply["job_id"])
        assert job is not None, shape
        assert (job["service_required"], job["priority"], job["payload"]) == ("simulation", 7, {"steps": 2}), shape
        assert job["status"] == "pending" and "timestamp" not in job
    ws.close()


@pytest.mark.parametrize("path", SUBMIT_PATHS)
def test_submit_that_cannot_be_run_is_an_error_and_stores_nothing(api: Api, queue: Queue, path: str) -> None:
    ws = ws_connect(api, path)
    recv(ws)
    cases = [
        ({"type": "submit_job", "id": "x1", "data": {"priority": 5, "payload": {"steps": 2}}}, "service_required"),
        ({"type": "submit_job", "id": "x2", "priority": 5}, "service_required"),
        ({"type": "submit_job", "id": "x3", "data": {"job_type": ""}}, "service_required"),
        ({"type": "submit_job", "id": "x4", "data": ["simulation"]}, "data"),
        ({"type": "submit_job", "id": "x5", "job_type": "simulation", "payload": {"fail": "yes"}}, "payload.fail"),
        ({"type": "submit_job", "id": "x6", "data": {"job_type": "simulation", "payload": {"duration": -5}}},
         "payload.duration"),
    ]
    for message, field in cases:
        send(ws, message)
        reply, _ = recv_until(ws, "error")
        assert reply["field"] == field and field in reply["error"] and reply["message_id"] == message["id"]
    k = queue.keys
    assert queue.client.keys(k.job("*")) == [] and queue.client.zcard(k.index_all) == 0
    assert queue.client.xlen(k.events) == 0 and queue.client.get(k.seq) is None
    ws.close()


def test_failed_handshake_is_400(api: Api) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=5)
    conn.request("GET", "/ws/client/x", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 400 and b"handshake" in body


# -- client socket -----------------------------------------------------------------------------------------
def test_client_socket_pushes_its_jobs_events(api: Api, queue: Queue) -> None:
    ws = ws_connect(api, "/ws/client/client-id-1?token=abc")
    assert recv(ws)["type"] == "connected"
    send(ws, {"type": "submit_job", "job_type": "simulation", "priority": 50, "payload": {"steps": 2},
              "workflow_priority": 0, "id": "u1", "timestamp": 1796007933085})
    submitted = recv(ws)
    assert submitted["type"] == "job_submitted" and submitted["message_id"] == "u1"
    job_id = submitted["job_id"]
    assert queue.get(job_id)["priority"] == 50
    worker = FakeWorker(queue)
    worker.claim()
    worker.progress(job_id, 25)
    worker.progress(job_id, 75)
    worker.complete(job_id, {"url": "x"})
    got = [recv(ws) for _ in range(5)]
    assert [m["type"] for m in got] == ["job_assigned", "job_status_changed", "update_job_progress",
                                        "update_job_progress", "complete_job"]
    assert all(m["job_id"] == job_id and iso_utc(m["timestamp"]) for m in got)
    assert got[0]["worker_id"] == "w1" and got[1]["new_status"] == "in_progress"
    assert [got[2]["progress"], got[3]["progress"]] == [25, 75]
    assert got[4]["result"] == {"url": "x"}

    send(ws, {"type": "submit_job", "job_type": "simulation", "max_retries": 1})
    second = recv(ws)["job_id"]
    worker.claim()
    worker.fail(second, "oom", retryable=True)
    worker.claim()
    worker.fail(second, "oom again", retryable=False)
    got = [recv(ws) for _ in range(4)]
    assert [m["type"] for m in got] == ["job_assigned", "job_status_changed", "job_assigned", "job_failed"]
    assert got[1]["new_status"] == "pending" and got[1]["error"] == "oom"
    assert got[3]["error"] == "oom again"
    send(ws, {"type": "sync_job_state", "job_id": second})
    assert recv(ws)["job"]["status"] == "failed"
    ws.close()


def test_client_socket_without_id_is_closed_1008(api: Api) -> None:
    ws = ws_connect(api, "/ws/client/")
    assert close_frame(ws)[0] == 1008
    ws.close()


def test_connection_stats_count_each_kind(api: Api) -> None:
    sockets = [ws_connect(api, path) for path in ("/", "/", "/ws/client/a", "/ws/monitor/m")]
    for ws in sockets:
        recv(ws)
    status, body = api.get_json("/api/connection-stats")
    assert status == 200 and body["success"] is True
    assert body["websocket_connections"] == {"legacy": 2, "client": 1, "monitor": 1, "total": 4}
    assert body["total_connections"] == body["sse_connections"] + 4
    for ws in sockets:
        ws.close()


def test_graceful_shutdown_closes_websockets_1001_and_ends_sse(redis_server: str, queue: Queue) -> None:
    with running_api(env_for(redis_server)) as own:
        worker = FakeWorker(queue)
        job_id = worker.submit()
        sockets = [ws_connect(own, path) for path in ("/", "/ws/client/c", "/ws/monitor/m")]
        for ws in sockets:
            recv(ws)
        from live_api import sse

        stream = sse(own, job_id)
        assert [stream.next().event, stream.next().event] == ["connected", "submitted"]
        own.proc.terminate()
        for ws in sockets:
            code, reason = close_frame(ws)
            assert code == 1001 and "restart" in reason
            ws.close()
        rest = stream.events()
        assert rest and rest[-1].event == "shutdown"
        assert own.proc.wait(15) == 0


def test_subscribe_progress_resumes_after_last_event_id(api: Api, queue: Queue) -> None:
    worker = FakeWorker(queue)
    job_id = worker.submit()
    worker.claim()
    worker.progress(job_id, 30)
    ids = worker.stream_ids(job_id)
    ws = ws_connect(api)
    recv(ws)
    send(ws, {"type": "subscribe_progress", "job_id": job_id, "last_event_id": ids[1]})
    recv_until(ws, "subscribed")
    assert [recv(ws)["id"] for _ in ids[2:]] == ids[2:]
    worker.complete(job_id)
    done = recv(ws)
    assert done["event"] == "completed" and done["id"] == worker.stream_ids(job_id)[-1]
    ws.close()


def test_offered_subprotocol_is_echoed(api: Api) -> None:
    import websocket

    ws = websocket.create_connection(api.ws_url + "/ws/monitor/m1", timeout=10, subprotocols=["appliance.v1"])
    assert ws.getsubprotocol() == "appliance.v1"
    assert recv(ws)["type"] == "connected"
    ws.close()


def test_long_ids_in_messages_are_never_echoed_whole(api: Api, queue: Queue) -> None:
    """A job id or message id of tens of kilobytes (up to API_WS_MAX_MESSAGE_BYTES): an error naming the
    field, a short prefix echoed."""
    ws = ws_connect(api, "/")
    assert recv(ws)["type"] == "connected"
    for message in ({"type": "subscribe_progress", "job_id": "j" * 60_000},
                    {"type": "get_job_status", "job_id": "j" * 60_000},
                    {"type": "ping", "id": "i" * 60_000}):
        send(ws, message)
        text = ws.recv()
        assert len(text) < 1000 and "j" * 100 not in text and "i" * 100 not in text, text[:200]
        if message["type"] != "ping":
            reply = orjson.loads(text)
            assert reply["type"] == "error" and reply["field"] == "job_id"
    ws.close()


def test_without_keys_a_page_of_another_site_cannot_open_a_socket(api: Api) -> None:
    import websocket

    for path in ("/ws/monitor/evil", "/ws/client/evil", "/"):
        with pytest.raises(websocket.WebSocketBadStatusException) as caught:
            websocket.create_connection(api.ws_url + path, timeout=10, origin="http://evil.example")
        assert caught.value.status_code == 403, path
    local = websocket.create_connection(api.ws_url + "/ws/monitor/local", timeout=10,
                                        origin="http://localhost:3000")
    assert recv(local)["type"] == "connected"
    local.close()
