"""Every error leaves the API as the `{success: false, error, ...}` envelope; domain errors map here."""

from __future__ import annotations

import logging
from typing import Any

import falcon
import redis

from appliance import clock
from appliance.api import render
from appliance.errors import ECHO_CHARS, JobExists, JobFinished, JobNotFound, Overloaded, ValidationError, shown
from appliance.retry import is_outage

log = logging.getLogger(__name__)


MESSAGE_CHARS = 400   # an error message longer than this is cut (it can only be long by quoting input)


def clip(text: str, limit: int = MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… (cut)"


def envelope(error: str, **extra: Any) -> dict[str, Any]:
    return {"success": False, "error": clip(error), **extra, "timestamp": clock.iso(clock.now_ms())}


def _respond(resp: falcon.Response, http_status: str, error: str, /, **extra: Any) -> None:
    resp.status = http_status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = render.dumps(envelope(error, **extra))


def echo(value: str) -> str:
    """A client-sent id as the envelope repeats it: whole when short, else a prefix."""
    return value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + "…"


def serialize_http_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Falcon's own errors (unknown route, bad JSON, wrong method) in our envelope."""
    message = exc.description or exc.title or "Request failed"
    if exc.status == falcon.HTTP_404 and not exc.description:
        message = f"No such endpoint: {shown(req.method, 16)} {shown(req.path)}; see README for the API"
    elif exc.status == falcon.HTTP_405:
        message = f"Method {shown(req.method, 16)} is not allowed on {shown(req.path)}"
    resp.content_type = falcon.MEDIA_JSON
    resp.data = render.dumps(envelope(message))


def handle_validation(req: falcon.Request, resp: falcon.Response, exc: ValidationError, params: Any) -> None:
    _respond(resp, falcon.HTTP_400, str(exc), field=echo(exc.field))


def handle_not_found(req: falcon.Request, resp: falcon.Response, exc: JobNotFound, params: Any) -> None:
    _respond(resp, falcon.HTTP_404, "Job not found", job_id=echo(exc.job_id))


def handle_finished(req: falcon.Request, resp: falcon.Response, exc: JobFinished, params: Any) -> None:
    _respond(resp, falcon.HTTP_409, str(exc), job_id=exc.job_id, status=exc.status)


def handle_exists(req: falcon.Request, resp: falcon.Response, exc: JobExists, params: Any) -> None:
    _respond(resp, falcon.HTTP_409, str(exc), job_id=exc.job_id)


def handle_redis(req: falcon.Request, resp: falcon.Response, exc: redis.RedisError, params: Any) -> None:
    """An outage (appliance.retry.is_outage: unreachable, timing out, loading, read-only, ...) is a 503 the caller
    may retry; any other Redis error (a script failing, a key of the wrong type) is a bug or a misconfiguration:
    a 500 naming it, logged with its traceback."""
    if not is_outage(exc):
        log.error("Redis error on %s %s (not an outage)", req.method, req.path, exc_info=exc)
        _respond(resp, falcon.HTTP_500, f"internal error: Redis refused the operation ({clip(str(exc), 200)}); "
                                        "see the api log (bin/appliance logs api)")
        return
    log.warning("Redis error on %s %s: %s", req.method, req.path, exc)
    _respond(resp, falcon.HTTP_503, "Redis is not reachable; the job queue is unavailable. Check the redis "
                                    "program (bin/appliance status) and REDIS_URL, then retry.")


def handle_overloaded(req: falcon.Request, resp: falcon.Response, exc: Overloaded, params: Any) -> None:
    """A limit that frees up with time: 429 (a caller's rate) or 503 (a capacity), with Retry-After."""
    resp.set_header("Retry-After", str(exc.retry_after_s))
    status = falcon.HTTP_429 if exc.status == 429 else falcon.HTTP_503
    _respond(resp, status, exc.message, retry_after_s=exc.retry_after_s)


def handle_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: Any) -> None:
    if isinstance(exc, falcon.HTTPError):
        raise exc
    log.exception("unexpected error on %s %s", req.method, req.path)
    _respond(resp, falcon.HTTP_500, f"Internal error ({type(exc).__name__}); see the api log "
                                    "(bin/appliance logs api)")


def install(app: falcon.App[falcon.Request, falcon.Response]) -> None:
    app.set_error_serializer(serialize_http_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(ValidationError, handle_validation)
    app.add_error_handler(JobNotFound, handle_not_found)
    app.add_error_handler(JobFinished, handle_finished)
    app.add_error_handler(JobExists, handle_exists)
    app.add_error_handler(redis.RedisError, handle_redis)
    app.add_error_handler(Overloaded, handle_overloaded)

