"""Redis memory as the API sees it: submits stop at a soft limit below Redis's `maxmemory`.

The embedded Redis runs with `maxmemory` and `noeviction`: at its limit it refuses writes rather than drop
jobs. The API stops accepting submits earlier, at API_SUBMIT_MEMORY_PERCENT of maxmemory (read from
`INFO memory`, at most once a second per process), so that what is already queued can still run, report and
finish: the caller gets 503 "queue is full" with Retry-After. Redis's own OOM refusal of a submit reads the same.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

import falcon
import orjson
import redis

from appliance import clock
from appliance.errors import Overloaded
from appliance.jobs import JobSpec
from appliance.queue import Queue
from appliance.settings import SUBMIT_MEMORY_PERCENT

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5
CACHE_S = 1.0


class QueueFull(Overloaded):
    """Redis memory is at the submit limit: the job was not stored."""

    def __init__(self, used_percent: float | None = None):
        self.used_percent = used_percent
        where = f" (Redis memory at {used_percent:.0f}% of maxmemory)" if used_percent is not None else ""
        super().__init__(f"The queue is full{where}; nothing was stored. Retry in {RETRY_AFTER_S} s, once "
                         "jobs have finished or expired (REDIS_MAXMEMORY, API_SUBMIT_MEMORY_PERCENT)",
                         RETRY_AFTER_S)


@dataclass(frozen=True)
class Memory:
    used_bytes: int
    max_bytes: int          # 0: no maxmemory (no soft limit either)
    limit_percent: int

    @property
    def used_percent(self) -> float | None:
        return 100.0 * self.used_bytes / self.max_bytes if self.max_bytes else None

    @property
    def full(self) -> bool:
        percent = self.used_percent
        return percent is not None and percent >= self.limit_percent

    def public(self) -> dict[str, Any]:
        percent = self.used_percent
        return {"used_bytes": self.used_bytes, "maxmemory_bytes": self.max_bytes,
                "used_percent": None if percent is None else round(percent, 1),
                "submit_limit_percent": self.limit_percent, "accepting_submits": not self.full}


class MemoryGate:
    """Redis's memory use, cached for CACHE_S, against the submit limit."""

    def __init__(self, client: redis.Redis, limit_percent: int = SUBMIT_MEMORY_PERCENT):
        self.client = client
        self.limit_percent = limit_percent
        self._memory: Memory | None = None
        self._read_at = 0.0

    def memory(self) -> Memory:
        now = time.monotonic()
        if self._memory is None or now - self._read_at >= CACHE_S:
            try:
                info: Any = self.client.info("memory")
            except redis.ResponseError as exc:   # an ACL user without INFO: no soft limit (Redis's OOM still maps)
                if self._memory is None:
                    log.warning("cannot read Redis memory (%s): no submit limit below maxmemory", exc)
                info = {}
            self._memory = Memory(int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)),
                                  self.limit_percent)
            self._read_at = now
        return self._memory

    def check(self) -> None:
        memory = self.memory()
        if memory.full:
            raise QueueFull(memory.used_percent)


_gates: weakref.WeakKeyDictionary[Queue, MemoryGate] = weakref.WeakKeyDictionary()


def attach(queue: Queue, limit_percent: int) -> MemoryGate:
    """The gate of this queue client (one per API process), with the process's limit."""
    gate = _gates.get(queue)
    if gate is None:
        gate = _gates[queue] = MemoryGate(queue.client, limit_percent)
    gate.limit_percent = limit_percent
    return gate


def gate(queue: Queue) -> MemoryGate:
    return _gates.get(queue) or attach(queue, SUBMIT_MEMORY_PERCENT)


def is_oom(exc: BaseException) -> bool:
    """Redis refused a write at maxmemory (directly, or inside a script on Redis 6.2)."""
    return isinstance(exc, redis.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and "OOM command not allowed" in str(exc))


def submit(queue: Queue, spec: JobSpec) -> str:
    """Queue.submit behind the memory gate; QueueFull when memory is at the limit or Redis refuses (OOM)."""
    gate(queue).check()
    try:
        return queue.submit(spec)
    except redis.ResponseError as exc:
        if is_oom(exc):
            raise QueueFull() from exc
        raise
    except redis.TimeoutError:
        # the reply was slow, not necessarily the submit: Redis runs the script whole, so a read behind it tells
        # whether the job was stored (a stored job must never be answered as a failure)
        if stored(queue, spec.id):
            log.warning("submit of job %s answered slowly by Redis; it was stored", spec.id)
            return spec.id
        raise


def stored(queue: Queue, job_id: str, tries: int = 3) -> bool:
    """Whether the job exists, asked again while Redis is still too slow to answer."""
    for attempt in range(tries):
        try:
            return bool(queue.client.exists(queue.keys.job(job_id)))
        except redis.TimeoutError:
            if attempt == tries - 1:
                raise
    return False


def handle_full(req: falcon.Request, resp: falcon.Response, exc: QueueFull, params: Any) -> None:
    """Falcon error handler: 503 with Retry-After and the envelope."""
    resp.status = falcon.HTTP_503
    resp.content_type = falcon.MEDIA_JSON
    resp.set_header("Retry-After", str(exc.retry_after_s))
    resp.data = orjson.dumps({"success": False, "error": str(exc), "retry_after_s": exc.retry_after_s,
                              "timestamp": clock.iso(clock.now_ms())})
