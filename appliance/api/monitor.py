"""What monitors are shown: the full-state snapshot, `system_stats`, the hub-era `stats_broadcast`, and the
worker and job details added to `events` stream entries before they are handed out.

Shapes are the ones the existing monitors read: workers as an object keyed by worker id with flat capabilities;
jobs in `{pending, active, completed, failed}` buckets with statuses the monitors display (`processing` for
running jobs, `failed` for anything that ended without success); numeric progress always present. Records are
decoded by appliance.jobs (public_job, public_worker), so values keep the types they have on every other wire.

Everything here goes to every monitor, about every second: jobs are summaries (SUMMARY_FIELDS, read with HMGET
so that payloads and results never even leave Redis, long texts cut), never payloads, requirements or results.
"""

from __future__ import annotations

from typing import Any, cast

import redis

from appliance import clock
from appliance.api.fanout import Entry
from appliance.api.messages import now as timestamp
from appliance.jobs import ACTIVE, JobStatus, public_job, public_worker
from appliance.keys import Keys
from appliance.queue import Queue

SNAPSHOT_LIMIT = 250           # jobs per status in a snapshot
BROADCAST_LIMIT = 50           # jobs per status in each stats_broadcast
# what monitors are sent of a job (never its payload, requirements or result)
SUMMARY_FIELDS = ("id", "service_required", "status", "priority", "progress", "worker_id", "customer_id",
                  "submitted_by", "message", "error", "unworkable_reason", "retry_count", "max_retries",
                  "attempt", "current_step", "total_steps", "timeout_seconds", "workflow_id", "workflow_priority",
                  "workflow_datetime", "step_number", "created_at", "updated_at", "assigned_at", "started_at",
                  "completed_at", "failed_at", "cancelled_at", "unworkable_at", "retry_at")
# What a job's `job_submitted` summary shows: the fields its submit wrote, as they were then (status pending, no
# progress, no worker), even when it has started by the time the summary is read.
SUBMIT_FIELDS = ("id", "service_required", "priority", "customer_id", "submitted_by", "max_retries",
                 "timeout_seconds", "workflow_id", "workflow_priority", "workflow_datetime", "step_number",
                 "created_at")
SUMMARY_TEXT_CHARS = 512
_TEXTS = frozenset({"message", "error", "unworkable_reason", "customer_id", "workflow_id"})
_BUCKETS: dict[str, tuple[str, ...]] = {  # the monitors' four buckets, from JobStatus
    "pending": (JobStatus.PENDING,), "active": tuple(sorted(ACTIVE)), "completed": (JobStatus.COMPLETED,),
    "failed": (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMEOUT, JobStatus.UNWORKABLE)}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def flat_capabilities(worker: dict[str, Any]) -> dict[str, Any]:
    """A worker's capabilities as the monitors read them (hardware lifted to the top, model names only)."""
    caps = _dict(worker.get("capabilities"))
    hardware, models = _dict(caps.get("hardware")), _dict(caps.get("models"))
    access, performance = _dict(caps.get("customer_access")), _dict(caps.get("performance"))
    names = sorted({str(m) for listed in models.values() if isinstance(listed, list) for m in listed})
    return {
        "gpu_count": hardware.get("gpu_count", 0),
        "gpu_memory_gb": hardware.get("gpu_memory_gb", 0),
        "gpu_model": hardware.get("gpu_model") or "CPU",
        "cpu_cores": hardware.get("cpu_cores", 0),
        "ram_gb": hardware.get("ram_gb", 0),
        "services": list(caps.get("services") or worker.get("services") or []),
        "models": names,
        "customer_access": access.get("isolation", "loose"),
        "max_concurrent_jobs": worker.get("max_concurrent_jobs", performance.get("concurrent_jobs", 1)),
    }


