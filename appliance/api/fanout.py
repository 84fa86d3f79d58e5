"""One reader per API process: follows every stream its clients watch and hands entries to per-client queues.

A single greenlet owns one blocking Redis connection and loops `XREAD BLOCK` over the set of followed streams
(plus this process's wake stream, written to when a new stream joins the set so the blocked read returns).
Each batch is handed to every subscriber of its stream with `put_nowait` into a bounded queue: the reader
never waits on a client. When a client's queue is empty and its connection is idle, the reader instead writes
the batch straight to the client's socket without blocking (what the socket does not take is queued), which
saves a greenlet wake-up per client and event. A subscriber whose queue is full has fallen too far behind and
is marked overflowed; its connection closes itself with that reason (an SSE client resumes with
Last-Event-ID). The queue is bounded in items and in bytes (API_CLIENT_QUEUE_SIZE, API_CLIENT_QUEUE_BYTES).

Nothing one entry or one client brings stops the reader: an error handling a stream's batch, or handing it to one
subscriber, is logged and that batch dropped (for that subscriber), and the reader goes on.

History reads of the same stream from the same point at the same time (a burst of clients following one job)
share one XRANGE and its Entry objects, renderings included, so a burst costs Redis one read per page.

Joining without a gap: a subscriber first reads the stream's history itself (XRANGE on a small pool), then
registers with the reader's cursor for that stream not ahead of what it has read. Registration runs without
yielding to other greenlets, so every entry after the reader's cursor reaches the subscriber through the
reader, and every entry up to it was in the history read; entries seen twice are dropped by id.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from typing import Any, cast

import gevent
import gevent.event
import gevent.queue
import redis

from appliance.api.tasks import TaskState
from appliance.errors import shown
from appliance.keys import Keys

log = logging.getLogger(__name__)

EntryId = tuple[int, int]
ENTRY_OVERHEAD = 64        # bytes counted per queued entry beyond its fields (ids, framing)
BLOCK_MS = 10_000
READ_COUNT = 500
HISTORY_PAGE = 500
CATCH_UP_ROUNDS = 20       # history re-reads while the reader keeps moving past them (a trimmed stream ends it)
_RETRY = object()


_ENTRY_ID = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?")
_U64_MAX = 2**64 - 1


def parse_id(entry_id: str) -> EntryId:
    """A stream entry id ("1700000000000-3") as a comparable tuple; raises ValueError unless Redis would
    accept it (digits only, each part below 2^64)."""
    match = _ENTRY_ID.fullmatch(entry_id)
    if not match:
        raise ValueError(f"not a stream entry id: {shown(entry_id)}")
    ms, seq = int(match.group(1)), int(match.group(2) or 0)
    if ms > _U64_MAX or seq > _U64_MAX:
        raise ValueError(f"stream entry id out of range: {shown(entry_id)}")
    return ms, seq


def valid_id(entry_id: str) -> bool:
    try:
        parse_id(entry_id)
    except ValueError:
        return False
    return True


class Entry:
    """One stream entry as read, shared by every subscriber; renderings are cached per client kind."""

    __slots__ = ("stream", "id", "key", "fields", "extra", "size", "_cache", "__weakref__")

    def __init__(self, stream: str, entry_id: str, fields: dict[str, str]):
        self.stream = stream
        self.id = entry_id
        self.key = parse_id(entry_id)
        self.fields = fields
        self.extra: dict[str, Any] = {}
        # about the bytes it takes queued for a client (its fields; a rendering is about as large)
        self.size = ENTRY_OVERHEAD + sum(len(name) + len(value) for name, value in fields.items())
        self._cache: dict[str, Any] = {}

    @property
    def event(self) -> str:
        return self.fields.get("event", "")

    @property
    def job_id(self) -> str:
        return self.fields.get("job_id", "")

    def rendered(self, kind: str, render: Callable[[Entry], Any]) -> Any:
        """`render(self)` computed once per kind for all subscribers of this entry."""
        try:
            return self._cache[kind]
        except KeyError:
            value = self._cache[kind] = render(self)
            return value


def write_now(fd: int, data: bytes) -> int:
    """Write to a non-blocking socket without waiting; the number of bytes it took (0: none now).

    Raises OSError when the connection is broken."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


def direct_result(batch: list[Entry], data: bytes, written: int) -> list[Entry] | Raw | None:
    if written == len(data):
        return None
    if written == 0:
        return batch
    return Raw(memoryview(data)[written:])   # a view: the rendering is shared by every client, never copied


