"""The monitor socket /ws/monitor/{monitor_id}, and the per-process ticker that pushes statistics to monitors.

A monitor follows the appliance-wide `events` stream from the moment it connects. Until it sends
`monitor_connect` or `subscribe` (what the Next.js monitor does first) it is treated as a hub-era monitor
(the simple monitor, which never sends anything): it gets `stats_broadcast` about every second and events
under the hub's names. After `monitor_connect` it gets the Next.js monitor's event names, filtered by topic,
and `system_stats` every few seconds.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from appliance.api import messages, monitor
from appliance.api.fanout import Entry
from appliance.api.periodic import Periodic
from appliance.api.websocket import WebSocket
from appliance.api.ws_session import Live, Session
from appliance.errors import ValidationError

log = logging.getLogger(__name__)

RESYNC_MAX = 1000
MAX_TOPICS, TOPIC_CHARS = 64, 64


class MonitorSession(Session):
    kind = "monitor"

    def __init__(self, ws: WebSocket, live: Live, monitor_id: str):
        super().__init__(ws, live, monitor_id)
        self.dialect = "hub"
        self.topics: frozenset[str] = frozenset()
        self.handlers = {
            "monitor_connect": self.on_monitor_connect, "subscribe": self.on_subscribe,
            "heartbeat": self.on_heartbeat, "subscribe_stats": self.on_subscribe_stats,
            "request_stats": self.on_request_stats, "resync_request": self.on_resync_request,
            **self.common_handlers(),
        }

    def on_open(self) -> None:
        self.reply("connected", monitor_id=self.id)
        hub = self.live.hub
        events = self.live.queue.keys.events
        hub.follow(self.sub, events, hub.last_id(events))

    def variant(self) -> str:
        return f"{self.dialect}:{','.join(sorted(self.topics))}"

    def render(self, entry: Entry) -> list[str]:
        if entry.stream != self.live.queue.keys.events:
            return super().render(entry)          # a job this monitor subscribed to with subscribe_progress
        if self.dialect == "hub":
            pairs: list[tuple[str, str]] = entry.rendered("hub", messages.hub)
        else:
            pairs = entry.rendered("monitor", messages.monitor)
        return [text for kind, text in pairs if messages.topic_match(kind, self.topics)]

    def on_monitor_connect(self, message: dict[str, Any]) -> None:
        self.dialect = "monitor"
        self.reply("monitor_connected", monitor_id=self.id)
        if message.get("request_full_state", True):
            self.reply("full_state_snapshot", monitor_id=self.id, data=monitor.snapshot(self.live.queue))

    def on_subscribe(self, message: dict[str, Any]) -> None:
        topics = message.get("topics", [])
        if not isinstance(topics, list) or not all(isinstance(t, str) and len(t) <= TOPIC_CHARS for t in topics) \
                or len(topics) > MAX_TOPICS:
            raise ValidationError("topics", f"expected a list of at most {MAX_TOPICS} topic names of at most "
                                            f"{TOPIC_CHARS} characters, e.g. [\"jobs\", \"workers\"]")
        self.dialect = "monitor"
        self.topics = frozenset(topics)
        self.reply("subscribed", monitor_id=self.id, topics=sorted(self.topics))

    def on_heartbeat(self, message: dict[str, Any]) -> None:
        self.reply("heartbeat_ack", monitor_id=self.id)

    def on_subscribe_stats(self, message: dict[str, Any]) -> None:
        self.dialect = "hub"
        self.push(messages.dumps(monitor.stats_broadcast(self.live.queue, self.connection_ids())))

    def on_request_stats(self, message: dict[str, Any]) -> None:
        body = monitor.stats_broadcast(self.live.queue, self.connection_ids())
        body["type"] = "response_stats"
        body["message_id"] = self.message_id(message)
        self.push(messages.dumps(body))

    def on_resync_request(self, message: dict[str, Any]) -> None:
        since = message.get("since_timestamp", 0)
        limit = message.get("max_events", 100)
        if isinstance(since, bool) or not isinstance(since, (int, float)) or not 0 <= since < 2**63:
            raise ValidationError("since_timestamp", "expected epoch milliseconds")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= RESYNC_MAX:
            raise ValidationError("max_events", f"expected an integer from 1 to {RESYNC_MAX}")
        events = self.live.queue.keys.events
        raw: Any = self.live.hub.client.xrange(events, int(since), "+", count=limit + 1)
        entries = [Entry(events, entry_id, fields) for entry_id, fields in raw]
        out: list[Any] = []
        for entry in entries[:limit]:
            out.extend(orjson.loads(text) for _, text in messages.monitor(entry))
        oldest: Any = self.live.hub.client.xrange(events, "-", "+", count=1)
        self.reply("resync_response", monitor_id=self.id, events=out, has_more=len(entries) > limit,
                   oldest_available_timestamp=int(oldest[0][0].split("-")[0]) if oldest else None)

    def connection_ids(self) -> dict[str, list[str]]:
        registry = self.live.registry
        return {"client": registry.ids("client"), "monitor": registry.ids("monitor")}


class StatsTicker(Periodic):
    """Pushes `stats_broadcast` (hub-era monitors, every interval) and `system_stats` (others, every 5th)."""

    name = "monitor statistics"

    def __init__(self, live: Live, interval_s: float = 1.0):
        super().__init__(interval_s)
        self.live = live

    def tick(self, tick: int) -> None:
        sessions = [s for s in self.live.registry.of_kind("monitor") if isinstance(s, MonitorSession)]
        hub_era = [s for s in sessions if s.dialect == "hub"]
        if hub_era:
            registry = self.live.registry
            ids = {"client": registry.ids("client"), "monitor": registry.ids("monitor")}
            text = messages.dumps(monitor.stats_broadcast(self.live.queue, ids))
            for session in hub_era:
                session.push(text)
        others = [s for s in sessions
                  if s.dialect == "monitor" and messages.topic_match("system_stats", s.topics)]
        if others and tick % 5 == 0:
            text = messages.dumps({"type": "system_stats", "stats": monitor.system_stats(self.live.queue),
                                   "timestamp": messages.now()})
            for session in others:
                session.push(text)
