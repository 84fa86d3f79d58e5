"""What a job is: its statuses, how a submission is checked, and how a stored record reads back."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from appliance.errors import ValidationError

PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 0, 1_000_000, 50
MAX_RETRIES_DEFAULT, MAX_RETRIES_MAX = 3, 100
# No ":" in names: it separates the parts of Redis keys (jobs:pending:{service}:req:{class}).
SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CUSTOMER_MAX = 256


class JobStatus(StrEnum):
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
ACTIVE = frozenset({JobStatus.ASSIGNED, JobStatus.IN_PROGRESS})
STATUS_VALUES = tuple(s.value for s in JobStatus)


def _int(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValidationError(name, f"expected an integer from {lo} to {hi}, got {value!r}")
    if not lo <= value <= hi:
        raise ValidationError(name, f"expected an integer from {lo} to {hi}, got {value}")
    return value


def _object(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise ValidationError(name, f"expected a JSON object, got {type(value).__name__}")
    return value


def _text(body: dict[str, Any], name: str, limit: int) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValidationError(name, f"expected a string, got {type(value).__name__}")
    text = str(value)
    if len(text) > limit:
        raise ValidationError(name, f"expected at most {limit} characters")
    return text


@dataclass(frozen=True)
class JobSpec:
    """A checked submission, ready to be stored."""

    service_required: str
    priority: int = PRIORITY_DEFAULT
    payload: dict[str, Any] = field(default_factory=dict)
    requirements: dict[str, Any] = field(default_factory=dict)
    customer_id: str = ""
    max_retries: int = MAX_RETRIES_DEFAULT
    timeout_seconds: float | None = None
    workflow: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @classmethod
    def parse(cls, body: Any) -> JobSpec:
        """Check a submission body (HTTP JSON or a WebSocket message's job fields).

        `service_required` may also come as `job_type` or `type` (the original's fallbacks). Unknown
        top-level fields are ignored, since WebSocket clients send their message envelope along.

        Raises:
            ValidationError: naming the first field that is wrong and what is expected.
        """
        if not isinstance(body, dict):
            raise ValidationError("body", "expected a JSON object with at least service_required")
        service = body.get("service_required") or body.get("job_type") or body.get("type")
        if service is None or service == "":
            raise ValidationError("service_required", "required: the service that should run the job, "
                                                      "e.g. \"simulation\"")
        if not isinstance(service, str) or not SERVICE_RE.match(service):
            raise ValidationError("service_required", "expected a name of letters, digits, '_', '.' or '-' "
                                                      f"(at most 128), got {service!r}")
        timeout = body.get("timeout_seconds")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 7 * 86400:
                raise ValidationError("timeout_seconds", f"expected a number of seconds above 0, at most 604800, "
                                                         f"got {timeout!r}")
        workflow: dict[str, str] = {}
        for name in ("workflow_id", "workflow_datetime", "step_number"):
            text = _text(body, name, CUSTOMER_MAX)
            if text:
                workflow[name] = text
        wf_priority = body.get("workflow_priority")
        if wf_priority not in (None, "", 0):
            workflow["workflow_priority"] = str(_int(body, "workflow_priority", 0, PRIORITY_MIN, PRIORITY_MAX))
        return cls(
            service_required=service,
            priority=_int(body, "priority", PRIORITY_DEFAULT, PRIORITY_MIN, PRIORITY_MAX),
            payload=_object(body, "payload"),
            requirements=_object(body, "requirements"),
            customer_id=_text(body, "customer_id", CUSTOMER_MAX),
            max_retries=_int(body, "max_retries", MAX_RETRIES_DEFAULT, 0, MAX_RETRIES_MAX),
            timeout_seconds=float(timeout) if timeout is not None else None,
            workflow=workflow,
        )

    def stored_fields(self) -> dict[str, str]:
        """The job hash fields this submission sets (the submit script adds status, times and sequence)."""
        fields = {
            "payload": orjson.dumps(self.payload).decode(),
            "requirements": orjson.dumps(self.requirements).decode(),
            "customer_id": self.customer_id,
            "max_retries": str(self.max_retries),
        }
        if self.timeout_seconds is not None:
            fields["timeout_seconds"] = repr(self.timeout_seconds)
        fields.update(self.workflow)
        return fields


_INT_FIELDS = ("priority", "retry_count", "max_retries", "progress", "attempt", "current_step", "total_steps")
_JSON_FIELDS = ("payload", "requirements", "result")
_HIDDEN = ("seq", "score", "created_ms")


def public_job(fields: dict[str, str]) -> dict[str, Any]:
    """A stored job hash as clients see it: numbers as numbers, JSON fields parsed, empty fields left out."""
    job: dict[str, Any] = {}
    for name, value in fields.items():
        if name in _HIDDEN or value == "":
            continue
        if name in _INT_FIELDS:
            try:
                job[name] = int(value)
            except ValueError:
                job[name] = value
        elif name in _JSON_FIELDS:
            try:
                job[name] = orjson.loads(value)
            except orjson.JSONDecodeError:
                job[name] = value
        elif name == "timeout_seconds":
            job[name] = float(value)
        else:
            job[name] = value
    job.setdefault("progress", 0)
    job["job_type"] = fields.get("service_required", "")
    return job
