"""What a job is: how a submission is checked, and how a stored record reads back (its fields and statuses are
declared in appliance.record)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from appliance import clock, record
from appliance.errors import ValidationError, shown
from appliance.matching import parse_requirements

# The record's names (declared in appliance.record), for the readers that import them from here.
JobStatus = record.JobStatus
ACTIVE, TERMINAL, STATUS_VALUES = record.ACTIVE, record.TERMINAL, record.STATUS_VALUES
INT, FLOAT, JSON, BOOL, TIME, LIST, HIDDEN, TEXT = (record.INT, record.FLOAT, record.JSON, record.BOOL, record.TIME,
                                                    record.LIST, record.HIDDEN, record.TEXT)
JOB_FIELDS, WORKER_FIELDS = record.JOB_FIELDS, record.WORKER_FIELDS

PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 0, 1_000_000, 50
MAX_RETRIES_DEFAULT, MAX_RETRIES_MAX = 3, 100
# No ":" in names: it separates the parts of Redis keys (jobs:pending:{service}:req:{class}). Use fullmatch:
# with match, "$" also matches before a trailing newline. The pattern is also the OpenAPI document's.
SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CUSTOMER_MAX = 256
EPOCH_MS_MAX = 2**53          # workflow_datetime: epoch ms, as JavaScript's Date.now()
STEP_MAX = 1_000_000
TIMEOUT_MAX_S = 7 * 86400
DIGITS_MAX = 20               # a digit string read as an integer (every such field's bound has fewer digits)


def _int(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValidationError(name, f"expected an integer from {lo} to {hi}, got {shown(value)}")
    if not lo <= value <= hi:
        raise ValidationError(name, f"expected an integer from {lo} to {hi}, got {value}")
    return value


def _digits(body: dict[str, Any], name: str) -> dict[str, Any]:
    """`body` with a string of digits under `name` read as the integer it spells (clients that send text)."""
    value = body.get(name)
    if isinstance(value, str) and len(value) > DIGITS_MAX:     # int() of thousands of digits raises, slowly
        raise ValidationError(name, f"expected an integer of at most {DIGITS_MAX} digits, got {shown(value)}")
    # ASCII only: str.isdigit() also takes "²", which int() refuses
    return {name: int(value)} if isinstance(value, str) and value.isascii() and value.isdigit() else body


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
    """A checked submission, ready to be stored.

    Its `requirements` are always their canonical form (appliance.matching.parse_requirements: kinds merged,
    "any" values dropped, names sorted), whoever builds it: that form is stored on the job and decides its
    requirement class, so the record and the class never disagree.
    """

    service_required: str
    priority: int = PRIORITY_DEFAULT
    payload: dict[str, Any] = field(default_factory=dict)
    requirements: dict[str, Any] = field(default_factory=dict)
    customer_id: str = ""
    max_retries: int = MAX_RETRIES_DEFAULT
    timeout_seconds: float | None = None
    workflow: dict[str, str] = field(default_factory=dict)
    submitted_by: str = ""        # the name of the API key that submitted it (never taken from the body)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        """Raises ValidationError naming `requirements.<key>` (see `parse`)."""
        object.__setattr__(self, "requirements", parse_requirements(self.requirements))

    @classmethod
    def parse(cls, body: Any, submitted_by: str = "") -> JobSpec:
        """Check a submission body (HTTP JSON or a WebSocket message's job fields).

        `service_required` may also come as `job_type` or `type` (the original's fallbacks). Unknown
        top-level fields are ignored, since WebSocket clients send their message envelope along (a
        `submitted_by` in the body among them: it is the API's to set, from the caller's key).

        Raises:
            ValidationError: naming the first field that is wrong and what is expected.
        """
        if not isinstance(body, dict):
            raise ValidationError("body", "expected a JSON object with at least service_required")
        service = body.get("service_required") or body.get("job_type") or body.get("type")
        if service is None or service == "":
            raise ValidationError("service_required", "required: the service that should run the job, "
                                                      "e.g. \"simulation\"")
        if not isinstance(service, str) or not SERVICE_RE.fullmatch(service):
            raise ValidationError("service_required", "expected a name of letters, digits, '_', '.' or '-' "
                                                      f"(at most 128), got {shown(service)}")
        timeout = body.get("timeout_seconds")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                    or not 0 < timeout <= TIMEOUT_MAX_S:
                raise ValidationError("timeout_seconds", "expected a number of seconds above 0, at most "
                                                         f"{TIMEOUT_MAX_S}, got {shown(timeout)}")
        workflow: dict[str, str] = {}
        workflow_id = _text(body, "workflow_id", CUSTOMER_MAX)
        if workflow_id:
            workflow["workflow_id"] = workflow_id
        for name, hi in (("workflow_datetime", EPOCH_MS_MAX), ("step_number", STEP_MAX)):
            if body.get(name) not in (None, ""):
                workflow[name] = str(_int(_digits(body, name), name, 0, 0, hi))
        # the Next.js monitor sends a blank "W. Priority" as 0: unset, as the original's `|| priority` read it
        if body.get("workflow_priority") not in (None, "", 0, "0"):
            workflow["workflow_priority"] = str(_int(_digits(body, "workflow_priority"), "workflow_priority", 0,
                                                     PRIORITY_MIN, PRIORITY_MAX))
        return cls(
            service_required=service,
            priority=_int(body, "priority", PRIORITY_DEFAULT, PRIORITY_MIN, PRIORITY_MAX),
            payload=_object(body, "payload"),
            requirements=body.get("requirements", {}),  # checked and made canonical by __post_init__
            customer_id=_text(body, "customer_id", CUSTOMER_MAX),
            max_retries=_int(body, "max_retries", MAX_RETRIES_DEFAULT, 0, MAX_RETRIES_MAX),
            timeout_seconds=float(timeout) if timeout is not None else None,
            workflow=workflow,
            submitted_by=submitted_by,
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
        if self.submitted_by:
            fields["submitted_by"] = self.submitted_by
        return fields


# -- stored record → wire -------------------------------------------------------------------------------------
# Redis hashes and stream entries hold strings. Every reader turns them into their wire types here, through
# the tables appliance.record declares (JOB_FIELDS, WORKER_FIELDS); a field not named there is text. A stored
# value that does not read as its declared type (a ComfyUI step label in current_step, say) is left out rather
# than sent in another type.
_MISSING = object()

ORJSON_MAX_DEPTH = 254   # orjson refuses to write values nested deeper than this (tests pin it)
RENDER_DEPTH = 128       # a stored JSON value nested deeper is shown as a marker (its message must still be written)


def json_depth_within(value: Any, limit: int, text: str | bytes | None = None) -> bool:
    """Whether `value` (parsed JSON) nests at most `limit` arrays/objects deep.

    `text`, the JSON it was parsed from, answers at once when it holds no more brackets than `limit`. Otherwise
    orjson decides at C speed: wrapped in `ORJSON_MAX_DEPTH - limit` lists, the value can be written exactly
    when it is nested at most `limit` deep."""
    if text is not None:
        opening = (b"[", b"{") if isinstance(text, bytes) else ("[", "{")
        if text.count(opening[0]) + text.count(opening[1]) <= limit:  # type: ignore[arg-type]
            return True
    wrapped = value
    for _ in range(ORJSON_MAX_DEPTH - limit):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        return "Recursion limit" not in str(exc)
    return True


def unrenderable(reason: str) -> dict[str, str]:
    """What clients see in place of a stored object that cannot be written back (never an error)."""
    return {"_unrenderable": reason}


def _value(kind: str, text: str) -> Any:
    """One stored string as its wire type, or _MISSING if it does not read as one."""
    try:
        if kind == INT:
            return int(text)
        if kind == FLOAT:
            return float(text)
        if kind == JSON:
            value = orjson.loads(text)
            if not json_depth_within(value, RENDER_DEPTH, text):
                return unrenderable(f"stored value nested deeper than {RENDER_DEPTH} levels; not shown")
            return value
        if kind == BOOL:
            return {"true": True, "1": True, "false": False, "0": False}[text]
        if kind == LIST:
            return [part for part in text.split(",") if part]
        if kind == TIME:   # stored as ISO 8601 UTC, or as epoch ms (retry_at)
            return clock.iso(int(text)) if text.isdigit() else text
    except (ValueError, KeyError, orjson.JSONDecodeError):
        return _MISSING
    return text


def decode(fields: dict[str, str], table: dict[str, str]) -> dict[str, Any]:
    """Stored fields in their wire types by `table`; hidden fields and empty values (except lists) left out."""
    out: dict[str, Any] = {}
    for name, text in fields.items():
        kind = table.get(name, "")
        if kind == HIDDEN or (text == "" and kind != LIST):
            continue
        value = _value(kind, text)
        if value is not _MISSING:
            out[name] = value
    return out


def public_job(fields: dict[str, str]) -> dict[str, Any]:
    """A stored job hash as clients see it (JOB_FIELDS), with `progress` always and `job_type` as the original's
    alias of service_required."""
    job = decode(fields, JOB_FIELDS)
    job.setdefault("progress", 0)
    job["job_type"] = fields.get("service_required", "")
    return job


def public_worker(worker_id: str, fields: dict[str, str], heartbeat_ttl_s: int, now_ms: int) -> dict[str, Any]:
    """A worker hash as clients see it (WORKER_FIELDS), with `alive`, `heartbeat_ttl_s` and `heartbeat_age_s`
    (seconds) from its heartbeat."""
    worker: dict[str, Any] = {"id": worker_id, **decode(fields, WORKER_FIELDS)}
    worker["alive"] = heartbeat_ttl_s > 0
    worker["heartbeat_ttl_s"] = max(heartbeat_ttl_s, 0)
    beat = fields.get("last_heartbeat_ms", "")
    worker["heartbeat_age_s"] = round((now_ms - int(beat)) / 1000, 3) if beat.isdigit() else None
    return worker