class Raw:
    """Bytes a connection must write to its socket as they are (the rest of a direct write cut short)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | memoryview):
        self.data = data


# Direct write: given a batch, write it to the client's socket at once without waiting; returns None when all
# of it went out, or what must be queued instead (the batch itself, or the Raw rest of a partial write).
Direct = Callable[[list[Entry]], "list[Entry] | Raw | None"]


def size_of(item: Any) -> int:
    """About the bytes a queued item holds: a batch or an Entry by its fields, text and raw bytes by length."""
    if isinstance(item, list):
        return sum(entry.size for entry in item if isinstance(entry, Entry))
    if isinstance(item, Entry):
        return item.size
    if isinstance(item, str):
        return len(item)
    if isinstance(item, Raw):
        return len(item.data)
    return 0


class Subscriber:
    """A client's bounded inbox: one item per batch the reader hands out (a list of Entry), or an Entry, or
    whatever the connection itself queues (replies, control). Bounded twice: in items (`maxsize`; a burst of
    events read at once takes one place) and in bytes (`max_bytes`, counted from when an item is queued until the
    connection `release`s it, after writing it). A client that lets either pile up is too slow. One item larger
    than `max_bytes` is still taken into an empty queue (a message is bounded on its own)."""

    def __init__(self, kind: str, maxsize: int, on_overflow: Callable[[str], None] | None = None,
                 max_bytes: int = 2 * 1024 * 1024):
        self.kind = kind
        self.queue: gevent.queue.Queue[Any] = gevent.queue.Queue(maxsize)
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.last: dict[str, EntryId] = {}
        self.streams: set[str] = set()
        self.overflowed: str | None = None
        self.on_overflow = on_overflow
        self.direct: Direct | None = None
        self.idle = False            # set by the connection while it waits on an empty queue, not writing
        self._room = gevent.event.Event()

    def offer(self, item: Any) -> bool:
        """Queue `item` without waiting; a full queue (items or bytes) marks the subscriber as too slow."""
        if self.overflowed:
            return False
        size = size_of(item)
        if self.queued_bytes and self.queued_bytes + size > self.max_bytes:
            self._overflow(f"more than {self.max_bytes} bytes of messages waiting (API_CLIENT_QUEUE_BYTES)")
            return False
        try:
            self.queue.put_nowait(item)
        except gevent.queue.Full:
            self._overflow(f"more than {self.queue.maxsize} batches of messages waiting (API_CLIENT_QUEUE_SIZE)")
            return False
        self.queued_bytes += size
        return True

    def _overflow(self, what: str) -> None:
        self.overflowed = f"client too slow: {what}; reconnect (SSE: with Last-Event-ID) to resume"
        log.warning("closing a slow %s client: %s", self.kind, self.overflowed)
        self._room.set()
        if self.on_overflow is not None:
            self.on_overflow(self.overflowed)

    def put(self, item: Any, timeout_s: float = 10.0) -> None:
        """Queue `item`, waiting while the queue is full (history, read by the client's own greenlet); a
        client that takes nothing for `timeout_s` is too slow."""
        size = size_of(item)
        deadline = time.monotonic() + timeout_s
        while not self.overflowed and (self.queue.full() or
                                       (self.queued_bytes and self.queued_bytes + size > self.max_bytes)):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._room.clear()
            self._room.wait(min(left, 1.0))
        self.offer(item)

    def release(self, item_or_size: Any) -> None:
        """The connection has written an item it took (or that many bytes): they no longer count."""
        size = item_or_size if isinstance(item_or_size, int) else size_of(item_or_size)
        self.queued_bytes = max(0, self.queued_bytes - size)
        self._room.set()

    def fresh(self, entry: Entry) -> bool:
        """Whether `entry` is newer than what this subscriber already got from its stream (and mark it)."""
        seen = self.last.get(entry.stream)
        if seen is not None and entry.key <= seen:
            return False
        self.last[entry.stream] = entry.key
        return True


Enricher = Callable[[redis.Redis, list[Entry]], None]


class Hub(TaskState):
    """The per-process stream reader. `start()` spawns its greenlet; `stop()` ends it."""

    name = "stream reader"

    def __init__(self, blocking: redis.Redis, client: redis.Redis, keys: Keys,
                 enrichers: dict[str, Enricher] | None = None, block_ms: int = BLOCK_MS):
        self.blocking = blocking
        self.client = client
        self.keys = keys
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.wake_key = keys.fanout_wake(self.instance)
        self.enrichers = enrichers or {}
        self.block_ms = block_ms
        self.cursors: dict[str, str] = {}
        self.subscribers: dict[str, set[Subscriber]] = {}
        self.batches = 0
        self.entries = 0
        self._greenlet: gevent.Greenlet | None = None
        self._running = False
        self._wake_pending = False
        self._reads: dict[tuple[str, str | None, int], gevent.event.AsyncResult[Any]] = {}
        # every Entry some client still holds, by stream and id: a later read of the same entry (a client joining
        # late, the live read) shares it and its renderings instead of holding its own copy of a large event
        self._entries: weakref.WeakValueDictionary[tuple[str, str], Entry] = weakref.WeakValueDictionary()

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._greenlet is None:
            self._running = True
            self.spawn(self._loop)

    def stop(self) -> None:
        self._running = False
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
        try:
            self.client.delete(self.wake_key)
        except redis.RedisError:
            pass

    # -- subscriptions -------------------------------------------------------------------------------------
    def history(self, stream: str, after: str | None, count: int = HISTORY_PAGE) -> list[Entry]:
        """Entries of `stream` after `after` (all of them when None), oldest first, one page.

        Callers asking for the same page while it is being read wait for that read and share its entries."""
        key = (stream, after, count)
        while (pending := self._reads.get(key)) is not None:
            shared = pending.get()
            if shared is not _RETRY:
                return cast(list[Entry], shared)
        result: gevent.event.AsyncResult[Any] = gevent.event.AsyncResult()
        self._reads[key] = result
        try:
            start = "-" if after is None else f"({after}"
            raw: Any = self.client.xrange(stream, start, "+", count=count)
            entries = [self.entry(stream, entry_id, fields) for entry_id, fields in raw]
        except Exception as exc:
            result.set_exception(exc)
            raise
        except BaseException:
            result.set(_RETRY)            # this greenlet was killed (its client left): the others read again
            raise
        finally:
            del self._reads[key]
        result.set(entries)
        return entries

    def entry(self, stream: str, entry_id: str, fields: dict[str, str]) -> Entry:
        """The Entry for a stream entry just read: the one clients already hold if any, else a new one."""
        key = (stream, str(entry_id))
        found = self._entries.get(key)
        if found is None:
            found = self._entries[key] = Entry(stream, entry_id, fields)
        return found

    def last_id(self, stream: str) -> str:
        """The id of the newest entry of `stream` ("0-0" when it is empty or missing)."""
        newest = self.client.xrevrange(stream, "+", "-", count=1)
        return str(newest[0][0]) if newest else "0-0"

    def clamp(self, stream: str, after: str) -> str:
        """`after`, or the stream's newest entry id when `after` is beyond it (a client's Last-Event-ID)."""
        newest = self.last_id(stream)
        return newest if parse_id(after) > parse_id(newest) else after

    def join(self, sub: Subscriber, stream: str, after: str | None,
             deliver: Callable[[Entry], Any]) -> None:
        """Read `stream` after `after` (`deliver` gets each entry), then follow it live through `sub`'s queue.

        Loops until the history read has caught up with the reader's cursor, then registers without
        yielding in between, so no entry can fall into a gap. An `after` beyond the stream's newest entry (a
        client-chosen Last-Event-ID) counts as the newest entry: the reader's cursor, shared by every follower
        of the stream, never moves past what Redis holds.
        """
        if after is not None:
            after = self.clamp(stream, after)
        last = after
        rounds = 0
        while True:
            page = self.history(stream, last)
            for entry in page:
                if sub.fresh(entry):
                    deliver(entry)
                last = entry.id
            if len(page) == HISTORY_PAGE:
                continue
            cursor = self.cursors.get(stream)
            have = parse_id(last) if last is not None else (0, 0)
            rounds += 1
            if cursor is not None and parse_id(cursor) > have and rounds < CATCH_UP_ROUNDS:
                continue                    # the reader moved past what we read: read the rest first
            if last is not None:
                sub.last.setdefault(stream, have)
            self._register(sub, stream, last or "0-0")
            return

    def follow(self, sub: Subscriber, stream: str, after: str) -> None:
        """Follow `stream` live from entry id `after` (no history read: the caller took its own snapshot; `after`
        is an id the server read, never a client's)."""
        sub.last.setdefault(stream, parse_id(after))
        cursor = self.cursors.get(stream)
        if cursor is not None and parse_id(cursor) > parse_id(after):
            # catch up the part the reader already passed, then register (as in join)
            self.join(sub, stream, after, lambda entry: sub.offer(entry))
            return
        self._register(sub, stream, after)

    def _register(self, sub: Subscriber, stream: str, after: str) -> None:
        subs = self.subscribers.setdefault(stream, set())
        subs.add(sub)
        sub.streams.add(stream)
        if stream not in self.cursors:
            self.cursors[stream] = after
            self._wake()

    def leave(self, sub: Subscriber, stream: str | None = None) -> None:
        """Stop `sub` following `stream` (every stream when None)."""
        streams = [stream] if stream is not None else list(sub.streams | set(sub.last))
        for name in streams:
            sub.last.pop(name, None)
            sub.streams.discard(name)
            subs = self.subscribers.get(name)
            if subs is None:
                continue
            subs.discard(sub)
            if not subs:
                del self.subscribers[name]
                self.cursors.pop(name, None)

    def _wake(self) -> None:
        """Interrupt the blocked read so that it includes the new stream (one wake per read)."""
        if self._greenlet is None or self._wake_pending:
            return
        self._wake_pending = True
        gevent.spawn(self._send_wake)

    def _send_wake(self) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.xadd(self.wake_key, {"w": "1"}, maxlen=10, approximate=False)
            pipe.expire(self.wake_key, 3600)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("fan-out wake failed (new streams wait for the next read): %s", exc)

    # -- the reader ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        backoff = 0.1
        while self._running:
            self._wake_pending = False      # this read includes every stream registered so far
            streams: dict[Any, Any] = {**self.cursors, self.wake_key: "$"}
            try:
                reply = self.blocking.xread(streams, count=READ_COUNT, block=self.block_ms)
                backoff = 0.1
            except redis.RedisError as exc:
                log.warning("fan-out read failed, retrying in %.1f s: %s", backoff, exc)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception as exc:        # a reply it cannot read: note it, wait a little, go on
                self.note_error(exc)
                log.exception("fan-out read failed unexpectedly; retrying in %.1f s", backoff)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if reply:
                self._dispatch(reply)

    def _dispatch(self, reply: Iterable[Any]) -> None:
        for stream, raw in reply:
            if stream == self.wake_key or stream not in self.cursors:
                continue
            try:
                self._hand_out(stream, raw)
            except Exception as exc:        # one stream's batch must not stop the others, nor the reader
                self.note_error(exc)
                log.exception("fan-out: a batch of %s could not be handed out; it is dropped", stream)
                if stream in self.cursors and raw:
                    self.cursors[stream] = str(raw[-1][0])     # never read the same batch again

    def _hand_out(self, stream: str, raw: list[Any]) -> None:
        entries = [self.entry(stream, entry_id, fields) for entry_id, fields in raw]
        if not entries:
            return
        enrich = self.enrichers.get(stream)
        if enrich is not None:
            try:
                enrich(self.client, entries)
            except redis.RedisError as exc:
                log.warning("fan-out enrichment of %s failed: %s", stream, exc)
            except Exception as exc:
                self.note_error(exc)
                log.exception("fan-out enrichment of %s failed; the batch goes out without it", stream)
        # from here to the end nothing yields: cursor and hand-out move together
        if stream not in self.cursors:
            return
        self.cursors[stream] = entries[-1].id
        self.batches += 1
        self.entries += len(entries)
        first, last = entries[0].key, entries[-1].key
        for sub in list(self.subscribers.get(stream, ())):
            try:
                self._give(sub, stream, entries, first, last)
            except Exception as exc:        # one client's rendering or socket: drop its batch, go on
                self.note_error(exc)
                log.exception("fan-out: a %s client's batch of %s is dropped", sub.kind, stream)

    def _give(self, sub: Subscriber, stream: str, entries: list[Entry], first: EntryId, last: EntryId) -> None:
        seen = sub.last.get(stream)
        if seen is None or seen < first:         # the usual case: all of it is new to this client
            sub.last[stream] = last
            batch = entries
        else:
            batch = [entry for entry in entries if sub.fresh(entry)]
        if not batch:
            return
        item: Any = batch
        if sub.idle and sub.direct is not None and sub.queue.empty():
            # fast path: nothing pending and nobody writing, so write now (no wake-up per client)
            item = sub.direct(batch)
            if item is None:
                return
        if not sub.offer(item):
            self.leave(sub)
