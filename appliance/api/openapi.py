"""GET /openapi.json: the OpenAPI 3.1 document of the HTTP API, built from the checks the API enforces.

The submission's fields and bounds come from `appliance.jobs` (JobSpec.parse's constants, SERVICE_RE),
requirements from `appliance.matching`, payloads from each installed connector's `payload_schema` (beside its
`check_payload`), and the job and worker records from the wire-type tables (JOB_FIELDS, WORKER_FIELDS). The
WebSocket messages, which OpenAPI cannot describe, are under `x-websocket`. tests/test_openapi.py checks that
every route is here and that every bound declared here is the one the API enforces.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from typing import Any

import falcon
import orjson

from appliance import jobs, matching
from appliance.api.auth import ADMIN_ROUTES, OPEN_ROUTES
from appliance.api.ws_monitor import RESYNC_MAX
from appliance.connector import Connector
from appliance.queue import LIST_LIMIT_MAX

OPENAPI_VERSION = "3.1.0"
OFFSET_MAX = 1_000_000_000           # GET /api/jobs?offset (resources.JobCollection)
NULL = {"type": "null"}
ISO_TIME = {"type": "string", "format": "date-time", "description": "ISO 8601 UTC, e.g. 2026-01-15T08:00:00.000Z"}
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "apiKeyQuery": {"type": "apiKey", "in": "query", "name": "token",
                    "description": "for clients that cannot set headers (EventSource, browser WebSocket)"},
}
KEYED: list[dict[str, list[str]]] = [{name: []} for name in SECURITY_SCHEMES]


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, NULL]}


# -- what JobSpec.parse accepts ----------------------------------------------------------------------------
def _service_name(description: str) -> dict[str, Any]:
    return {"type": "string", "pattern": jobs.SERVICE_RE.pattern, "maxLength": 128, "description": description}


def submission_schema(payload_rules: list[dict[str, Any]]) -> dict[str, Any]:
    """POST /api/jobs's body (and a WebSocket submit_job's job fields), from JobSpec.parse's checks."""
    def integer(lo: int, hi: int, default: int | None, description: str) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": ["integer", "null"], "minimum": lo, "maximum": hi,
                                  "description": description}
        if default is not None:
            schema["default"] = default
        return schema

    def digits(hi: int, description: str) -> dict[str, Any]:
        return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": hi},
                          {"type": "string", "pattern": "^[0-9]+$", "description": "a string of digits"},
                          NULL], "description": description}

    text = {"anyOf": [{"type": "string", "maxLength": jobs.CUSTOMER_MAX}, {"type": "integer"}, NULL]}
    schema: dict[str, Any] = {
        "type": "object",
        "description": "Unknown top-level fields are ignored. service_required may come as job_type or type "
                       "(the original's fallbacks).",
        "properties": {
            "service_required": _service_name("the service that runs the job, e.g. simulation"),
            "job_type": _service_name("alias of service_required"),
            "type": _service_name("alias of service_required (HTTP; on WebSocket `type` is the message kind)"),
            "priority": integer(jobs.PRIORITY_MIN, jobs.PRIORITY_MAX, jobs.PRIORITY_DEFAULT,
                                "higher runs first; FIFO among equals"),
            "payload": {"type": ["object", "null"], "description": "checked at submit by the check_payload of "
                        "the connector named like the service (see the *Payload schemas)"},
            "requirements": _or_null(ref("Requirements")),
            "customer_id": {**text, "description": f"at most {jobs.CUSTOMER_MAX} characters"},
            "max_retries": integer(0, jobs.MAX_RETRIES_MAX, jobs.MAX_RETRIES_DEFAULT, "0: no retry"),
            "timeout_seconds": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": jobs.TIMEOUT_MAX_S,
                                "description": "else WORKER_JOB_TIMEOUT_MINUTES"},
            "workflow_id": {**text, "description": f"at most {jobs.CUSTOMER_MAX} characters"},
            "workflow_priority": integer(jobs.PRIORITY_MIN, jobs.PRIORITY_MAX, None, "0 or absent: unset"),
            "workflow_datetime": digits(jobs.EPOCH_MS_MAX, "epoch milliseconds"),
            "step_number": digits(jobs.STEP_MAX, "the job's step in its workflow"),
        },
        "anyOf": [{"required": [name]} for name in ("service_required", "job_type", "type")],
    }
    if payload_rules:
        schema["allOf"] = payload_rules
    return schema


