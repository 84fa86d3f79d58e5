"""HTTP resources: health, jobs and workers."""

from __future__ import annotations

import time
from typing import Any

import falcon
import orjson
import redis

from appliance import clock
from appliance.api import auth, capacity, render
from appliance.api.limits import Limits, caller_of
from appliance.api.tasks import Tasks
from appliance.errors import JobNotFound, ValidationError, shown
from appliance.jobs import SERVICE_RE, STATUS_VALUES
from appliance.queue import LIST_LIMIT_MAX, Queue


def _ok(resp: falcon.Response, body: dict[str, Any], status: str = falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = render.dumps({"success": True, **body, "timestamp": clock.iso(clock.now_ms())})


def query_int(req: falcon.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = req.get_param(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(name, f"expected an integer from {lo} to {hi}, got {shown(raw)}") from None
    if not lo <= value <= hi:
        raise ValidationError(name, f"expected an integer from {lo} to {hi}, got {value}")
    return value


class Health:
    """GET /health: Redis reachable, workers, queue depth; 503 when Redis is not reachable."""

    def __init__(self, queue: Queue, redis_url: str, tasks: Tasks | None = None):
        self.queue = queue
        self.redis_url = redis_url
        self.tasks = tasks       # the process's background tasks: 503 while one is dead (it then restarts)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        known = auth.identity_of(req) is not None
        started = time.perf_counter()
        try:
            self.queue.client.ping()
            latency_ms = round((time.perf_counter() - started) * 1000, 2)
            workers = self.queue.worker_ids()
            depth = self.queue.depth()
            memory = capacity.gate(self.queue).memory()
        except redis.RedisError as exc:
            resp.status = falcon.HTTP_503
            resp.content_type = falcon.MEDIA_JSON
            where = f" at {self.redis_url}" if known else ""
            resp.data = orjson.dumps({
                "success": False, "status": "unavailable",
                "error": f"Redis is not reachable{where} ({type(exc).__name__}); check the redis "
                         "program (bin/appliance status) and REDIS_URL",
                "redis": {"ok": False, **({"url": self.redis_url} if known else {})},
                "timestamp": clock.iso(clock.now_ms())})
            return
        body: dict[str, Any] = {"status": "ok",
                                "redis": {"ok": True, "latency_ms": latency_ms, "memory_full": memory.full},
                                "workers": {"active": len(workers)}, "queue": {"pending": depth}}
        if memory.full:
            body["warnings"] = ["Redis memory is full: the queue is full and submits are refused (503) until "
                                "jobs finish or expire (REDIS_MAXMEMORY, API_SUBMIT_MEMORY_PERCENT)"]
        if known:  # anonymous callers (keys configured, none given) learn no addresses or names
            body["redis"].update(url=self.redis_url, memory=memory.public())
            body["workers"]["ids"] = workers
        if self.tasks is not None:
            report = self.tasks.report()
            # anonymous callers (keys configured, none given) learn whether each task lives, not its errors
            body["tasks"] = report if known else [{"name": t.get("name"), "alive": t.get("alive")} for t in report]
            dead = self.tasks.dead()
            if dead:
                names = ", ".join(repr(task.name) for task in dead)
                resp.status = falcon.HTTP_503
                resp.content_type = falcon.MEDIA_JSON
                resp.data = render.dumps({**body, "success": False, "status": "degraded",
                                          "error": f"background task {names} of this API process stopped; "
                                                   "the process is restarting itself",
                                          "timestamp": clock.iso(clock.now_ms())})
                return
        _ok(resp, body)


class JobCollection:
    """POST /api/jobs submits; GET /api/jobs lists (filters status, service_required; limit/offset)."""

    def __init__(self, queue: Queue, limits: Limits):
        self.queue = queue
        self.limits = limits

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        limits, submitter = self.limits, auth.submitter(req)
        limits.admit_submit(caller_of(submitter, req.remote_addr))
        raw = limits.read_body(req)
        spec = limits.submission(limits.parse_json(raw), submitted_by=submitter, raw_size=len(raw))
        job_id = capacity.submit(self.queue, spec)
        _ok(resp, {"job_id": job_id, "message": "Job submitted successfully"}, falcon.HTTP_201)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        status = req.get_param("status") or None
        if status is not None and status not in STATUS_VALUES:
            raise ValidationError("status", f"expected one of {', '.join(STATUS_VALUES)}, got {shown(status)}")
        service = req.get_param("service_required") or None
        if service is not None and not SERVICE_RE.fullmatch(service):
            raise ValidationError("service_required", f"not a valid service name: {shown(service)}")
        limit = query_int(req, "limit", 50, 1, LIST_LIMIT_MAX)
        offset = query_int(req, "offset", 0, 0, 1_000_000_000)
        jobs, total = self.queue.list(status, service, limit, offset, submitted_by=auth.listing_owner(req))
        _ok(resp, {"jobs": jobs, "total": total, "limit": limit, "offset": offset})


class JobItem:
    """GET /api/jobs/{id} reads a job; DELETE cancels it."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        job = self.queue.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        _ok(resp, {"job": job})

    def on_delete(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        outcome = self.queue.cancel(job_id)
        message = ("Job cancelled" if outcome == "cancelled"
                   else "Cancel requested; the worker running the job is stopping it")
        _ok(resp, {"job_id": job_id, "status": outcome, "message": message},
            falcon.HTTP_200 if outcome == "cancelled" else falcon.HTTP_202)


class WorkerCollection:
    """GET /api/workers: registered workers, capabilities, telemetry and heartbeat age."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        workers = self.queue.workers()
        _ok(resp, {"workers": workers, "total": len(workers)})
