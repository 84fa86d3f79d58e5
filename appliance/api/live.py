"""Live progress for one API process: the stream reader, the connection registry, the statistics ticker,
the WSGI entry that sends WebSocket upgrades (on any path) to their socket kind and everything else to Falcon,
and GET /api/connection-stats.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import falcon
import orjson

from appliance import clock
from appliance.api.connections import Registry
from appliance.api.fanout import Hub
from appliance.api.monitor import enricher
from appliance.api.websocket import POLICY, HandshakeError, WebSocket
from appliance.api.ws_monitor import MonitorSession, StatsTicker
from appliance.api.ws_session import ClientSession, LegacySession, Live, Session
from appliance.queue import Queue
from appliance.redis_conn import connect
from appliance.settings import ApiSettings

log = logging.getLogger(__name__)

_PATH = re.compile(r"^/ws/(client|monitor)(?:/([^/]*))?/?$")
FANOUT_POOL = 4            # connections for history reads and wake-ups, whatever the number of subscribers


def create_live(settings: ApiSettings, queue: Queue) -> Live:
    """The process's live-progress parts over their own small Redis pools (nothing runs until start)."""
    url = settings.queue.redis_url
    blocking = connect(url, blocking=True, max_connections=1)
    client = connect(url, max_connections=FANOUT_POOL)
    hub = Hub(blocking, client, queue.keys, {queue.keys.events: enricher(queue.keys)})
    registry = Registry(client, queue.keys, hub.instance)
    return Live(settings, queue, hub, registry)


class LiveServices:
    """Starts and stops the greenlets of live progress."""

    def __init__(self, live: Live):
        self.live = live
        self.ticker = StatsTicker(live)

    def start(self) -> None:
        self.live.hub.start()
        self.live.registry.start()
        self.ticker.start()

    def stop(self) -> None:
        self.ticker.stop()
        self.live.registry.stop()
        self.live.hub.stop()


class ConnectionStats:
    """GET /api/connection-stats: open SSE and WebSocket connections over every API process."""

    def __init__(self, live: Live):
        self.live = live

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps({"success": True, **self.live.registry.totals(),
                                  "timestamp": clock.iso(clock.now_ms())})


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
        try:
            ws = WebSocket.accept(environ, settings.ws_max_message_bytes, settings.ws_ping_interval_s)
        except HandshakeError as exc:
            body = orjson.dumps({"success": False, "error": str(exc), "timestamp": clock.iso(clock.now_ms())})
            start_response("400 Bad Request", [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))])
            return [body]
        path = environ.get("PATH_INFO") or "/"
        session = session_for(ws, self.live, path)
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
        if self.services is not None:
            self.services.ticker.stop()
            self.live.registry.stop()
        return told