def monitor_worker(worker: dict[str, Any]) -> dict[str, Any]:
    """A public worker record in the snapshot's shape."""
    return {
        "id": worker["id"],
        "status": worker.get("status", "idle"),
        "capabilities": flat_capabilities(worker),
        "current_job_id": worker.get("current_job_id") or None,
        "connected_at": worker.get("connected_at"),
        "last_activity": worker.get("last_status_change") or worker.get("last_heartbeat"),
        "jobs_completed": worker.get("total_jobs_completed", 0),
        "jobs_failed": worker.get("total_jobs_failed", 0),
        "total_processing_time": 0,
        "last_heartbeat": worker.get("last_heartbeat"),
        "heartbeat_ttl_s": worker.get("heartbeat_ttl_s", 0),
        "telemetry": worker.get("telemetry"),  # psutil host figures and its GPU's NVML figures
    }


def monitor_job(job: dict[str, Any]) -> dict[str, Any]:
    """A public job as monitors show it (their statuses, `job_type`, numeric `progress`)."""
    out = dict(job)
    status = job.get("status", "pending")
    if status in _BUCKETS["active"]:
        out["status"] = "processing"
    elif status in _BUCKETS["failed"]:
        out["status"] = "failed"
        out["final_status"] = status
    out["id"] = job.get("id")
    out["job_type"] = job.get("service_required", job.get("job_type"))
    out["progress"] = job.get("progress", 0)
    return out


def summary(fields: dict[str, str]) -> dict[str, Any]:
    """A job as monitors are sent it: SUMMARY_FIELDS only, texts cut to SUMMARY_TEXT_CHARS."""
    job = public_job({name: value[:SUMMARY_TEXT_CHARS] if name in _TEXTS else value
                      for name, value in fields.items()})
    return monitor_job(job)


def read_summaries(client: redis.Redis, keys: Keys, job_ids: list[str]) -> list[dict[str, Any]]:
    """Summaries of these jobs (those that still exist), in order, one pipelined HMGET each."""
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(keys.job(job_id), SUMMARY_FIELDS)
    out = []
    for values in pipe.execute():
        fields = {name: value for name, value in zip(SUMMARY_FIELDS, values, strict=True) if value is not None}
        if fields.get("id"):
            out.append(summary(fields))
    return out


def job_buckets(queue: Queue, limit: int) -> dict[str, list[dict[str, Any]]]:
    """The newest `limit` jobs of each status, as summaries, by the monitors' buckets."""
    k = queue.keys
    pipe = queue.client.pipeline(transaction=False)
    statuses = [status for group in _BUCKETS.values() for status in group]
    for status in statuses:
        pipe.zrevrange(k.index_status(status), 0, limit - 1)
    ids = dict(zip(statuses, cast(list[list[str]], pipe.execute()), strict=True))
    return {bucket: read_summaries(queue.client, k, [job_id for status in group for job_id in ids[status]])
            for bucket, group in _BUCKETS.items()}


def live_workers(queue: Queue) -> list[dict[str, Any]]:
    return [w for w in queue.workers() if w.get("alive")]


def system_stats(queue: Queue, workers: list[dict[str, Any]] | None = None) -> dict[str, int]:
    counts = queue.counts()
    workers = live_workers(queue) if workers is None else workers
    return {
        "total_jobs": sum(counts.values()),
        "pending_jobs": counts.get("pending", 0),
        "active_jobs": sum(counts.get(s, 0) for s in _BUCKETS["active"]),
        "completed_jobs": counts.get("completed", 0),
        "failed_jobs": sum(counts.get(s, 0) for s in _BUCKETS["failed"]),
        "total_workers": len(workers),
        "active_workers": sum(1 for w in workers if w.get("status") == "busy"),
    }


def snapshot(queue: Queue) -> dict[str, Any]:
    """The `data` of a full_state_snapshot."""
    workers = live_workers(queue)
    return {
        "workers": {w["id"]: monitor_worker(w) for w in workers},
        "jobs": job_buckets(queue, SNAPSHOT_LIMIT),
        "system_stats": system_stats(queue, workers),
        "timestamp": timestamp(),
    }


