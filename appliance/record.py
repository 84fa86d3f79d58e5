"""The stored records, declared once: the job hash (job:{id}), the fields only its stream entries carry, the
worker hash (worker:{id}), and the job statuses.

Each field has its wire type (how readers decode the stored string, appliance.jobs.decode) and who writes it: a
script (`submit_job`), a function of the shared prelude (`_lib.take`), the API at submit (API: the fields of
JobSpec.stored_fields, passed through submit_job) or the worker process (WORKER: the worker hash fields it sends
with register_worker and heartbeat_worker). tests/test_record.py parses the Lua sources and checks every field
they write or read on a job or worker hash against these tables, writers included; the Lua prelude's ACTIVE and
TERMINAL tables are generated from JobStatus (appliance/scripts.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

# Wire types: Redis hashes and stream entries hold strings; readers turn them into these (appliance.jobs.decode).
INT, FLOAT, JSON, BOOL, TIME, LIST, HIDDEN = "int", "float", "json", "bool", "time", "list", "hidden"
TEXT = "text"  # a field no table names reads as text too

API = "api"        # the API at submit (JobSpec.stored_fields), stored by submit_job
WORKER = "worker"  # the worker process (its register/heartbeat fields, a connector's annotations)


class JobStatus(StrEnum):
    """A job's `status` field: the one list of statuses (the Lua prelude's tables are generated from it)."""

    PENDING = "pending"
    ASSIGNED = "assigned"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    UNWORKABLE = "unworkable"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMEOUT})
ACTIVE = frozenset({JobStatus.ASSIGNED, JobStatus.IN_PROGRESS})  # held by a worker under a lease
STATUS_VALUES = tuple(s.value for s in JobStatus)


@dataclass(frozen=True)
class Field:
    name: str
    wire: str                   # INT, FLOAT, JSON, BOOL, TIME, LIST, HIDDEN or TEXT
    writers: tuple[str, ...]    # script names, "_lib.<function>", API, WORKER; () for a field only read
    about: str = ""


def _table(*fields: Field) -> dict[str, Field]:
    return {f.name: f for f in fields}


_HELD = ("_lib.take", "fail_job", "release_job", "_lib.recover_expired")  # who gives or takes the hold

JOB = _table(
    Field("id", TEXT, ("submit_job",), "the job's id"),
    Field("service_required", TEXT, ("submit_job",), "the service that runs it"),
    Field("priority", INT, ("submit_job",), "0..1000000, higher first"),
    Field("seq", HIDDEN, ("submit_job",), "its place in submission order (jobs:seq)"),
    Field("score", HIDDEN, ("submit_job",), "its score in the claim queues: priority, then seq"),
    Field("queue", TEXT, ("submit_job",), "its claim queue key: jobs:pending:{service} or a requirement class's"),
    Field("created_at", TIME, ("submit_job",)),
    Field("created_ms", HIDDEN, ("submit_job",)),
    Field("status", TEXT, ("_lib.set_status",), "a JobStatus; every transition goes through set_status"),
    Field("updated_at", TIME, ("_lib.set_status",)),
    Field("attempt", INT, ("submit_job", "_lib.take"), "counts claims; a held attempt proves the hold"),
    Field("retry_count", INT, ("submit_job", "fail_job", "_lib.recover_expired")),
    Field("worker_id", TEXT, _HELD, "the worker that holds (or last held) it; '' when handed back"),
    Field("assigned_at", TIME, ("_lib.take",)),
    Field("progress", INT, ("submit_job", "progress_job", "complete_jobs", *_HELD), "0..100"),
    Field("message", TEXT, ("_lib.take", "progress_job", "complete_jobs", "fail_job")),
    Field("retry_at", TIME, ("_lib.take", "fail_job", "_lib.recover_expired"), "epoch ms of a retry's turn"),
    Field("started_at", TIME, ("progress_job", "complete_jobs")),
    Field("current_step", INT, ("progress_job",)),
    Field("total_steps", INT, ("progress_job",)),
    Field("result", JSON, ("complete_jobs",)),
    Field("completed_at", TIME, ("complete_jobs",)),
    Field("error", TEXT, ("complete_jobs", "fail_job", "cancel_job", "_lib.end_cancelled", "_lib.recover_expired")),
    Field("error_details", JSON, ("fail_job",), "a failed attempt's structured details from its connector"),
    Field("failed_at", TIME, ("fail_job", "_lib.recover_expired")),
    Field("last_failed_worker", TEXT, ("fail_job", "_lib.recover_expired")),
    Field("cancelled_at", TIME, ("cancel_job", "_lib.end_cancelled")),
    Field("cancel_requested", TIME, (), "read only: a cancel asked of a running job by earlier versions"),
    Field("unworkable_reason", TEXT, ("_lib.make_unworkable", "_lib.revive")),
    Field("unworkable_at", TIME, ("_lib.make_unworkable", "_lib.revive")),
    # the submission (JobSpec.stored_fields)
    Field("payload", JSON, (API,)),
    Field("requirements", JSON, (API,)),
    Field("customer_id", TEXT, (API,)),
    Field("max_retries", INT, (API,)),
    Field("timeout_seconds", FLOAT, (API,)),
    Field("workflow_id", TEXT, (API,)),
    Field("workflow_priority", INT, (API,)),
    Field("workflow_datetime", INT, (API,)),
    Field("step_number", INT, (API,)),
    Field("submitted_by", TEXT, (API,), "the name of the API key that submitted it (API_KEYS); absent without"),
)

# A connector's own fields on its job (annotate_job, through JobContext.annotate): `<service>_...` only, e.g.
# comfyui_prompt_id. Text; their names are the connector's.
ANNOTATION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*_[A-Za-z0-9_]+$")

# Fields only the job's stream entries (progress:{id}, events) carry; the others there are JOB's names (the test
# checks every name `emit` is given against JOB and these).
JOB_EVENT = _table(
    Field("event", TEXT, ("_lib.emit",), "what happened: submitted, assigned, progress, completed, ..."),
    Field("job_id", TEXT, ("_lib.emit",)),
    Field("will_retry", BOOL, ("fail_job", "_lib.recover_expired")),
)

# What a connector reads of the record it runs (JobContext: id, attempt, service, payload, requirements, and
# its own annotations from an earlier attempt).
CONNECTOR_VIEW = ("id", "attempt", "service_required", "payload", "requirements")

_STATE = ("register_worker", "_lib.busy", "_lib.holding")

WORKER_RECORD = _table(
    Field("worker_id", TEXT, ("register_worker",)),
    Field("status", TEXT, _STATE, "idle or busy"),
    Field("current_job_id", TEXT, _STATE, "its latest job ('' when idle)"),
    Field("current_jobs", INT, _STATE, "how many jobs it holds"),
    Field("last_status_change", TIME, _STATE),
    Field("connected_at", TIME, ("register_worker",)),
    Field("last_heartbeat", TIME, ("register_worker", "heartbeat_worker")),
    Field("last_heartbeat_ms", HIDDEN, ("register_worker", "heartbeat_worker")),
    Field("total_jobs_completed", INT, ("register_worker", "complete_jobs")),
    Field("total_jobs_failed", INT, ("register_worker", "fail_job")),
    # sent by the worker process with register_worker and heartbeat_worker
    Field("capabilities", JSON, (WORKER,)),
    Field("telemetry", JSON, (WORKER,), "psutil host figures and its GPU's NVML figures"),
    Field("services_health", JSON, (WORKER,), "service -> its backing service's state (connector.health_info)"),
    Field("services", LIST, (WORKER,)),
    Field("connectors", LIST, (WORKER,)),
    Field("max_concurrent_jobs", INT, (WORKER,)),
    Field("lease_ms", INT, (WORKER,), "the lease of a job handed to it at submit"),
    Field("pid", INT, (WORKER,)),
    Field("hostname", TEXT, (WORKER,)),
    Field("version", TEXT, (WORKER,)),
)

# The wire-type tables the decoders read (appliance.jobs.decode). A job hash and its stream entries share
# JOB_FIELDS (stream-only text fields need no entry).
JOB_FIELDS: dict[str, str] = {name: f.wire for name, f in JOB.items()} | {
    name: f.wire for name, f in JOB_EVENT.items() if f.wire != TEXT}
WORKER_FIELDS: dict[str, str] = {name: f.wire for name, f in WORKER_RECORD.items()}
