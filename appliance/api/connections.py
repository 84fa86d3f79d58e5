"""Live SSE and WebSocket connections of this API process, their counts over every API process, and the
graceful close of all of them when gunicorn stops the process.

Each process publishes its counts to one Redis hash (field = its instance id) about once a second when
they change and every few seconds otherwise; `totals()` adds this process's live counts to the other
processes' recent entries.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import gevent
import orjson
import redis

from appliance import clock
from appliance.api.tasks import TaskState
from appliance.keys import Keys

log = logging.getLogger(__name__)

WS_KINDS = ("legacy", "client", "monitor")
PUBLISH_INTERVAL_S = 1.0
REFRESH_INTERVAL_S = 5.0
STALE_MS = 15_000


class Connection(Protocol):
    kind: str                      # "sse" or one of WS_KINDS
    id: str

    def shutdown(self) -> None:
        """Close for a server restart (WebSocket: close 1001; SSE: end the stream)."""


class Registry(TaskState):
    """Every open connection of this process, by kind."""

    name = "connection counts"

    def __init__(self, client: redis.Redis, keys: Keys, instance: str):
        self.client = client
        self.keys = keys
        self.instance = instance
        self.open: dict[str, set[Connection]] = {kind: set() for kind in ("sse", *WS_KINDS)}
        self.closing = False
        self._dirty = True
        self._greenlet: gevent.Greenlet | None = None

    def add(self, conn: Connection) -> None:
        self.open[conn.kind].add(conn)
        self._dirty = True

    def remove(self, conn: Connection) -> None:
        self.open[conn.kind].discard(conn)
        self._dirty = True

    def ids(self, kind: str) -> list[str]:
        return sorted(conn.id for conn in self.open[kind])

    def of_kind(self, kind: str) -> list[Connection]:
        return list(self.open[kind])

    def counts(self) -> dict[str, Any]:
        ws = {kind: len(self.open[kind]) for kind in WS_KINDS}
        return {"sse": len(self.open["sse"]), "websocket": ws}

    def websockets(self) -> int:
        return sum(len(self.open[kind]) for kind in WS_KINDS)

    def queued(self) -> dict[str, int]:
        """Bytes waiting in this process's client queues: in all, and in the fullest one."""
        sizes = [getattr(getattr(conn, "sub", None), "queued_bytes", 0) for conns in self.open.values()
                 for conn in conns]
        return {"queued_bytes": sum(sizes), "queued_bytes_max": max(sizes, default=0)}

    # -- over every API process ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._greenlet is None:
            self.spawn(self._publish_loop)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
        try:
            self.client.hdel(self.keys.api_connections, self.instance)
        except redis.RedisError:
            pass

    def _publish_loop(self) -> None:
        last = 0.0
        while True:
            gevent.sleep(PUBLISH_INTERVAL_S)
            now = clock.now_ms() / 1000
            if not self._dirty and now - last < REFRESH_INTERVAL_S:
                continue
            self._dirty = False
            try:
                self.publish()
                last = now
            except redis.RedisError as exc:
                self._dirty = True
                log.debug("connection counts not published: %s", exc)
            except Exception as exc:
                self._dirty = True
                self.note_error(exc)
                log.exception("connection counts not published")

    def publish(self) -> None:
        body = {**self.counts(), "updated_ms": clock.now_ms()}
        self.client.hset(self.keys.api_connections, self.instance, orjson.dumps(body))

    def totals(self) -> dict[str, Any]:
        """Counts summed over this process (live) and every other API process that reported recently."""
        mine = self.counts()
        sse, ws = mine["sse"], dict(mine["websocket"])
        processes = 1
        now = clock.now_ms()
        for instance, raw in self.client.hgetall(self.keys.api_connections).items():
            if instance == self.instance:
                continue
            try:
                other = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if now - int(other.get("updated_ms", 0)) > STALE_MS:
                self.client.hdel(self.keys.api_connections, instance)     # a process that died
                continue
            processes += 1
            sse += int(other.get("sse", 0))
            for kind in WS_KINDS:
                ws[kind] += int(other.get("websocket", {}).get(kind, 0))
        ws_total = sum(ws.values())
        return {"sse_connections": sse, "websocket_connections": {**ws, "total": ws_total},
                "total_connections": sse + ws_total, "api_processes": processes,
                "this_process": {"instance": self.instance, **mine, **self.queued()}}

    # -- graceful stop -------------------------------------------------------------------------------------
    def shutdown(self) -> int:
        """Close every connection for a restart; returns how many were told."""
        self.closing = True
        told = 0
        for kind in self.open:
            for conn in list(self.open[kind]):
                try:
                    conn.shutdown()
                    told += 1
                except Exception:  # one broken connection must not keep the others open
                    log.exception("closing a %s connection at shutdown failed", kind)
        return told
