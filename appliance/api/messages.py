"""How one stream entry reads on each wire: SSE frames and the legacy, client, monitor and hub-era messages.

Stream entries hold strings; every wire gets them in the types of appliance.jobs.JOB_FIELDS (numbers as
numbers, `result` as an object, every `*_at` and `timestamp` ISO 8601 UTC). Where the
original system sent the same event under two names, each kind of client gets the name it expects:
`job_progress`/`job_completed` on the monitor socket (the Next.js monitor), `update_job_progress`/
`complete_job` on the client socket and to hub-era monitors (the simple monitor).
"""

from __future__ import annotations

from typing import Any

from appliance import clock
from appliance.api import render
from appliance.api.fanout import Entry
from appliance.jobs import JOB_FIELDS, TERMINAL, JobStatus, decode

TERMINAL_EVENTS = frozenset(str(s) for s in TERMINAL)  # a job stream event named after its terminal status
FAILED_EVENTS = TERMINAL_EVENTS - {JobStatus.COMPLETED}
MONITOR_RESULT_BYTES = 4096  # larger results are not broadcast to monitors (they follow every job)


def dumps(message: dict[str, Any]) -> str:
    return render.dumps_text(message)


def now() -> str:
    """A message's `timestamp`: ISO 8601 UTC, on every wire."""
    return clock.iso(clock.now_ms())


def typed(fields: dict[str, str]) -> dict[str, Any]:
    """A stream entry's fields in their wire types (appliance.jobs.JOB_FIELDS)."""
    return decode(fields, JOB_FIELDS)


# -- SSE ---------------------------------------------------------------------------------------------------
def sse_frame(entry: Entry) -> bytes:
    """`id:`, `event:` and one `data:` line (JSON: the typed entry, plus its type and timestamp)."""
    data = {"type": entry.event, "id": entry.id, **typed(entry.fields), "timestamp": now()}
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (entry.id.encode(), entry.event.encode(), render.dumps(data))


def sse_comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


def sse_named(event: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), render.dumps(data))


# -- legacy socket (E0 `progress` frames; terminal events also under the E5 names) -------------------------
def legacy(entry: Entry) -> list[str]:
    fields = typed(entry.fields)
    message = {"type": "progress", "job_id": entry.job_id, "id": entry.id, "event": entry.event,
               "status": fields.get("status"), "data": fields, "timestamp": now()}
    if "progress" in fields:
        message["progress"] = fields["progress"]
    out = [dumps(message)]
    if entry.event == "completed":
        out.append(dumps(_complete_job(entry, fields)))
    elif entry.event in FAILED_EVENTS:
        out.append(dumps(_job_failed(entry, fields, "job_failed")))
    return out


# -- client socket (E5 names) ------------------------------------------------------------------------------
def client(entry: Entry) -> list[str]:
    return [dumps(m) for m in _client_messages(entry)]


def _base(entry: Entry, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"type": kind, "job_id": entry.job_id, "id": entry.id}
    if "worker_id" in fields:
        message["worker_id"] = fields["worker_id"]
    message["timestamp"] = now()
    return message


def _progress(entry: Entry, fields: dict[str, Any], kind: str, status: str) -> dict[str, Any]:
    message = _base(entry, kind, fields)
    message.update(progress=fields.get("progress", 0), status=status)
    for name in ("message", "current_step", "total_steps"):
        if name in fields:
            message[name] = fields[name]
    return message


def _complete_job(entry: Entry, fields: dict[str, Any], kind: str = "complete_job") -> dict[str, Any]:
    message = _base(entry, kind, fields)
    message.update(status="completed", progress=100, result=fields.get("result"),
                   message=fields.get("message", ""),
                   completed_at=fields.get("completed_at") or fields.get("updated_at"))
    return message


def _job_failed(entry: Entry, fields: dict[str, Any], kind: str) -> dict[str, Any]:
    message = _base(entry, kind, fields)
    message.setdefault("worker_id", None)
    message.update(status=entry.event, error=fields.get("error", ""),
                   failed_at=fields.get("failed_at") or fields.get("updated_at"),
                   retry_count=fields.get("retry_count", 0), will_retry=False)
    return message