def requirements_schema() -> dict[str, Any]:
    """`requirements`, from matching.parse_requirements's kinds (unknown keys are a 400)."""
    number = {"anyOf": [{"type": "number", "minimum": 0, "maximum": matching.MAX_NUMBER}, {"const": "all"}],
              "description": "at least this much; \"all\": any"}
    name = {"type": "string", "minLength": 1, "maxLength": 256}
    names = {"anyOf": [name, {"type": "array", "items": name}], "description": "a name or a list of names"}
    scalar = {"type": ["string", "number", "boolean"]}
    segment = matching._SEGMENT.pattern.strip("^$")
    group: dict[str, Any] = {
        "type": "object",
        "properties": {**{kind: number for kind in matching.AT_LEAST}, **{kind: names for kind in matching.NAMES},
                       "customer_isolation": {"enum": ["strict", "loose"]}},
        "patternProperties": {f"^{segment}(\\.{segment}){{1,7}}$": {
            "anyOf": [scalar, {"type": "array", "items": scalar}],
            "description": "a custom capability: a dot path into the worker's capabilities, e.g. custom.region"}},
        "additionalProperties": False,
    }
    return {**group, "maxProperties": matching.MAX_KEYS,
            "properties": {**group["properties"], **{g: ref("RequirementGroup") for g in matching.GROUPS}}}


def connector_payloads() -> dict[str, dict[str, Any]]:
    """Each installed connector's payload schema, by service name."""
    found: dict[str, dict[str, Any]] = {}
    for ep in sorted(entry_points(group="appliance.connectors"), key=lambda ep: ep.name):
        cls = ep.load()
        if isinstance(cls, type) and issubclass(cls, Connector):
            found[ep.name] = cls.payload_schema()
    return found


# -- the records, from the wire-type tables ----------------------------------------------------------------
_KIND_SCHEMA: dict[str, dict[str, Any]] = {
    jobs.INT: {"type": "integer"}, jobs.FLOAT: {"type": "number"}, jobs.JSON: {"type": "object"},
    jobs.BOOL: {"type": "boolean"}, jobs.TIME: ISO_TIME, jobs.LIST: {"type": "array", "items": {"type": "string"}},
    "text": {"type": "string"},
}


def record_schema(table: dict[str, str], description: str, **extra: dict[str, Any]) -> dict[str, Any]:
    """A decoded record (jobs.decode): the table's fields in their types; any field it does not name is text."""
    properties = {name: _KIND_SCHEMA[kind] for name, kind in table.items() if kind != jobs.HIDDEN}
    return {"type": "object", "description": description, "properties": {**properties, **extra},
            "additionalProperties": {"type": "string"}}


def job_schema() -> dict[str, Any]:
    schema = record_schema(jobs.JOB_FIELDS, "A job (jobs.public_job); empty fields are left out.",
                           status={"type": "string", "enum": list(jobs.STATUS_VALUES)},
                           job_type={"type": "string", "description": "alias of service_required"})
    schema["required"] = ["id", "service_required", "status", "progress", "job_type"]
    return schema


def worker_schema() -> dict[str, Any]:
    schema = record_schema(jobs.WORKER_FIELDS, "A registered worker (jobs.public_worker).",
                           alive={"type": "boolean", "description": "its heartbeat key exists"},
                           heartbeat_ttl_s={"type": "integer", "minimum": 0},
                           heartbeat_age_s={"type": ["number", "null"]})
    schema["required"] = ["id", "alive", "heartbeat_ttl_s", "heartbeat_age_s"]
    return schema


def _ok(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "required": ["success", *required, "timestamp"],
            "properties": {"success": {"const": True}, **properties, "timestamp": ISO_TIME}}


