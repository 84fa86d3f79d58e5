"""Following one job's progress the way clients do: SSE (GET /api/jobs/{id}/progress) or the legacy WebSocket.

Each event that the worker wrote after the subscription began is reported to locust as a request of type
"SSE" or "WS" named "progress delivery", with its delivery latency (receipt minus the event's `updated_at`,
both on this host's clock, whole milliseconds on the writer's side) as the response time.
"""

from __future__ import annotations

import http.client
import time
from typing import Any

import orjson
import websocket

from loadtest.audit import TERMINAL, iso_ms

DELIVERY = "progress delivery"


class FollowError(Exception):
    """The stream broke off or did not reach the job's end in time."""


def _fire(environment: Any, kind: str, name: str, ms: float, length: int, exc: Exception | None = None) -> None:
    environment.events.request.fire(request_type=kind, name=name, response_time=ms, response_length=length,
                                    exception=exc, context={})


def follow_sse(environment: Any, host: str, port: int, job_id: str, timeout_s: float) -> str:
    """Read the job's SSE stream to its terminal event; returns that event's name.

    Raises:
        FollowError: the stream ended without a terminal event, or did not end within `timeout_s`.
    """
    started = time.time()
    deadline = time.monotonic() + timeout_s
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", f"/api/jobs/{job_id}/progress", headers={"Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise FollowError(f"SSE answered HTTP {resp.status}: {resp.read(300)!r}")
        _fire(environment, "SSE", "connect", (time.time() - started) * 1000, 0)
        data: list[bytes] = []
        while time.monotonic() < deadline:
            line = resp.readline()
            if not line:
                raise FollowError("SSE stream ended before the job's terminal event")
            line = line.rstrip(b"\r\n")
            if line.startswith(b"data:"):
                data.append(line[5:].strip())
                continue
            if line or not data:
                continue
            message = orjson.loads(b"\n".join(data))
            data = []
            event = _delivered(environment, "SSE", message, started)
            if event in TERMINAL:
                return event
        raise FollowError(f"no terminal event within {timeout_s:.0f}s")
    finally:
        conn.close()


def _delivered(environment: Any, kind: str, message: dict[str, Any], since_s: float) -> str:
    """Report one job event (skipping replayed history); returns the event name ('' for other frames)."""
    fields = message.get("data") if kind == "WS" else message
    if not isinstance(fields, dict) or "updated_at" not in fields:
        return ""
    event = str(fields.get("event") or message.get("type") or "")
    written = iso_ms(fields.get("updated_at"))
    now = time.time() * 1000
    if written is not None and written >= since_s * 1000 - 1:
        _fire(environment, kind, DELIVERY, max(0.0, now - written), 0)
    return event


def follow_ws(environment: Any, url: str, job_id: str, timeout_s: float) -> str:
    """Subscribe on the legacy WebSocket and read `progress` messages to the terminal event."""
    started = time.time()
    ws = websocket.create_connection(url, timeout=timeout_s)
    try:
        ws.send(orjson.dumps({"type": "subscribe_progress", "job_id": job_id, "id": 1}).decode())
        _fire(environment, "WS", "connect", (time.time() - started) * 1000, 0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ws.settimeout(max(0.1, deadline - time.monotonic()))
            message = orjson.loads(ws.recv())
            kind = message.get("type")
            if kind == "error":
                raise FollowError(f"WebSocket error: {message.get('error')}")
            if kind != "progress":
                continue
            event = _delivered(environment, "WS", message, started)
            if event in TERMINAL:
                # websocket-client's close() wraps its work in a bare `except`, which would swallow a
                # greenlet kill (locust stopping users) and leave the user running: no handshake wait here
                ws.close(timeout=0)
                return event
        raise FollowError(f"no terminal event within {timeout_s:.0f}s")
    except websocket.WebSocketTimeoutException:
        raise FollowError(f"no terminal event within {timeout_s:.0f}s") from None
    finally:
        ws.shutdown()


def timed_follow(environment: Any, kind: str, follow: Any, *args: Any) -> str | None:
    """Run a follower, reporting a failure of `kind` "follow" if it breaks; returns the terminal event."""
    started = time.time()
    try:
        event = follow(*args)
    except (FollowError, OSError, websocket.WebSocketException, ValueError, http.client.HTTPException) as exc:
        _fire(environment, kind, "follow to end", (time.time() - started) * 1000, 0, exc)
        return None
    _fire(environment, kind, "follow to end", (time.time() - started) * 1000, 0)
    return event