def _status_changed(entry: Entry, fields: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    message = _base(entry, "job_status_changed", fields)
    message.update(old_status=old, new_status=new, event=entry.event)
    for name in ("error", "retry_count", "max_retries", "retry_at", "message"):
        if name in fields:
            message[name] = fields[name]
    return message


def _client_messages(entry: Entry) -> list[dict[str, Any]]:
    fields = typed(entry.fields)
    event = entry.event
    if event == "assigned":
        message = _base(entry, "job_assigned", fields)
        message.update(old_status="pending", new_status="assigned",
                       assigned_at=fields.get("updated_at"))
        return [message]
    if event == "in_progress":
        return [_status_changed(entry, fields, "assigned", "in_progress")]
    if event == "progress":
        return [_progress(entry, fields, "update_job_progress", "in_progress")]
    if event == "retrying":
        return [_status_changed(entry, fields, "in_progress", "pending")]
    if event == "requeued":
        return [_status_changed(entry, fields, "in_progress", "pending")]
    if event == "completed":
        return [_complete_job(entry, fields)]
    if event in FAILED_EVENTS:
        return [_job_failed(entry, fields, "job_failed")]
    return []


# -- monitor socket (the Next.js monitor's names) ----------------------------------------------------------
def monitor(entry: Entry) -> list[tuple[str, str]]:
    """(type, JSON) pairs for a monitor that sent monitor_connect; the type drives its topic filter."""
    return [(m["type"], dumps(m)) for m in _monitor_messages(entry, hub=False)]


def hub(entry: Entry) -> list[tuple[str, str]]:
    """The same events under the hub-era names the simple monitor handles."""
    return [(m["type"], dumps(m)) for m in _monitor_messages(entry, hub=True)]


def _worker_status(fields: dict[str, str], hub_names: bool) -> dict[str, Any]:
    """A `worker_status` entry (written by the script that changed the worker's status, with the status it set)."""
    status = fields.get("status", "")
    message: dict[str, Any] = {"type": "worker_status" if hub_names else "worker_status_changed",
                               "worker_id": fields.get("worker_id")}
    if hub_names:
        message["status"] = status
    else:
        message.update(old_status=fields.get("old_status") or ("busy" if status == "idle" else "idle"),
                       new_status=status)
    message["current_job_id"] = fields.get("current_job_id") or None
    message["timestamp"] = now()
    return message


def monitor_fields(entry: Entry) -> dict[str, Any]:
    """A stream entry's typed fields for monitors, which follow every job: a result larger than
    MONITOR_RESULT_BYTES is replaced by a note (clients of the job itself, SSE and sockets, get it whole)."""
    size = len(entry.fields.get("result", ""))
    if size <= MONITOR_RESULT_BYTES:
        return typed(entry.fields)
    fields = typed({name: value for name, value in entry.fields.items() if name != "result"})
    fields["result"] = {"_omitted": f"a result of {size} bytes is not broadcast to monitors; read it with "
                                    f"GET /api/jobs/{entry.job_id}"}
    return fields


def _monitor_messages(entry: Entry, hub: bool) -> list[dict[str, Any]]:
    fields = monitor_fields(entry)
    event = entry.event
    out: list[dict[str, Any]] = []
    if event == "worker_connected":
        out.append({"type": "worker_connected", "worker_id": fields.get("worker_id"),
                    "worker_data": entry.extra.get("worker_data") or {"status": "idle", "capabilities": {},
                                                                      "jobs_completed": 0, "jobs_failed": 0},
                    "timestamp": now()})
        return out
    if event == "worker_disconnected":
        out.append({"type": "worker_disconnected", "worker_id": fields.get("worker_id"),
                    "timestamp": now()})
        return out
    if event == "worker_status":
        return [_worker_status(entry.fields, hub)]
    if event == "submitted":
        job = entry.extra.get("job") or {"id": entry.job_id, "job_type": fields.get("service_required"),
                                         "status": "pending", "priority": fields.get("priority"),
                                         "progress": 0, "created_at": fields.get("updated_at")}
        if hub:
            out.append({"type": "job_accepted", "job_id": entry.job_id, "status": "pending",
                        "job_type": job.get("job_type"), "priority": job.get("priority"),
                        "timestamp": now()})
        else:
            out.append({"type": "job_submitted", "job_id": entry.job_id, "job_data": job,
                        "timestamp": now()})
        return out
    if event == "assigned":
        message = _base(entry, "job_assigned", fields)
        message.update(old_status="pending", new_status="assigned",
                       assigned_at=fields.get("updated_at"))
        out.append(message)
    elif event == "in_progress":
        out.append(_status_changed(entry, fields, "assigned", "processing"))
    elif event == "progress":
        out.append(_progress(entry, fields, "update_job_progress" if hub else "job_progress", "processing"))
    elif event in ("retrying", "requeued"):
        out.append(_status_changed(entry, fields, "processing", "pending"))
    elif event == "completed":
        out.append(_complete_job(entry, fields, "complete_job" if hub else "job_completed"))
    elif event in FAILED_EVENTS:
        out.append(_job_failed(entry, fields, "fail_job" if hub else "job_failed"))
    return out


def topic_match(kind: str, topics: frozenset[str]) -> bool:
    """The original monitor filter (no topics, `jobs`, or `jobs:<second word>`), plus `workers` for worker
    events and `system_stats` for statistics."""
    if not topics or "jobs" in topics:
        return True
    words = kind.split("_")
    if len(words) > 1 and f"jobs:{words[1]}" in topics:
        return True
    if kind.startswith("worker") and "workers" in topics:
        return True
    return kind in topics or (kind in ("system_stats", "stats_broadcast") and "system_stats" in topics)
