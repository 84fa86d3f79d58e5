"""Requirement classes in Redis, and which claim queues a worker serves.

A job's submit records its class (appliance/lua/submit_job.lua); `ClassBook` lists the classes of some
services, forgets those left idle and empty (`forget_idle`), and moves a class's jobs to `unworkable` (and back)
as registered workers come and go, and likewise the jobs of a service no worker offers (`sweep_services`).
`ClaimPlanner` is the worker's
side: from its capabilities and latest telemetry it works out, in Python, the claim queues it can serve, and
caches them until a new class appears, its telemetry changes or a while has passed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, cast

import orjson
import redis

from appliance import clock
from appliance.errors import Overloaded, shown
from appliance.keys import Keys
from appliance.matching import RequirementClass, class_id, clip_reason, mismatch
from appliance.scripts import OFFERED_WINDOW_MS, Scripts

log = logging.getLogger(__name__)
WORKERS_CACHE_S = 1.0
REFRESH_S = 15.0


CLASS_IDLE_S = 600  # a class nobody submitted to for this long, with no job left, is forgotten
CLASS_RETRY_S = 60  # Retry-After when a service has as many classes as allowed


class ClassBook:
    """Requirement classes and their unworkable jobs, over one Redis client."""

    def __init__(self, client: redis.Redis, keys: Keys, scripts: Scripts):
        self.client = client
        self.keys = keys
        self.scripts = scripts
        self.max_per_service = 0      # classes one service may have (0: no cap); the API sets its setting
        self._workers: dict[str, dict[str, Any]] = {}
        self._workers_at = -WORKERS_CACHE_S
        self._named: frozenset[str] = frozenset()

    def for_job(self, service: str, requirements: dict[str, Any],
                customer_id: str) -> RequirementClass | None:
        """The class of a job with these canonical requirements; None for its service's plain queue.

        The customer is part of the class only if a registered worker names it (in its allowed or denied
        customers): for any other customer every worker decides alike (a worker with allowed customers cannot
        take it, others can), as for a job without one, so a customer id alone makes no new claim queue and
        classes do not grow with customers. (A worker that starts naming a customer applies to the jobs submitted
        from then on, within a second.)

        Raises:
            Overloaded: the job would make a new class for a service that has `max_per_service` already.
        """
        customer = customer_id if customer_id and customer_id in self.named_customers() else ""
        cid = class_id(service, requirements, customer)
        if cid is None:
            return None
        if self.max_per_service:
            self._admit(service, cid)
        queue = self.keys.pending_class(service, cid)
        return RequirementClass(cid, service, requirements, customer, queue)

    def named_customers(self) -> frozenset[str]:
        """Customers some registered worker allows or denies by name (from its capabilities, cached briefly)."""
        self.registered_workers(cached=True)
        return self._named

    def _admit(self, service: str, cid: str) -> None:
        """Refuse a new class beyond `max_per_service` (checked before the submit: concurrent submits of new
        classes can pass it by a few)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.sismember(self.keys.requirement_classes(service), cid)
        pipe.scard(self.keys.requirement_classes(service))
        known, count = pipe.execute()
        if not known and int(count) >= self.max_per_service:
            raise Overloaded(
                f"Service {shown(service)} already has {count} requirement classes, the most allowed "
                "(API_MAX_CLASSES_PER_SERVICE): submit with the requirements of jobs already waiting, or retry "
                f"once idle classes are forgotten ({CLASS_IDLE_S // 60} minutes after their last job)",
                CLASS_RETRY_S)

    def version(self) -> int:
        return int(self.client.get(self.keys.classes_version) or 0)

    def forget_idle(self, idle_s: float = CLASS_IDLE_S) -> int:
        """Forget classes nobody submitted to for `idle_s` whose jobs are all gone; returns how many."""
        forgotten = self.scripts.prune_classes(int(idle_s * 1000))
        if forgotten:
            log.info("requirement classes forgotten (idle %ds, no job left): %d", idle_s, forgotten)
        return forgotten

    def load(self, services: list[str] | tuple[str, ...]) -> list[RequirementClass]:
        """Every recorded class of these services."""
        pipe = self.client.pipeline(transaction=False)
        for service in services:
            pipe.smembers(self.keys.requirement_classes(service))
        ids = sorted({cid for members in pipe.execute() for cid in members})
        if not ids:
            return []
        # connect() decodes replies, so redis-py's `bytes | str` values are str here
        records = cast(list[str | None], self.client.mget([self.keys.requirement_class(cid) for cid in ids]))
        return [RequirementClass.from_record(text) for text in records if text]

    # -- unworkable ---------------------------------------------------------------------------------------
    def mark_unworkable(self, job_class: RequirementClass, reason: str) -> int:
        """Move the class's pending jobs out of line as `unworkable`; returns how many."""
        reason = clip_reason(reason)
        total = self.scripts.mark_unworkable(job_class.queue, self.keys.unworkable_class(job_class.id), reason)
        if total:
            log.warning("jobs unworkable class=%s service=%s count=%d reason=%s", job_class.id,
                        job_class.service, total, reason)
        return total

    def revive(self, job_class: RequirementClass, message: str) -> int:
        """Put the class's unworkable jobs back in line; returns how many."""
        total = self.scripts.revive_unworkable(self.keys.unworkable_class(job_class.id), message)
        if total:
            log.info("unworkable jobs back in line class=%s count=%d: %s", job_class.id, total, message)
        return total

    def sweep_services(self, now_ms: int | None = None) -> tuple[int, int]:
        """Jobs of services no registered worker offered within OFFERED_WINDOW_MS leave the line as
        `unworkable` (those submitted since are marked by submit_job itself); those of services offered again
        go back (registers and heartbeats do this too; this catches what they left). Returns (marked, revived).
        """
        k = self.keys
        now = clock.now_ms() if now_ms is None else now_ms
        pipe = self.client.pipeline(transaction=False)
        pipe.smembers(k.services)
        pipe.zrangebyscore(k.services_offered, now - OFFERED_WINDOW_MS, "+inf")
        known, offered = pipe.execute()
        # with no service offered at all (no worker lately) nothing is judged: see `unoffered` in _lib.lua
        unoffered = sorted(set(known) - set(offered)) if offered else []
        for service in unoffered:
            pipe.smembers(k.requirement_classes(service))
        queues = {service: [k.pending_service(service), *(k.pending_class(service, cid) for cid in sorted(ids))]
                  for service, ids in zip(unoffered, pipe.execute(), strict=True)}
        served = sorted(set(known) & set(offered))
        for service in unoffered:
            for queue in queues[service]:
                pipe.zcard(queue)
        for service in served:
            pipe.zcard(k.unoffered(service))
        if unoffered:  # a note on why a service's jobs wait is void once it is not offered at all
            pipe.hdel(k.services_unhealthy, *unoffered)
        sizes = iter(pipe.execute())
        marked = revived = 0
        for service in unoffered:
            count = 0
            for queue in queues[service]:
                if next(sizes):
                    count += self.scripts.mark_unworkable(queue, k.unoffered(service), "",
                                                          unoffered_service=service, now_ms=now)
            if count:
                log.warning("jobs unworkable service=%s count=%d: no registered worker offered it for %ds",
                            service, count, OFFERED_WINDOW_MS // 1000)
            marked += count
        for service in served:
            if next(sizes):
                count = self.scripts.revive_unworkable(k.unoffered(service),
                                                       f"a worker offers service '{service}' again", now)
                log.info("unworkable jobs back in line service=%s count=%d", service, count)
                revived += count
        return marked, revived

    def registered_workers(self, cached: bool = False) -> dict[str, dict[str, Any]]:
        """Capabilities of every registered worker (by id)."""
        now = time.monotonic()
        if cached and now - self._workers_at < WORKERS_CACHE_S:
            return self._workers
        ids = sorted(cast(set[str], self.client.smembers(self.keys.workers_active)))
        pipe = self.client.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hget(self.keys.worker(worker_id), "capabilities")
        workers: dict[str, dict[str, Any]] = {}
        for worker_id, text in zip(ids, pipe.execute(), strict=False):
            try:
                caps = orjson.loads(text) if text else None
            except orjson.JSONDecodeError:
                caps = None
            if isinstance(caps, dict):
                workers[worker_id] = caps
        self._workers, self._workers_at = workers, now
        self._named = frozenset(
            str(name) for caps in workers.values() if isinstance(caps.get("customer_access"), dict)
            for group in ("allowed_customers", "denied_customers")
            for name in (caps["customer_access"].get(group) or []))
        return workers

    @staticmethod
    def judge(job_class: RequirementClass, workers: dict[str, dict[str, Any]]) -> str | None:
        """Why no registered worker could ever serve the class; None if one can, or none registered offers its
        service (whether its service is offered is judged on its own, with a window that spans restarts:
        `sweep_services` and submit_job.lua)."""
        workers = {w: caps for w, caps in workers.items() if job_class.service in (caps.get("services") or [])}
        if not workers:
            return None
        reasons = []
        for worker_id, caps in sorted(workers.items()):
            reason = mismatch(job_class.service, job_class.requirements, job_class.customer_id, caps)
            if reason is None:
                return None
            reasons.append(f"{worker_id}: {reason}")
        return clip_reason(f"no registered worker can serve these requirements ({'; '.join(reasons)})")

    def check_submitted(self, job_class: RequirementClass) -> str | None:
        """After a submit: mark the class's jobs unworkable if no registered worker can serve it."""
        reason = self.judge(job_class, self.registered_workers(cached=True))
        if reason is not None:
            self.mark_unworkable(job_class, reason)
        return reason

    def sweep(self, classes: list[RequirementClass], servable: set[str]) -> tuple[int, int]:
        """Revive the unworkable jobs of `servable` classes; mark the classes nobody can serve unworkable.

        Returns (marked, revived).
        """
        pipe = self.client.pipeline(transaction=False)
        for job_class in classes:
            pipe.zcard(self.keys.unworkable_class(job_class.id))
        waiting = dict(zip((c.id for c in classes), pipe.execute(), strict=False))
        marked = revived = 0
        workers: dict[str, dict[str, Any]] | None = None
        for job_class in classes:
            if job_class.id in servable:
                if waiting.get(job_class.id):
                    revived += self.revive(job_class, "a worker that can serve its requirements registered")
                continue
            if workers is None:
                workers = self.registered_workers()
            reason = self.judge(job_class, workers)
            if reason is not None:
                marked += self.mark_unworkable(job_class, reason)
            elif waiting.get(job_class.id):
                revived += self.revive(job_class, "a worker that can serve its requirements registered")
        return marked, revived


class ClaimPlanner:
    """A worker's claim queues: its services' plain queues and the requirement classes it can serve."""

    def __init__(self, book: ClassBook, refresh_s: float = REFRESH_S):
        self.book = book
        self.refresh_s = refresh_s
        self._key: tuple[Any, ...] | None = None
        self._at = 0.0
        self._queues: list[str] = []
        self._version: int | None = None

    def observe(self, version: int) -> bool:
        """Note the class version a claim reported; True if it changed (the queues are planned again)."""
        if version == self._version:
            return False
        self._version = version
        return True

    def queues(self, services: list[str], capabilities: Callable[[], dict[str, Any]],
               telemetry: dict[str, Any] | None) -> list[str]:
        """The claim queues to read now; refreshed on a new class, new telemetry, or after `refresh_s`."""
        now = time.monotonic()
        if self._version is None:  # before the first claim reports it
            self._version = self.book.version()
        key = (self._version, tuple(services), id(telemetry))
        if key == self._key and now - self._at < self.refresh_s:
            return self._queues
        caps = capabilities()
        keys = self.book.keys
        queues = [keys.pending_service(s) for s in services if mismatch(s, {}, "", caps, telemetry) is None]
        classes = self.book.load(caps.get("services") or services)
        ever = {c.id for c in classes if mismatch(c.service, c.requirements, c.customer_id, caps) is None}
        now_ok = [c for c in classes if c.service in services and c.id in ever
                  and mismatch(c.service, c.requirements, c.customer_id, caps, telemetry) is None]
        queues += [c.queue for c in now_ok]
        try:
            self.book.sweep(classes, ever)
        except redis.RedisError as exc:
            log.warning("unworkable sweep skipped: %s", exc)
        self._key, self._at, self._queues = key, now, queues
        return queues
