"""The queue as clients see it: submit, read, list and cancel jobs; read workers and depth."""

from __future__ import annotations

import builtins
import logging
import uuid
from typing import Any, cast

import redis

from appliance import clock
from appliance.classes import ClassBook
from appliance.errors import JobExists
from appliance.jobs import STATUS_VALUES, JobSpec, JobStatus, public_job, public_worker
from appliance.keys import Keys
from appliance.scripts import OFFERED_WINDOW_MS, Scripts
from appliance.settings import QueueSettings

log = logging.getLogger(__name__)
LIST_LIMIT_MAX = 1000


class Queue:
    """Client-side operations on the job queue, shared by the API, the CLI and the tests."""

    def __init__(self, client: redis.Redis, settings: QueueSettings):
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.scripts = Scripts(client, self.keys, settings)
        self.classes = ClassBook(client, self.keys, self.scripts)

    def submit(self, spec: JobSpec, now_ms: int | None = None) -> str:
        """Store a checked job and put it in line; returns its id.

        A job with requirements (or a customer) goes to the claim queue of its requirement class
        (appliance/matching.py), computed from the same canonical requirements the job stores (`JobSpec`
        holds them so); if no registered worker can serve that class, it is marked unworkable.
        """
        job_class = self.classes.for_job(spec.service_required, spec.requirements, spec.customer_id)
        if spec.submitted_by:
            # before the job exists, so that it is never missing from its key's listings (scored by submit time,
            # for prune_submitted's grace); a submit that then fails leaves a member that listings ignore (it is
            # not in index_all) and prune_submitted drops
            self.client.zadd(self.keys.index_submitter(spec.submitted_by),
                             {spec.id: clock.now_ms() if now_ms is None else now_ms})
        try:
            submitted = self.scripts.submit(spec.id, spec.service_required, spec.priority, spec.stored_fields(),
                                            job_class, now_ms=now_ms)
        except JobExists:
            return spec.id  # ids are uuid4s made here: only our own re-sent submit can have stored it already
        if submitted.unworkable_reason:
            log.warning("job unworkable id=%s service=%s: %s", spec.id, spec.service_required,
                        submitted.unworkable_reason)
        elif job_class is not None:
            self.classes.check_submitted(job_class)
        return spec.id

    def get(self, job_id: str) -> dict[str, Any] | None:
        # connect() decodes replies, so redis-py's `bytes | str` values are str here
        fields = cast(dict[str, str], self.client.hgetall(self.keys.job(job_id)))
        return self._public([fields])[0] if fields else None

    def get_many(self, job_ids: builtins.list[str]) -> builtins.list[dict[str, Any]]:
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.keys.job(job_id))
        return self._public([fields for fields in pipe.execute() if fields])

    def _public(self, records: builtins.list[dict[str, str]]) -> builtins.list[dict[str, Any]]:
        """Job records as clients see them. A pending job that no worker can take now says why in
        `waiting_reason`: no live worker offers its service now, its service is configured on a worker whose
        health check fails, or no worker at all offered a service lately."""
        jobs = [public_job(fields) for fields in records]
        pending = [(job, fields.get("service_required", "")) for job, fields in zip(jobs, records, strict=True)
                   if fields.get("status") == JobStatus.PENDING]
        if pending:
            notes = self.waiting_reasons(sorted({service for _, service in pending}))
            for job, service in pending:
                if notes.get(service):
                    job["waiting_reason"] = notes[service]
        return jobs

    def waiting_reasons(self, services: builtins.list[str], now_ms: int | None = None) -> dict[str, str]:
        """Why jobs of these services wait though they are not unworkable, for those that do.

        A service no live worker offers now, but one offered within OFFERED_WINDOW_MS (a worker restarting, or
        every worker down), is not judged unworkable yet: its jobs say so, and when that ends."""
        if not services:
            return {}
        now = clock.now_ms() if now_ms is None else now_ms
        window_s = OFFERED_WINDOW_MS // 1000
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.keys.services_unhealthy, services)
        pipe.zmscore(self.keys.services_offered, services)
        pipe.zcount(self.keys.services_offered, now - OFFERED_WINDOW_MS, "+inf")
        notes, last_offered, offered = pipe.execute()
        if not offered:
            idle = (f"no worker offered any service in the last {window_s}s: it waits for a worker to register "
                    "(is the appliance's worker program running? `bin/appliance status`)")
            return dict.fromkeys(services, idle)
        live = {service for worker in self.workers() if worker.get("alive")
                for service in (worker.get("capabilities") or {}).get("services") or ()}
        reasons = {}
        for service, note, last in zip(services, notes, last_offered, strict=True):
            if note:
                reasons[service] = note
            elif service not in live and last is not None:
                since_s = max(0, (now - int(last)) // 1000)
                reasons[service] = (f"no live worker offers service '{service}' now (last offered {since_s}s ago); "
                                    f"its jobs become unworkable if none offers it within {window_s}s of that")
        return reasons

    def submitter(self, job_id: str) -> str | None:
        """The name of the API key that submitted a job ('' for none), or None if there is no such job."""
        status, name = cast(list[str | None], self.client.hmget(self.keys.job(job_id), ["status", "submitted_by"]))
        return None if status is None else name or ""

    def list(self, status: str | None = None, service: str | None = None, limit: int = 50,
             offset: int = 0, submitted_by: str | None = None) -> tuple[builtins.list[dict[str, Any]], int]:
        """Jobs newest first, filtered by status and/or service, from the indexes; returns (page, total).

        With `submitted_by`, only the jobs that API key submitted."""
        self.scripts.prune()
        k = self.keys
        if submitted_by is not None:
            return self._list_submitted(submitted_by, status, service, limit, offset)
        if status and service:
            scratch = k.scratch(uuid.uuid4().hex)
            pipe = self.client.pipeline(transaction=True)
            pipe.zinterstore(scratch, {k.index_status(status): 1, k.index_service(service): 0})
            pipe.zrevrange(scratch, offset, offset + limit - 1)
            pipe.zcard(scratch)
            pipe.delete(scratch)
            _, ids, total, _ = pipe.execute()
        else:
            index = k.index_status(status) if status else k.index_service(service) if service else k.index_all
            pipe = self.client.pipeline(transaction=True)
            pipe.zrevrange(index, offset, offset + limit - 1)
            pipe.zcard(index)
            ids, total = pipe.execute()
        return self.get_many(ids), int(total)

    def _list_submitted(self, name: str, status: str | None, service: str | None, limit: int,
                        offset: int) -> tuple[builtins.list[dict[str, Any]], int]:
        """One API key's jobs: its index intersected with index_all (which expired jobs have left) and the
        filters, newest first by index_all's sequence (exact, where submit times may tie)."""
        k = self.keys
        scratch = k.scratch(uuid.uuid4().hex)
        filters = ([k.index_status(status)] if status else []) + ([k.index_service(service)] if service else [])
        pipe = self.client.pipeline(transaction=True)
        pipe.zinterstore(scratch, {k.index_submitter(name): 0, k.index_all: 1, **dict.fromkeys(filters, 0)})
        pipe.zrevrange(scratch, offset, offset + limit - 1)
        pipe.zcard(scratch)
        pipe.delete(scratch)
        _, ids, total, _ = pipe.execute()
        return self.get_many(ids), int(total)

    def prune_submitted(self, now_ms: int | None = None, grace_ms: int = 60_000) -> int:
        """Drop from every API key's listing index the jobs that left index_all (expired) or never got there (a
        submit that failed) more than `grace_ms` ago; returns how many were dropped. Listings ignore them
        anyway: this bounds the memory of the indexes."""
        k = self.keys
        cutoff = (clock.now_ms() if now_ms is None else now_ms) - grace_ms
        dropped = 0
        for own in self.client.scan_iter(match=k.index_submitter_prefix + "*", count=100, _type="zset"):
            flat = cast(list[str], self.client.zdiff([own, k.index_all], withscores=True))  # member, score, ...
            stale = [member for member, score in zip(flat[::2], flat[1::2], strict=True) if float(score) < cutoff]
            if stale:
                dropped += int(self.client.zrem(own, *stale))
        return dropped

    def cancel(self, job_id: str, reason: str = "Job cancelled by user") -> str:
        return self.scripts.cancel(job_id, reason)

    def depth(self) -> int:
        """How many jobs wait in line now (retries waiting for their backoff not included)."""
        return int(self.client.zcard(self.keys.pending))

    def counts(self) -> dict[str, int]:
        """Jobs per status, from the indexes."""
        self.scripts.prune()
        pipe = self.client.pipeline(transaction=False)
        for status in STATUS_VALUES:
            pipe.zcard(self.keys.index_status(status))
        return dict(zip(STATUS_VALUES, (int(n) for n in pipe.execute()), strict=False))

    def service_notes(self) -> builtins.list[str]:
        """Lines for `bin/appliance status`: services whose jobs are unworkable because no registered worker
        offers them, and services whose jobs wait because no worker can take them now (and why)."""
        k = self.keys
        services = sorted(cast(set[str], self.client.smembers(k.services)))
        waiting = self.waiting_reasons(services)
        pipe = self.client.pipeline(transaction=False)
        for service in services:
            pipe.zcard(k.unoffered(service))
        lines = [f"unworkable: {n} jobs of service {service!r}: no registered worker offers it"
                 for service, n in zip(services, pipe.execute(), strict=True) if n]
        for service, why in waiting.items():
            classes = cast(set[str], self.client.smembers(k.requirement_classes(service)))
            for queue in [k.pending_service(service), *(k.pending_class(service, c) for c in classes)]:
                pipe.zcard(queue)
            pending = sum(pipe.execute())
            if pending:
                lines.append(f"waiting: {pending} jobs of service {service!r}: {why}")
        return lines

    def worker_ids(self) -> builtins.list[str]:
        return sorted(cast(set[str], self.client.smembers(self.keys.workers_active)))

    def workers(self) -> builtins.list[dict[str, Any]]:
        """Registered workers with their record and heartbeat age (seconds), sorted by id."""
        ids = self.worker_ids()
        pipe = self.client.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hgetall(self.keys.worker(worker_id))
            pipe.ttl(self.keys.worker_heartbeat(worker_id))
        replies = pipe.execute()
        now = clock.now_ms()
        workers = []
        for worker_id, fields, ttl in zip(ids, replies[::2], replies[1::2], strict=False):
            if not fields:
                continue
            workers.append(public_worker(worker_id, fields, int(ttl), now))
        return workers
