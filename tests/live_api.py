"""Helpers for live-progress tests: a real gunicorn API on a free port, an SSE reader, WebSocket clients,
and a fake worker that writes job events through the Lua scripts (fast and deterministic)."""

from __future__ import annotations

import http.client
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
import websocket

from appliance.jobs import JobSpec
from appliance.queue import Queue
from procs import ROOT, Proc, free_port, wait_alive

GUNICORN = str(ROOT / ".venv" / "bin" / "gunicorn")


@dataclass
class Api:
    port: int
    process: Proc

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.process.proc

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def get_json(self, path: str) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, orjson.loads(resp.read())
        finally:
            conn.close()

    def post_json(self, path: str, body: Any) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", path, orjson.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, orjson.loads(resp.read())
        finally:
            conn.close()

    def log_text(self) -> str:
        return self.process.text()

    def healthy(self) -> bool:
        try:
            return self.get_json("/health")[0] == 200
        except OSError:
            return False


@contextmanager
def running_api(env_base: dict[str, str], **extra: str) -> Iterator[Api]:
    """gunicorn with the appliance API on a free loopback port; stopped (TERM, then KILL) at the end."""
    port = free_port()
    env = {**env_base, "API_PORT": str(port), "API_BIND": "127.0.0.1", "API_SSE_KEEPALIVE_SECONDS": "0.5",
           "API_WS_MAX_MESSAGE_BYTES": "65536", "LOG_LEVEL": "warning", **extra}
    api = Api(port, Proc([GUNICORN, "--config", "etc/gunicorn.conf.py", "appliance.api.wsgi:app"], env, "api"))
    try:
        try:
            wait_alive(api.proc, api.healthy, 20, "the API to answer /health")
        except AssertionError as exc:
            raise RuntimeError(f"API did not start ({exc}): {api.log_text()}") from None
        yield api
    finally:
        api.process.stop(15)
        api.process.close()


def iso_utc(value: Any) -> bool:
    """Whether `value` is an ISO 8601 time in UTC, as the appliance writes every `*_at` and `timestamp`."""
    if not isinstance(value, str) or not value.endswith("Z"):
        return False
    try:
        return datetime.fromisoformat(value).utcoffset() == timedelta(0)
    except ValueError:
        return False


# -- SSE ---------------------------------------------------------------------------------------------------
@dataclass
class Frame:
    event: str = "message"
    id: str | None = None
    data: Any = None
    comment: str | None = None


@dataclass
class Sse:
    status: int
    headers: dict[str, str]
    body: Any = None
    frames: list[Frame] = field(default_factory=list)
    _resp: Any = None
    _conn: Any = None

    def next(self) -> Frame | None:
        """The next frame or comment; None at the end of the stream."""
        frame = Frame()
        seen = False
        while True:
            line = self._resp.readline()
            if not line:
                self.close()
                return frame if seen else None
            text = line.decode().rstrip("\n")
            if text == "":
                if seen:
                    self.frames.append(frame)
                    return frame
                continue
            seen = True
            name, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":
                frame.comment = value
            elif name == "event":
                frame.event = value
            elif name == "id":
                frame.id = value
            elif name == "data":
                frame.data = orjson.loads(value)

    def events(self, until_end: bool = True) -> list[Frame]:
        """Every event frame until the stream ends (comments skipped)."""
        out = []
        while (frame := self.next()) is not None:
            if frame.comment is None:
                out.append(frame)
        return out

    def close(self) -> None:
        self._resp.close()
        self._conn.close()


def sse(api: Api, job_id: str, last_event_id: str | None = None, timeout: float = 10) -> Sse:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=timeout)
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    conn.request("GET", f"/api/jobs/{job_id}/progress", headers=headers)
    resp = conn.getresponse()
    out = Sse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, _resp=resp, _conn=conn)
    if resp.status != 200:
        out.body = orjson.loads(resp.read())
        conn.close()
    return out


# -- WebSocket ---------------------------------------------------------------------------------------------
def ws_connect(api: Api, path: str = "/", timeout: float = 10) -> websocket.WebSocket:
    return websocket.create_connection(api.ws_url + path, timeout=timeout)


def send(ws: websocket.WebSocket, message: dict[str, Any]) -> None:
    ws.send(orjson.dumps(message).decode())


def recv(ws: websocket.WebSocket) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(ws.recv())
    assert "type" in message and "timestamp" in message, message
    return message


def recv_until(ws: websocket.WebSocket, kind: str,
               limit: int = 200) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Messages until the first of type `kind`; returns it and everything before it."""
    before = []
    for _ in range(limit):
        message = recv(ws)
        if message["type"] == kind:
            return message, before
        before.append(message)
    raise AssertionError(f"no {kind} in {limit} messages: {[m['type'] for m in before]}")


def close_frame(ws: websocket.WebSocket, limit: int = 1000) -> tuple[int, str]:
    """Read until the server's close frame; returns its code and reason."""
    for _ in range(limit):
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            ws.shutdown()
            return int.from_bytes(data[:2], "big"), data[2:].decode()
    raise AssertionError("no close frame")


# -- a worker that writes through the scripts --------------------------------------------------------------
class FakeWorker:
    """Claims and reports jobs with the real scripts, step by step under the test's control."""

    def __init__(self, queue: Queue, worker_id: str = "w1", register: bool = True):
        self.queue = queue
        self.id = worker_id
        self.attempts: dict[str, str] = {}
        if register:
            caps = {"services": ["simulation"], "hardware": {"gpu_model": "RTX 4090", "gpu_memory_gb": 24,
                                                             "cpu_cores": 16, "gpu_count": 1, "ram_gb": 64}}
            queue.scripts.register_worker(worker_id, 60, {"capabilities": orjson.dumps(caps).decode(),
                                                          "services": "simulation"})

    def submit(self, **fields: Any) -> str:
        return self.queue.submit(JobSpec.parse({"service_required": "simulation", **fields}))

    def claim(self) -> str:
        result = self.queue.scripts.claim(self.id, [self.queue.keys.pending_service("simulation")], 1, 60000)
        job = result.jobs[0]
        self.attempts[job.id] = job.attempt
        return job.id

    def progress(self, job_id: str, percent: int, message: str = "", step: int = 0, total: int = 4) -> str:
        return self.queue.scripts.progress(job_id, self.id, self.attempts[job_id], percent, message, step,
                                           total)

    def complete(self, job_id: str, result: Any = None) -> None:
        self.queue.scripts.complete(job_id, self.id, self.attempts[job_id], result or {"ok": True})

    def fail(self, job_id: str, error: str, retryable: bool = False) -> None:
        self.queue.scripts.fail(job_id, self.id, self.attempts[job_id], error, retryable=retryable,
                                delay_ms=0)

    def stream_ids(self, job_id: str) -> list[str]:
        return [entry_id for entry_id, _ in self.queue.client.xrange(self.queue.keys.progress(job_id))]