def stats_broadcast(queue: Queue, connections: dict[str, list[str]]) -> dict[str, Any]:
    """The hub-era `stats_broadcast` (the simple monitor rebuilds its whole view from each one)."""
    workers = live_workers(queue)
    buckets = job_buckets(queue, BROADCAST_LIMIT)
    counts = queue.counts()
    by_id = {}
    for w in workers:
        caps = flat_capabilities(w)
        by_id[w["id"]] = {
            "status": w.get("status", "idle"), "connection_status": "connected",
            "is_accepting_jobs": w.get("status") == "idle", "supported_job_types": caps["services"],
            "capabilities": caps, "connected_at": w.get("connected_at"),
            "jobs_processed": w.get("total_jobs_completed", 0) + w.get("total_jobs_failed", 0),
            "last_heartbeat": w.get("last_heartbeat"), "current_job_id": w.get("current_job_id") or None,
        }
    failed = sum(counts.get(s, 0) for s in _BUCKETS["failed"])
    active = sum(counts.get(s, 0) for s in _BUCKETS["active"])
    return {
        "type": "stats_broadcast",
        "connections": {"clients": connections.get("client", []), "workers": sorted(by_id),
                        "monitors": connections.get("monitor", [])},
        "workers": by_id,
        "subscriptions": {"stats": connections.get("monitor", []), "job_notifications": [], "jobs": {}},
        "system": {
            "queues": {"priority": 0, "standard": counts.get("pending", 0),
                       "total": counts.get("pending", 0)},
            "jobs": {"total": sum(counts.values()),
                     "status": {"pending": counts.get("pending", 0), "active": active,
                                "completed": counts.get("completed", 0), "failed": failed},
                     "pending_jobs": buckets["pending"], "active_jobs": buckets["active"],
                     "completed_jobs": buckets["completed"], "failed_jobs": buckets["failed"]},
            "workers": {"total": len(by_id),
                        "status": {"idle": sum(1 for w in workers if w.get("status") == "idle"),
                                   "working": sum(1 for w in workers if w.get("status") == "busy")},
                        "active_workers": [w["id"] for w in workers if w.get("status") == "busy"]},
        },
        "timestamp": timestamp(),
    }


def enricher(keys: Keys) -> Any:
    """Adds to `events` entries what monitors need beyond the entry (one pipelined read per batch). A worker's
    status needs nothing: the script that changes it writes a `worker_status` entry with the status it set."""

    def enrich(client: redis.Redis, entries: list[Entry]) -> None:
        pipe = client.pipeline(transaction=False)
        wants: list[tuple[Entry, str, str]] = []
        for entry in entries:
            event, worker_id = entry.event, entry.fields.get("worker_id", "")
            if event == "submitted":
                pipe.hmget(keys.job(entry.job_id), SUBMIT_FIELDS)
                wants.append((entry, "job", ""))
            elif event == "worker_connected" and worker_id:
                pipe.hgetall(keys.worker(worker_id))
                pipe.ttl(keys.worker_heartbeat(worker_id))
                wants.append((entry, "worker_data", worker_id))
        if not wants:
            return
        replies = iter(pipe.execute())
        now = clock.now_ms()
        for entry, what, worker_id in wants:
            if what == "job":
                values = next(replies)
                fields = {name: value for name, value in zip(SUBMIT_FIELDS, values, strict=True)
                          if value is not None}
                if fields.get("id"):
                    fields.update(status="pending", progress="0", retry_count="0",
                                  updated_at=fields.get("created_at", ""))
                    entry.extra["job"] = summary(fields)
            else:
                fields, ttl = next(replies), next(replies)
                if fields:
                    worker = monitor_worker(public_worker(worker_id, fields, int(ttl), now))
                    entry.extra["worker_data"] = worker

    return enrich
