"""A WebSocket session: reads messages, answers them, and writes queued replies and job events in order.

Replies and events go through one bounded queue drained by a writer greenlet, so a client sees them in the
order they happened and the stream reader never waits on a client. Every socket takes `submit_job` with the
job fields at the top level or under `data`; the legacy and client sockets differ in which job events they
are pushed (`LegacySession`, `ClientSession`); the monitor socket is in `ws_monitor`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
import redis

from appliance.api import auth, capacity, messages
from appliance.api.connections import Registry
from appliance.api.fanout import Entry, Hub, Raw, Subscriber, direct_result, size_of, valid_id, write_now
from appliance.api.limits import Limits, caller_of
from appliance.api.tasks import Tasks
from appliance.api.websocket import GOING_AWAY, POLICY, WebSocket, text_frame
from appliance.errors import ECHO_CHARS, JobFinished, JobNotFound, Overloaded, ValidationError, shown
from appliance.queue import Queue
from appliance.retry import is_outage
from appliance.settings import ApiSettings

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], None]
OVERFLOW_GRACE_S = 5.0
TRY_AGAIN_LATER = 1013    # close code: Redis is away when the socket opens (RFC 6455 registry)
WRITE_BATCH = 64           # queued messages sent in one socket write
JOB_ID_MAX = 64            # a job id a message may name (the API's are 36-character UUIDs)
_ENVELOPE = frozenset({"type", "id", "message_id", "timestamp", "data"})


def submission(message: dict[str, Any]) -> dict[str, Any]:
    """A submit_job message's job fields, at its top level (the client socket's shape) and/or under `data` (the
    legacy socket's), which wins. The message's own `type` is its kind, never the job's service; `type` under
    `data` is still read as the original's alias of service_required."""
    data = message.get("data")
    if data is not None and not isinstance(data, dict):
        raise ValidationError("data", "expected an object of job fields (service_required, priority, "
                                      "payload, ...), or send them at the top level of the message")
    return {**{k: v for k, v in message.items() if k not in _ENVELOPE}, **(data or {})}


@dataclass
class Live:
    """What every live connection of this process shares."""

    settings: ApiSettings
    queue: Queue
    hub: Hub
    registry: Registry
    tasks: Tasks = field(default_factory=Tasks)        # the process's background tasks (their health)
    limits: Limits = field(init=False)                  # submits: rate, body and payload limits

    def __post_init__(self) -> None:
        self.limits = Limits(self.settings)


class Session:
    """Base of the three socket kinds; subclasses add handlers and say how events are rendered."""

    kind = "legacy"
    identity = auth.OPEN      # who opened it (set from its API key at the handshake)
    remote_addr = ""          # the client's address (submits are counted per key, or per address without keys)

    def __init__(self, ws: WebSocket, live: Live, conn_id: str):
        self.ws = ws
        self.live = live
        self.id = conn_id
        self.sub = Subscriber(self.kind, live.settings.client_queue_size, self._overflow,
                              live.settings.client_queue_bytes)
        if ws.direct_ok:
            self.sub.direct = self._direct
        self.handlers: dict[str, Handler] = {}
        self._writer: gevent.Greenlet | None = None
        self._message_bytes: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------
    def run(self) -> None:
        """Serve the connection until it closes."""
        registry = self.live.registry
        registry.add(self)
        self._writer = gevent.spawn(self._write_loop)
        try:
            if registry.closing:
                self.ws.close(GOING_AWAY, "server restarting")
            else:
                try:
                    self.on_open()
                except redis.RedisError as exc:
                    if not is_outage(exc):
                        raise
                    log.warning("WebSocket %s closed at open: Redis is unavailable: %s", self.id, exc)
                    self.ws.close(TRY_AGAIN_LATER, "Redis is unavailable; try again later")
                    while self.ws.receive() is not None:  # until the peer answers the close (or a grace)
                        pass
                    return
            while True:
                message = self.ws.receive()
                if message is None:
                    break
                self.handle(message)
        finally:
            self.live.hub.leave(self.sub)
            registry.remove(self)
            self._writer.kill(block=False)

    def on_open(self) -> None:
        self.reply("connected", client_id=self.id)

    def shutdown(self) -> None:
        self.ws.close(GOING_AWAY, "server restarting; reconnect")

    def _overflow(self, reason: str) -> None:
        gevent.spawn(self._close_slow, reason)

    def _close_slow(self, reason: str) -> None:
        self.sub.offer(None)      # wakes the writer if it waits; ignored when the queue is full
        gevent.sleep(OVERFLOW_GRACE_S)
        if self.ws.open:
            self.ws.abort()

    # -- outgoing ------------------------------------------------------------------------------------------
    def reply(self, kind: str, **fields: Any) -> None:
        """Queue a message of `type` kind (a timestamp is added)."""
        self.push(messages.dumps({"type": kind, **fields, "timestamp": messages.now()}))

    def error(self, error: str, message: dict[str, Any] | None = None, **extra: Any) -> None:
        fields: dict[str, Any] = {"error": error, **extra}
        if message is not None and ("id" in message or "message_id" in message):
            fields["message_id"] = self.message_id(message)
        self.reply("error", **fields)

    def push(self, text: str) -> None:
        self.sub.offer(text)

    def _write_loop(self) -> None:
        """Send what is queued, in order; whatever piled up meanwhile goes out in one write."""
        queue = self.sub.queue
        events = self.live.queue.keys.events
        while True:
            self.sub.idle = not self.ws.busy
            items = [queue.get()]
            self.sub.idle = False
            while len(items) < WRITE_BATCH and not queue.empty():
                items.append(queue.get_nowait())
            if self.sub.overflowed:
                self.ws.close(POLICY, self.sub.overflowed)
                return
            out: list[bytes | memoryview] = []
            for item in items:
                if item is None:
                    continue
                if isinstance(item, str):
                    out.append(text_frame(item))
                    continue
                if isinstance(item, Raw):
                    out.append(item.data)
                    continue
                for entry in item if isinstance(item, list) else [item]:
                    try:
                        out.extend(entry.rendered(f"{self.kind}:{self.variant()}:frames", self._frames))
                    except Exception:     # one event this client cannot be sent: skip it, keep the socket
                        log.exception("a %s event of %s could not be rendered; skipped", self.kind, entry.stream)
                    if entry.event in messages.TERMINAL_EVENTS and entry.stream != events:
                        self.live.hub.leave(self.sub, entry.stream)
            sent = not out or self.ws.send_frame(b"".join(out))
            self.sub.release(sum(size_of(item) for item in items))
            if not sent:
                return

    def _direct(self, batch: list[Entry]) -> list[Entry] | Raw | None:
        """The reader's fast path (see fanout): frames written now if the socket takes them."""
        if self.ws.busy or not self.ws.open or batch[-1].event in messages.TERMINAL_EVENTS:
            return batch
        key = f"{self.kind}:{self.variant()}:frames"
        data = b"".join(frame for entry in batch for frame in entry.rendered(key, self._frames))
        if not data:
            return None
        try:
            written = write_now(self.ws.sock.fileno(), data)
        except OSError:
            return batch
        return direct_result(batch, data, written)

    def _frames(self, entry: Entry) -> list[bytes]:
        return [text_frame(text) for text in self.render(entry)]

    def variant(self) -> str:
        """What, beside the kind, changes how an event renders for this session (the monitor's filter)."""
        return ""

    def render(self, entry: Entry) -> list[str]:
        rendered: list[str] = entry.rendered(self.kind, messages.legacy)
        return rendered

    # -- incoming ------------------------------------------------------------------------------------------
    def handle(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            self.error("Binary frames are not supported; send JSON text messages")
            return
        try:
            message = self.live.limits.parse_json(raw, "message")
        except ValidationError as exc:
            if "API_MAX_JSON_DEPTH" in exc.message:
                self.error(str(exc), field=exc.field)
            else:
                self.error("Invalid message format: expected a JSON object with a \"type\"")
            return
        self._message_bytes = len(raw)
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self.error("Invalid message format: expected a JSON object with a \"type\"")
            return
        kind = message["type"]
        handler = self.handlers.get(kind)
        if handler is None:
            self.error(f"Unknown {self.kind} message type: {shown(kind)}", message,
                       supported=sorted(self.handlers))
            return
        try:
            handler(message)
        except ValidationError as exc:
            self.error(str(exc), message, field=exc.field)
        except JobNotFound as exc:
            self.error("Job not found", message, job_id=exc.job_id)
        except JobFinished as exc:
            self.error(str(exc), message, job_id=exc.job_id, status=exc.status)
        except capacity.QueueFull as exc:
            self.error(str(exc), message, retry_after_s=exc.retry_after_s)
        except Overloaded as exc:
            self.error(str(exc), message, retry_after_s=exc.retry_after_s)
        except redis.RedisError as exc:
            log.warning("Redis error on a %s WebSocket message %s: %s", self.kind, kind, exc)
            self.error("Redis is not reachable; the job queue is unavailable, retry later", message)
        except Exception:
            log.exception("unexpected error handling %s message %s", self.kind, kind)
            self.error(f"Internal error handling {kind}; see the api log", message)

    @staticmethod
    def job_id(message: dict[str, Any]) -> str:
        value = message.get("job_id")
        if not isinstance(value, str) or not value:
            raise ValidationError("job_id", "required: the id of the job")
        if len(value) > JOB_ID_MAX:
            raise ValidationError("job_id", f"expected a job id of at most {JOB_ID_MAX} characters, got "
                                            f"{shown(value)}")
        return value

    def message_id(self, message: dict[str, Any]) -> Any:
        """The message's id as replies echo it: a number, or text cut to ECHO_CHARS (never a whole input)."""
        value = message.get("id", message.get("message_id"))
        if value is None or isinstance(value, (bool, int, float)):
            return value
        text = value if isinstance(value, str) else shown(value)
        return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "…"

    # -- shared handlers -----------------------------------------------------------------------------------
    def on_submit_job(self, message: dict[str, Any]) -> None:
        self.submit(message)

    def submit(self, message: dict[str, Any]) -> str:
        """Check and store the job a submit_job message carries (nothing is stored if a check fails)."""
        limits = self.live.limits
        limits.admit_submit(caller_of(self.identity.name, self.remote_addr))
        spec = limits.submission(submission(message), submitted_by=self.identity.name,
                                 raw_size=self._message_bytes)
        job_id = capacity.submit(self.live.queue, spec)
        self.reply("job_submitted", job_id=job_id, message_id=self.message_id(message),
                   message="Job submitted successfully")
        return job_id

    def check_room(self) -> None:
        """Refuse following one more job on this connection beyond API_MAX_SUBSCRIPTIONS."""
        limit = self.live.settings.max_subscriptions
        if len(self.sub.streams) >= limit:
            raise ValidationError("job_id", f"this connection already follows {limit} jobs "
                                            "(API_MAX_SUBSCRIPTIONS); unsubscribe_progress from some first")

    def follow_job(self, job_id: str, after: str | None = None) -> None:
        """Queue the job's events so far, then its live events (until its terminal event)."""
        self.live.hub.join(self.sub, self.live.queue.keys.progress(job_id), after, self.sub.put)

    def on_subscribe_progress(self, message: dict[str, Any]) -> None:
        job_id = self.job_id(message)
        after = message.get("last_event_id")
        if after is not None and not (isinstance(after, str) and valid_id(after)):
            raise ValidationError("last_event_id", "expected a stream entry id such as 1700000000000-0")
        client, keys = self.live.hub.client, self.live.queue.keys
        status, submitted_by = client.hmget(keys.job(job_id), ["status", "submitted_by"])
        if status is None or not self.identity.sees(str(submitted_by or "")):
            raise JobNotFound(job_id)
        self.check_room()
        if after is not None:
            after = self.live.hub.clamp(keys.progress(job_id), after)
        self.reply("subscribed", job_id=job_id, message_id=self.message_id(message))
        if after is not None and status in messages.TERMINAL_EVENTS and \
                not client.xrange(keys.progress(job_id), f"({after}", "+", count=1):
            return  # resumed after the terminal event: nothing more will come, so do not follow
        self.follow_job(job_id, after)

    def on_unsubscribe_progress(self, message: dict[str, Any]) -> None:
        job_id = self.job_id(message)
        self.live.hub.leave(self.sub, self.live.queue.keys.progress(job_id))
        self.reply("unsubscribed", job_id=job_id, message_id=self.message_id(message))

    def on_get_job_status(self, message: dict[str, Any]) -> None:
        job_id = self.job_id(message)
        job = self.live.queue.get(job_id)
        if job is not None and not self.identity.sees(job.get("submitted_by", "")):
            job = None   # another key's job reads as one that does not exist
        self.reply("job_status", job_id=job_id, job=job, message_id=self.message_id(message))

    def on_cancel_job(self, message: dict[str, Any]) -> None:
        job_id = self.job_id(message)
        auth.require_visible(self.identity, self.live.queue, job_id)
        reason = message.get("reason") if isinstance(message.get("reason"), str) else "Job cancelled by user"
        outcome = self.live.queue.cancel(job_id, reason or "Job cancelled by user")
        text = ("Job cancelled" if outcome == "cancelled"
                else "Cancel requested; the worker running the job is stopping it")
        self.reply("job_cancelled", job_id=job_id, status=outcome, message=text,
                   message_id=self.message_id(message))

    def on_ping(self, message: dict[str, Any]) -> None:
        self.reply("pong", message_id=self.message_id(message))

    def common_handlers(self) -> dict[str, Handler]:
        return {"submit_job": self.on_submit_job, "subscribe_progress": self.on_subscribe_progress,
                "unsubscribe_progress": self.on_unsubscribe_progress,
                "get_job_status": self.on_get_job_status, "cancel_job": self.on_cancel_job,
                "ping": self.on_ping}


class LegacySession(Session):
    """Any path other than /ws/client and /ws/monitor: follows the jobs it subscribes to."""

    kind = "legacy"

    def __init__(self, ws: WebSocket, live: Live):
        super().__init__(ws, live, str(uuid.uuid4()))
        self.handlers = self.common_handlers()


class ClientSession(Session):
    """/ws/client/{client_id}: the jobs it submits push their events to it."""

    kind = "client"

    def __init__(self, ws: WebSocket, live: Live, client_id: str):
        super().__init__(ws, live, client_id)
        self.handlers = {"sync_job_state": self.on_get_job_status, **self.common_handlers()}

    def on_submit_job(self, message: dict[str, Any]) -> None:
        self.check_room()
        self.follow_job(self.submit(message))

    def render(self, entry: Entry) -> list[str]:
        rendered: list[str] = entry.rendered(self.kind, messages.client)
        return rendered
