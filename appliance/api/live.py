"""Live progress for one API process: the stream reader, the connection registry, the statistics ticker,
the WSGI entry that sends WebSocket upgrades (on any path) to their socket kind and everything else to Falcon,
and GET /api/connection-stats.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import falcon

from appliance import clock
from appliance.api import render
from appliance.api.auth import Refusal, websocket_identity
from appliance.api.connections import Registry
from appliance.api.fanout import Hub
from appliance.api.janitor import Janitor
from appliance.api.monitor import enricher
from appliance.api.tasks import stop_process
from appliance.api.websocket import POLICY, HandshakeError, WebSocket
from appliance.api.ws_monitor import MonitorSession, StatsTicker
from appliance.api.ws_session import ClientSession, LegacySession, Live, Session
from appliance.queue import Queue
from appliance.redis_conn import connect
from appliance.settings import ApiSettings

log = logging.getLogger(__name__)

_PATH = re.compile(r"^/ws/(client|monitor)(?:/([^/]*))?/?$")
FANOUT_POOL = 4            # connections for history reads and wake-ups, whatever the number of subscribers
POOL_WAIT_S = 60.0         # a burst of connects waits for a pooled connection rather than failing (503)
WS_RETRY_S = 5             # Retry-After when the process's WebSockets are at their limit


def create_live(settings: ApiSettings, queue: Queue) -> Live:
    """The process's live-progress parts over their own small Redis pools (nothing runs until start)."""
    url = settings.queue.redis_url
    blocking = connect(url, blocking=True, max_connections=1)
    client = connect(url, max_connections=FANOUT_POOL)
    # Live reads are short; under a burst (a thousand streams opening at once) they queue for the few
    # connections instead of failing after the pool's usual wait. Redis outages still fail fast: each command
    # has its own socket timeouts.
    client.connection_pool.timeout = POOL_WAIT_S  # type: ignore[attr-defined]
    hub = Hub(blocking, client, queue.keys, {queue.keys.events: enricher(queue.keys)})
    registry = Registry(client, queue.keys, hub.instance)
    return Live(settings, queue, hub, registry)


class LiveServices:
    """Starts and stops the background tasks of an API process (live progress and the janitor), and watches
    them: a task that dies makes /health answer 503 and the process restart itself (appliance.api.tasks)."""

    def __init__(self, live: Live, on_dead: Callable[[str], None] = stop_process):
        self.live = live
        self.ticker = StatsTicker(live)
        self.janitor = Janitor(live.queue)
        self.on_dead = on_dead
        for task in (live.hub, live.registry, self.ticker, self.janitor):
            live.tasks.add(task)

    def start(self) -> None:
        self.live.hub.start()
        self.live.registry.start()
        self.ticker.start()
        self.janitor.start()
        self.live.tasks.watch(self.on_dead)

    def stop(self) -> None:
        self.live.tasks.unwatch()
        self.janitor.stop()
        self.ticker.stop()
        self.live.registry.stop()
        self.live.hub.stop()


class ConnectionStats:
    """GET /api/connection-stats: open SSE and WebSocket connections over every API process."""

    def __init__(self, live: Live):
        self.live = live

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = render.dumps({"success": True, **self.live.registry.totals(),
                                  "timestamp": clock.iso(clock.now_ms())})


def path_kind(path: str) -> str:
    """`client`, `monitor` or `legacy`: the socket kind a path opens."""
    match = _PATH.match(path)
    return match.group(1) if match else "legacy"


def session_for(ws: WebSocket, live: Live, path: str) -> Session | None:
    """The session kind for a path: /ws/client/{id}, /ws/monitor/{id}, anything else legacy.

    None for a client or monitor path without an id (closed with 1008, as the original did)."""
    match = _PATH.match(path)
    if match is None:
        return LegacySession(ws, live)
    kind, conn_id = match.groups()
    if not conn_id:
        return None
    return ClientSession(ws, live, conn_id) if kind == "client" else MonitorSession(ws, live, conn_id)


class LiveApp:
    """The WSGI callable gunicorn serves: WebSocket upgrades here, all other requests to Falcon."""

    def __init__(self, falcon_app: falcon.App[Any, Any], live: Live, services: LiveServices | None = None):
        self.falcon_app = falcon_app
        self.live = live
        self.services = services

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return self.falcon_app(environ, start_response)
        settings = self.live.settings
        path = environ.get("PATH_INFO") or "/"
        identity = websocket_identity(environ, settings, monitor=path_kind(path) == "monitor")
        if isinstance(identity, Refusal):
            start_response(identity.status, identity.headers)
            return [identity.body]
        if self.live.registry.websockets() >= settings.max_ws_connections:
            return _refuse(start_response, "503 Service Unavailable", (
                f"This API process already serves {settings.max_ws_connections} WebSockets "
                f"(API_MAX_WS_CONNECTIONS); retry in {WS_RETRY_S} s"), [("Retry-After", str(WS_RETRY_S))])
        try:
            ws = WebSocket.accept(environ, settings.ws_max_message_bytes, settings.ws_ping_interval_s)
        except HandshakeError as exc:
            return _refuse(start_response, "400 Bad Request", str(exc)[:200])
        session = session_for(ws, self.live, path)
        if session is not None:
            session.identity = identity
            session.remote_addr = str(environ.get("REMOTE_ADDR") or "")
        if session is None:
            ws.close(POLICY, f"{path} needs an id, e.g. {path.rstrip('/')}/my-id")
            ws.receive()
        else:
            try:
                session.run()
            except Exception:
                log.exception("WebSocket session on %s failed", path)
        # gunicorn closes the connection without writing a response (the socket was ours)
        raise StopIteration

    def shutdown(self) -> int:
        """Graceful stop: WebSockets get close 1001, SSE streams end; this process leaves the counts."""
        told = self.live.registry.shutdown()
        self.live.tasks.unwatch()
        if self.services is not None:
            self.services.ticker.stop()
            self.live.registry.stop()
        return told


def _refuse(start_response: Any, status: str, error: str,
            headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    """Turn a WebSocket handshake down with an HTTP answer in the envelope."""
    body = render.dumps({"success": False, "error": error, "timestamp": clock.iso(clock.now_ms())})
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            *(headers or [])])
    return [body]