def schemas(payloads: dict[str, dict[str, Any]]) -> dict[str, Any]:
    integer = {"type": "integer", "minimum": 0}
    out: dict[str, Any] = {
        "Error": {"type": "object", "required": ["success", "error", "timestamp"],
                  "description": "Every error: a message a person can act on, and what it concerns.",
                  "properties": {"success": {"const": False}, "error": {"type": "string"}, "timestamp": ISO_TIME,
                                 "field": {"type": "string", "description": "the input that was wrong"},
                                 "job_id": {"type": "string"}, "status": {"type": "string"},
                                 "name": {"type": "string"},
                                 "retry_after_s": {"type": "integer", "description": "429, 503: when to retry"}}},
        "Submission": None,  # filled below, after the payloads it refers to
        "Requirements": requirements_schema(),
        "RequirementGroup": {k: v for k, v in requirements_schema().items() if k != "maxProperties"},
        "Job": job_schema(),
        "Worker": worker_schema(),
        "Submitted": _ok({"job_id": {"type": "string"}, "message": {"type": "string"}}, ["job_id"]),
        "JobAnswer": _ok({"job": ref("Job")}, ["job"]),
        "JobList": _ok({"jobs": {"type": "array", "items": ref("Job")}, "total": integer,
                        "limit": {"type": "integer", "minimum": 1, "maximum": LIST_LIMIT_MAX},
                        "offset": integer}, ["jobs", "total", "limit", "offset"]),
        "Cancelled": _ok({"job_id": {"type": "string"}, "status": {"enum": ["cancelled", "cancelling"]},
                          "message": {"type": "string"}}, ["job_id", "status"]),
        "WorkerList": _ok({"workers": {"type": "array", "items": ref("Worker")}, "total": integer},
                          ["workers", "total"]),
        "Health": _ok({"status": {"const": "ok"},
                       "redis": {"type": "object", "required": ["ok"],
                                 "properties": {"ok": {"type": "boolean"}, "latency_ms": {"type": "number"},
                                                "url": {"type": "string", "description": "for key holders"}}},
                       "workers": {"type": "object", "properties": {
                           "active": integer, "ids": {"type": "array", "items": {"type": "string"}}}},
                       "queue": {"type": "object", "properties": {"pending": integer}},
                       "warnings": {"type": "array", "items": {"type": "string"}},
                       "tasks": {"type": "array", "description": "this process's background tasks (a dead one "
                                 "makes /health a 503 while the process restarts itself)",
                                 "items": {"type": "object", "required": ["name", "alive"],
                                           "properties": {"name": {"type": "string"},
                                                          "alive": {"type": "boolean"}}}}},
                      ["status", "redis", "workers", "queue"]),
        "ConnectionStats": _ok({"sse_connections": integer,
                                "websocket_connections": {"type": "object",
                                                          "additionalProperties": integer},
                                "total_connections": integer, "api_processes": integer,
                                "this_process": {"type": "object"}},
                               ["sse_connections", "websocket_connections", "total_connections"]),
    }
    rules = []
    for service, schema in payloads.items():
        if schema == {"type": "object"}:
            continue
        name = f"{service.capitalize()}Payload"
        out[name] = {**schema, "description": f"payload of a {service} job (checked at submit)"}
        rules.append({"if": {"required": ["service_required"],
                             "properties": {"service_required": {"const": service}}},
                      "then": {"properties": {"payload": _or_null(ref(name))}}})
    out["Submission"] = submission_schema(rules)
    return out


# -- the operations -------------------------------------------------------------------------------------------
def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(schema_name)}}}


