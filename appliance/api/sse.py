"""GET /api/jobs/{job_id}/progress: a job's events as Server-Sent Events.

A `connected` frame, then every event of the job so far (or those after `Last-Event-ID`), then live events,
until the terminal event, after which the stream ends. Each event frame carries `id:` (its stream entry id)
and `event:` (its name). A keep-alive comment goes out whenever nothing else did for the keep-alive interval.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Generator, Iterator
from typing import Any

import falcon
import gevent
import gevent.queue

from appliance import clock
from appliance.api import messages
from appliance.api.fanout import Entry, Raw, Subscriber, direct_result, valid_id, write_now
from appliance.api.ws_session import OVERFLOW_GRACE_S, WRITE_BATCH, Live
from appliance.errors import JobNotFound, Overloaded, ValidationError, shown

log = logging.getLogger(__name__)

RETRY_MS = 3000
SHARED_BYTES = 65536        # an event this large is written from its shared rendering; smaller ones are joined
CONNECTIONS_RETRY_S = 5     # Retry-After when the process's stream connections are at their limit
_SHUTDOWN = "shutdown"


class SseConnection:
    """One open event stream (registered for connection stats and graceful shutdown)."""

    kind = "sse"

    def __init__(self, live: Live, job_id: str, env: dict[str, Any]):
        self.id = str(uuid.uuid4())
        self.job_id = job_id
        self.live = live
        self.env = env
        self.done = False
        self.sub = Subscriber("sse", live.settings.client_queue_size, self._overflow,
                              live.settings.client_queue_bytes)
        sock = env.get("gunicorn.socket")
        # gunicorn frames a streamed HTTP/1.1 response in chunks; a plain socket can take direct writes
        if (sock is not None and type(sock).__name__ == "socket" and env.get("wsgi.url_scheme") == "http"
                and env.get("SERVER_PROTOCOL") == "HTTP/1.1"):
            self.sock = sock
            self.sub.direct = self._direct
        else:
            self.sock = None

    def _direct(self, batch: list[Entry]) -> list[Entry] | Raw | None:
        if self.sock is None or batch[-1].event in messages.TERMINAL_EVENTS:
            return batch                     # the stream ends after it: leave that to the generator
        if len(batch) == 1:
            data = batch[0].rendered("sse-chunk", _chunk_of)
        else:
            data = _chunk(b"".join(entry.rendered("sse", messages.sse_frame) for entry in batch))
        try:
            written = write_now(self.sock.fileno(), data)
        except OSError:
            return batch
        return direct_result(batch, data, written)

    def shutdown(self) -> None:
        try:
            self.sub.queue.put_nowait(_SHUTDOWN)
        except gevent.queue.Full:
            pass

    def _overflow(self, reason: str) -> None:
        gevent.spawn(self._close_slow)

    def _close_slow(self) -> None:
        gevent.sleep(OVERFLOW_GRACE_S)
        sock = self.env.get("gunicorn.socket")
        if not self.done and sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def frames(self, after: str | None) -> Iterator[bytes]:
        """The response body. With a plain HTTP/1.1 socket (`self.sock`), events go straight to it as chunks
        that every client of an event shares (no per-client copy, as gunicorn's chunked write would make);
        else they are yielded to gunicorn. Either way, what is being written counts in the client's queued
        bytes until it is out, so a client that reads nothing holds at most API_CLIENT_QUEUE_BYTES (or one
        event) and is closed as too slow when more comes."""
        live, sub = self.live, self.sub
        live.registry.add(self)
        stream = live.queue.keys.progress(self.job_id)
        try:
            yield b"retry: %d\n" % RETRY_MS + messages.sse_named("connected", {
                "type": "connected", "job_id": self.job_id, "client_id": self.id, "resumed_after": after,
                "timestamp": clock.iso(clock.now_ms())})
            history: list[Entry] = []
            live.hub.join(sub, stream, after, history.append)
            ends = [i for i, entry in enumerate(history) if entry.event in messages.TERMINAL_EVENTS]
            ended = bool(ends)
            if ended:
                history = history[:ends[0] + 1]
            if history:
                for piece in self._pieces(history):
                    if not (yield from self._out(piece)):
                        return
                if ended:
                    return
            elif after is not None and live.queue.client.hget(live.queue.keys.job(self.job_id), "status") in \
                    messages.TERMINAL_EVENTS:
                return  # resumed after the terminal event (EventSource reconnects so): nothing more will come
            del history
            keepalive = live.settings.sse_keepalive_s
            while True:
                sub.idle = True
                try:
                    item = sub.queue.get(timeout=keepalive)
                except gevent.queue.Empty:
                    sub.idle = False
                    yield messages.sse_comment("keepalive")
                    continue
                sub.idle = False
                if sub.overflowed:
                    yield messages.sse_named("error", {"type": "error", "error": sub.overflowed,
                                                       "timestamp": clock.iso(clock.now_ms())})
                    return
                if item == _SHUTDOWN:
                    yield messages.sse_named("shutdown", {
                        "type": "shutdown", "message": "server restarting; reconnect with Last-Event-ID",
                        "timestamp": clock.iso(clock.now_ms())})
                    return
                if isinstance(item, Raw):
                    sent = self._send(item.data, counted=True)
                    sub.release(item)
                    if not sent:
                        return
                    continue
                entries, taken, done = self._drain(item)
                for queued in taken:         # from here they count as what is being written (once)
                    sub.release(queued)
                del taken, item
                for piece in self._pieces(entries):
                    if not (yield from self._out(piece)):
                        return
                del entries
                if done:
                    return
        finally:
            self.done = True
            live.hub.leave(sub)
            live.registry.remove(self)

    def _out(self, data: bytes) -> Generator[bytes, None, bool]:
        """Write `data` (counted in the queued bytes while it goes out): straight to the socket as a chunk, or
        yielded to gunicorn. Returns False when the connection is gone."""
        if self.sock is not None:
            return self._send(data)
        self.sub.queued_bytes += len(data)
        try:
            yield data
        finally:
            self.sub.release(len(data))
        return True

    def _send(self, data: bytes | memoryview, counted: bool = False) -> bool:
        """Write already chunk-framed bytes to the socket (not through gunicorn), counting them meanwhile unless
        they already are (a queued Raw rest)."""
        assert self.sock is not None
        if not counted:
            self.sub.queued_bytes += len(data)
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False
        finally:
            if not counted:
                self.sub.release(len(data))

    def _pieces(self, entries: list[Entry]) -> Iterator[bytes]:
        """What to write for `entries`: small frames joined up to SHARED_BYTES, a larger event as its own shared
        rendering (a chunk when writing to the socket, the frame when yielding to gunicorn)."""
        kind, render = ("sse-chunk", _chunk_of) if self.sock is not None else ("sse", messages.sse_frame)
        group: list[bytes] = []
        size = 0
        for entry in entries:
            frame = entry.rendered("sse", messages.sse_frame)
            if len(frame) >= SHARED_BYTES:
                if group:
                    yield self._joined(group)
                    group, size = [], 0
                yield entry.rendered(kind, render)
                continue
            group.append(frame)
            size += len(frame)
            if size >= SHARED_BYTES:
                yield self._joined(group)
                group, size = [], 0
        if group:
            yield self._joined(group)

    def _joined(self, frames: list[bytes]) -> bytes:
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        return _chunk(data) if self.sock is not None else data

    def _drain(self, first: Any) -> tuple[list[Entry], list[Any], bool]:
        """`first` and the events queued behind it, for one write: their entries (up to the terminal event),
        the queued items taken (released once written), and whether the terminal event is in."""
        out: list[Entry] = []
        taken = [first]
        queue = self.sub.queue
        item = first
        for _ in range(WRITE_BATCH):
            entries = item if isinstance(item, list) else [item] if isinstance(item, Entry) else []
            for entry in entries:
                out.append(entry)
                if entry.event in messages.TERMINAL_EVENTS:
                    return out, taken, True
            if queue.empty() or not isinstance(queue.peek_nowait(), (list, Entry)):
                break
            item = queue.get_nowait()
            taken.append(item)
        return out, taken, False


def _chunk(payload: bytes) -> bytes:
    """`payload` as one HTTP/1.1 chunk, as gunicorn writes each yielded piece of a streamed response."""
    return b"%X\r\n%s\r\n" % (len(payload), payload)


def _chunk_of(entry: Entry) -> bytes:
    return _chunk(entry.rendered("sse", messages.sse_frame))


class JobProgress:
    """GET /api/jobs/{job_id}/progress (SSE)."""

    def __init__(self, live: Live):
        self.live = live

    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        after = req.get_header("Last-Event-ID") or req.get_param("last_event_id")
        if after is not None and not valid_id(after):
            raise ValidationError("Last-Event-ID", f"expected a stream entry id such as 1700000000000-0, got "
                                                   f"{shown(after)}")
        keys = self.live.queue.keys
        pipe = self.live.hub.client.pipeline(transaction=False)    # the small pool: no growth with clients
        pipe.exists(keys.job(job_id))
        pipe.exists(keys.progress(job_id))
        if not any(pipe.execute()):
            raise JobNotFound(job_id)
        if self.live.registry.closing:
            raise falcon.HTTPServiceUnavailable(description="The API is restarting; retry in a moment")
        limit = self.live.settings.max_sse_connections
        if len(self.live.registry.open["sse"]) >= limit:
            raise Overloaded(f"This API process already serves {limit} event streams (API_MAX_SSE_CONNECTIONS); "
                             f"retry in {CONNECTIONS_RETRY_S} s", CONNECTIONS_RETRY_S)
        resp.content_type = "text/event-stream"
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")
        resp.stream = SseConnection(self.live, job_id, req.env).frames(after)
