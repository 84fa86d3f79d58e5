"""HTTP resources: health, jobs and workers."""

from __future__ import annotations

import time
from typing import Any

import falcon
import orjson
import redis

from appliance import clock
from appliance.connector import check_payload
from appliance.errors import JobNotFound, ValidationError
from appliance.jobs import SERVICE_RE, STATUS_VALUES, JobSpec
from appliance.queue import LIST_LIMIT_MAX, Queue


def _ok(resp: falcon.Response, body: dict[str, Any], status: str = falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"success": True, **body, "timestamp": clock.iso(clock.now_ms())})


def read_json(req: falcon.Request, max_bytes: int) -> Any:
    """The request body as JSON, or a ValidationError naming `body`."""
    if req.content_length is not None and req.content_length > max_bytes:
        raise falcon.HTTPContentTooLarge(description=f"Body is larger than {max_bytes} bytes (API_MAX_BODY_BYTES)")
    raw = req.bounded_stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise falcon.HTTPContentTooLarge(description=f"Body is larger than {max_bytes} bytes (API_MAX_BODY_BYTES)")
    if not raw.strip():
        raise ValidationError("body", "empty; send a JSON object such as {\"service_required\": \"simulation\"}")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValidationError("body", f"not valid JSON ({exc}); send a JSON object with Content-Type: "
                                      "application/json") from None


def query_int(req: falcon.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = req.get_param(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(name, f"expected an integer from {lo} to {hi}, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ValidationError(name, f"expected an integer from {lo} to {hi}, got {value}")
    return value


class Health:
    """GET /health: Redis reachable, workers, queue depth; 503 when Redis is not reachable."""

    def __init__(self, queue: Queue, redis_url: str):
        self.queue = queue
        self.redis_url = redis_url

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        started = time.perf_counter()
        try:
            self.queue.client.ping()
            latency_ms = round((time.perf_counter() - started) * 1000, 2)
            workers = self.queue.worker_ids()
            depth = self.queue.depth()
        except redis.RedisError as exc:
            resp.status = falcon.HTTP_503
            resp.content_type = falcon.MEDIA_JSON
            resp.data = orjson.dumps({
                "success": False, "status": "unavailable",
                "error": f"Redis is not reachable at {self.redis_url} ({type(exc).__name__}); check the redis "
                         "program (bin/appliance status) and REDIS_URL",
                "redis": {"ok": False, "url": self.redis_url},
                "timestamp": clock.iso(clock.now_ms())})
            return
        _ok(resp, {"status": "ok",
                   "redis": {"ok": True, "url": self.redis_url, "latency_ms": latency_ms},
                   "workers": {"active": len(workers), "ids": workers},
                   "queue": {"pending": depth}})


class JobCollection:
    """POST /api/jobs submits; GET /api/jobs lists (filters status, service_required; limit/offset)."""

    def __init__(self, queue: Queue, max_body_bytes: int):
        self.queue = queue
        self.max_body_bytes = max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        spec = JobSpec.parse(read_json(req, self.max_body_bytes))
        check_payload(spec.service_required, spec.payload)
        job_id = self.queue.submit(spec)
        _ok(resp, {"job_id": job_id, "message": "Job submitted successfully"}, falcon.HTTP_201)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        status = req.get_param("status") or None
        if status is not None and status not in STATUS_VALUES:
            raise ValidationError("status", f"expected one of {', '.join(STATUS_VALUES)}, got {status!r}")
        service = req.get_param("service_required") or None
        if service is not None and not SERVICE_RE.match(service):
            raise ValidationError("service_required", f"not a valid service name: {service!r}")
        limit = query_int(req, "limit", 50, 1, LIST_LIMIT_MAX)
        offset = query_int(req, "offset", 0, 0, 1_000_000_000)
        jobs, total = self.queue.list(status, service, limit, offset)
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