def _errors(*codes: int) -> dict[str, Any]:
    why = {400: "bad input (names the field)", 401: "no valid API key", 403: "needs an admin key", 404: "not found",
           408: "the body did not arrive in time (API_BODY_TIMEOUT_SECONDS)", 409: "the job already finished",
           413: "body too large (API_MAX_BODY_BYTES)",
           429: "submits too fast for this caller (API_SUBMITS_PER_SECOND); see Retry-After",
           500: "internal error (see the api log)",
           503: "Redis is not reachable, or a capacity is reached (Retry-After)"}
    return {str(code): _json("Error", why[code]) for code in codes}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"},
            "description": description}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def operations() -> dict[str, dict[str, Any]]:
    """Every route and method the API serves (without the error answers every operation shares)."""
    job_id = _path_param("job_id", "the job's id (as returned by POST /api/jobs)")
    health = {"summary": "Health: Redis reachable, workers, queue depth",
              "responses": {"200": _json("Health", "up"), "503": _json("Error", "Redis is not reachable")}}
    return {
        "/health": {"get": {**health, "operationId": "health"}},
        "/api/health": {"get": {**health, "operationId": "apiHealth"}},
        "/api/jobs": {
            "post": {"operationId": "submitJob", "summary": "Submit a job",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": ref("Submission")}}},
                     "responses": {"201": _json("Submitted", "stored and queued"),
                                   **_errors(400, 408, 413, 429, 503)}},
            "get": {"operationId": "listJobs", "summary": "List jobs, newest first, from the Redis indexes",
                    "parameters": [
                        _query("status", {"enum": list(jobs.STATUS_VALUES)}, "only jobs in this status"),
                        _query("service_required", {"type": "string", "pattern": jobs.SERVICE_RE.pattern},
                               "only jobs of this service"),
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": LIST_LIMIT_MAX,
                                         "default": 50}, "page size"),
                        _query("offset", {"type": "integer", "minimum": 0, "maximum": OFFSET_MAX, "default": 0},
                               "jobs to skip")],
                    "responses": {"200": _json("JobList", "a page of jobs; total counts all matches"),
                                  **_errors(400, 503)}},
        },
        "/api/jobs/{job_id}": {
            "parameters": [job_id],
            "get": {"operationId": "getJob", "summary": "A job: status, progress, result or error, times",
                    "responses": {"200": _json("JobAnswer", "the job"), **_errors(404, 503)}},
            "delete": {"operationId": "cancelJob", "summary": "Cancel a job",
                       "responses": {"200": _json("Cancelled", "cancelled (it was pending)"),
                                     "202": _json("Cancelled", "cancelling: its worker stops it within a second"),
                                     **_errors(404, 409, 503)}},
        },
        "/api/jobs/{job_id}/progress": {
            "parameters": [job_id],
            "get": {"operationId": "jobProgress", "summary": "The job's events as Server-Sent Events",
                    "description": "A `connected` frame, the job's history, then live events until the terminal "
                                   "one. Frames carry `id:` (the stream entry id) and `event:`; send Last-Event-ID "
                                   "to resume after an entry. Keep-alive comments every API_SSE_KEEPALIVE_SECONDS.",
                    "parameters": [{"name": "Last-Event-ID", "in": "header", "required": False,
                                    "schema": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"},
                                    "description": "resume after this stream entry"}],
                    "responses": {"200": {"description": "an event stream", "content": {
                        "text/event-stream": {"schema": {"type": "string"}}}}, **_errors(400, 404, 503)}},
        },
        "/api/jobs/{job_id}/outputs/{name}": {
            "parameters": [job_id, _path_param("name", "the file's name, as listed in the job's result")],
            "get": {"operationId": "jobOutput", "summary": "A file the job produced (ComfyUI images)",
                    "responses": {"200": {"description": "the file, with its content type", "content": {
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                        "image/*": {"schema": {"type": "string", "format": "binary"}}}},
                        **_errors(404, 503)}},
        },
        "/api/jobs/{job_id}/preview": {
            "parameters": [job_id],
            "get": {"operationId": "jobPreview", "summary": "A running job's latest preview image (ComfyUI)",
                    "description": "Replaced by each new one (a `preview` event on the job's stream says so); "
                                   "kept a few minutes.",
                    "responses": {"200": {"description": "the image, with its content type", "content": {
                        "image/*": {"schema": {"type": "string", "format": "binary"}}}},
                        **_errors(404, 503)}},
        },
        "/api/workers": {"get": {"operationId": "listWorkers", "summary": "Registered workers",
                                 "responses": {"200": _json("WorkerList", "workers, with telemetry"),
                                               **_errors(503)}}},
        "/api/connection-stats": {"get": {"operationId": "connectionStats",
                                          "summary": "Open SSE and WebSocket connections over every API process",
                                          "responses": {"200": _json("ConnectionStats", "counts"),
                                                        **_errors(503)}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                  "responses": {"200": {"description": "OpenAPI 3.1", "content": {
                                      "application/json": {"schema": {"type": "object"}}}}}}},
        "/docs": {"get": {"operationId": "docs", "summary": "This document as a web page",
                          "responses": {"200": {"description": "HTML", "content": {
                              "text/html": {"schema": {"type": "string"}}}}}}},
    }


# -- WebSocket (not expressible in OpenAPI: an extension the /docs page renders) ---------------------------
def websocket() -> dict[str, Any]:
    job_id = {"job_id": "the job's id (required)"}
    common = {
        "submit_job": {"fields": {"...": "the Submission fields at the top level, or under `data` (which wins)"},
                       "replies": ["job_submitted", "error"]},
        "subscribe_progress": {"fields": {**job_id, "last_event_id": "resume after this stream entry id"},
                               "replies": ["subscribed", "progress events until the terminal one"],
                               "note": "at most API_MAX_SUBSCRIPTIONS jobs per connection"},
        "unsubscribe_progress": {"fields": job_id, "replies": ["unsubscribed"]},
        "get_job_status": {"fields": job_id, "replies": ["job_status"]},
        "cancel_job": {"fields": {**job_id, "reason": "why (text)"}, "replies": ["job_cancelled"]},
        "ping": {"fields": {}, "replies": ["pong"]},
    }
    monitor = {
        "monitor_connect": {"fields": {"request_full_state": "default true"},
                            "replies": ["monitor_connected", "full_state_snapshot"]},
        "subscribe": {"fields": {"topics": "a list of topic names, e.g. [\"jobs\", \"workers\"]"},
                      "replies": ["subscribed"]},
        "heartbeat": {"fields": {}, "replies": ["heartbeat_ack"]},
        "subscribe_stats": {"fields": {}, "replies": ["stats_broadcast (then about every second)"]},
        "request_stats": {"fields": {}, "replies": ["response_stats"]},
        "resync_request": {"fields": {"since_timestamp": "epoch ms (a stream entry time)",
                                      "max_events": f"1 to {RESYNC_MAX}, default 100"},
                           "replies": ["resync_response"]},
    }
    return {
        "description": "WebSocket on the API's port. Every message is a JSON object whose `type` is its kind; "
                       "`id` or `message_id` is echoed as `message_id` in the reply. A message the socket "
                       "cannot use is answered with an `error` message (`error`, and `field`, `job_id` or "
                       "`supported` where they apply); the connection stays open. Binary frames are refused "
                       "the same way.",
        "sockets": {
            "/": {"summary": "The legacy socket (any other path too): follows the jobs it subscribes to",
                  "on_open": "connected (client_id)", "messages": common},
            "/ws/client/{client_id}": {"summary": "The client socket: the jobs it submits push their events",
                                       "on_open": "connected (client_id)",
                                       "messages": {**common, "sync_job_state": {"fields": job_id,
                                                                                  "replies": ["job_status"]}}},
            "/ws/monitor/{monitor_id}": {"summary": "The monitor socket: appliance-wide job and worker events",
                                         "on_open": "connected (monitor_id), then events; stats_broadcast about "
                                                    "every second until monitor_connect or subscribe",
                                         "messages": {**monitor, **common}},
        },
    }


# -- the document ----------------------------------------------------------------------------------------------
@functools.cache
def _base() -> dict[str, Any]:
    return {"schemas": schemas(connector_payloads()), "paths": operations(), "websocket": websocket()}


def document(keys: bool = False) -> dict[str, Any]:
    """The OpenAPI document; with `keys` (API_KEYS set) every operation but the open ones needs a key."""
    base = _base()
    paths: dict[str, Any] = {}
    for path, item in base["paths"].items():
        paths[path] = {}
        for method, op in item.items():
            if method == "parameters":
                paths[path][method] = op
                continue
            op = {**op, "responses": {**op["responses"], **_errors(500)}, "security": []}
            if keys and path not in OPEN_ROUTES:
                op["security"] = KEYED
                op["responses"].update(_errors(401, *([403] if path in ADMIN_ROUTES else [])))
            paths[path][method] = op
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "GPU appliance job queue", "version": "1",
                 "description": "Submit jobs to GPU workers and follow their progress. Every JSON answer has "
                                "`success` and `timestamp`; every error is the Error envelope."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": base["schemas"], "securitySchemes": SECURITY_SCHEMES},
        "x-websocket": base["websocket"],
    }


class OpenApiDocument:
    """GET /openapi.json."""

    def __init__(self, keys: bool = False):
        self.body = orjson.dumps(document(keys))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.body
