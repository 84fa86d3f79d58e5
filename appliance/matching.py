"""Job requirements: how they are checked at submit, which worker can serve them, and requirement classes.

A job with requirements (or a customer id) lives in the claim queue of its *requirement class*: all jobs of
one service with the same canonical requirements and customer share one queue,
`jobs:pending:{service}:req:{sha1}`. Each class is recorded in Redis (`jobs:class:{id}`, listed in
`jobs:classes:{service}`), and each worker works out in Python which classes it can serve; the claim script
reads only those queues, so jobs a worker cannot serve cost its claim nothing, however many.

Requirement kinds (the original system's, with unknown keys refused instead of silently matched):

- `gpu_memory_gb`, `gpu_count`, `cpu_cores`, `ram_gb`: the worker's hardware must have at least this much;
  `"all"` means any.
- `gpu_memory_free_gb`: free memory on the worker's GPU, judged from its latest heartbeat.
- `gpu_model`: a name or list of names; the worker's GPU name must contain one of them (case-insensitive).
- `models`: a name or list; the worker must have all of them for the job's service.
- `customer_isolation`: `strict` needs a worker whose isolation is strict (`loose` asks nothing). Workers'
  `allowed_customers` / `denied_customers` always apply to the job's `customer_id`.
- custom capabilities: any key with a dot is a path into the worker's capabilities (`custom.region`,
  `hardware.gpu_count`, `metadata.platform`). A list asks for all its items; a worker-side list means
  "contains"; a number means at least; anything else must be equal.
- `positive_requirements`: an object of the same kinds, merged with the top-level ones.
- `negative_requirements`: an object of the same kinds; a worker that meets any one of them is excluded.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

from appliance.errors import ValidationError, shown
from appliance.settings import WorkerProfile as WorkerProfile  # parsed with the worker's settings

AT_LEAST = ("gpu_memory_gb", "gpu_count", "cpu_cores", "ram_gb", "gpu_memory_free_gb")
NAMES = ("gpu_model", "models")
KINDS = (*AT_LEAST, *NAMES, "customer_isolation")
GROUPS = ("positive_requirements", "negative_requirements")
MAX_KEYS = 64
MAX_NUMBER = 1_000_000_000
MAX_NAMES = 256            # names in one `models` / `gpu_model` list, or items in a custom list
NAME_CHARS = 256           # one name or custom text value
REASON_CHARS = 512         # an unworkable reason (stored on each job, sent in events, logged)
REASON_NAMES = 3           # names a reason lists before "and N more"
_SEGMENT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# -- parsing -------------------------------------------------------------------------------------------------
def parse_requirements(raw: Any) -> dict[str, Any]:
    """Check a job's `requirements` and return their canonical form (kinds merged, "any" values dropped).

    Raises:
        ValidationError: naming `requirements.<key>` (or the group it is in) and what is expected.
    """
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, dict):
        raise ValidationError("requirements", f"expected a JSON object, got {type(raw).__name__}")
    if len(raw) > MAX_KEYS:
        raise ValidationError("requirements", f"at most {MAX_KEYS} keys")
    positive = _parse_group({k: v for k, v in raw.items() if k not in GROUPS}, "requirements")
    group = raw.get("positive_requirements")
    if group is not None:
        if not isinstance(group, dict):
            raise ValidationError("requirements.positive_requirements", "expected a JSON object")
        positive.update(_parse_group(group, "requirements.positive_requirements"))
    group = raw.get("negative_requirements")
    if group is not None:
        if not isinstance(group, dict):
            raise ValidationError("requirements.negative_requirements", "expected a JSON object")
        negative = _parse_group(group, "requirements.negative_requirements")
        if negative:
            positive["negative_requirements"] = negative
    return positive


def _parse_group(group: dict[str, Any], where: str) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for key, value in group.items():
        name = f"{where}.{key}"
        if not isinstance(key, str) or not key:
            raise ValidationError(where, "requirement names must be non-empty strings")
        if key in GROUPS:
            raise ValidationError(name, "positive/negative requirement groups cannot be nested")
        if key in AT_LEAST:
            number = _number(value, name)
            if number is not None:
                parsed[key] = number
        elif key in NAMES:
            names = _names(value, name)
            if names:
                parsed[key] = names
        elif key == "customer_isolation":
            if value not in ("strict", "loose"):
                raise ValidationError(name, f"expected \"strict\" or \"loose\", got {shown(value)}")
            if value == "strict":
                parsed[key] = value
        elif "." in key:
            segments = key.split(".")
            if len(segments) > 8 or not all(_SEGMENT.fullmatch(s) for s in segments):
                raise ValidationError(name, "a custom capability is a dot path of at most 8 names of "
                                            "letters, digits, '_' or '-'")
            parsed[key] = _custom_value(value, name)
        else:
            raise ValidationError(name, "unknown requirement; expected one of " + ", ".join(KINDS + GROUPS)
                                  + ", or a custom capability as a dot path into the worker's capabilities "
                                    "(e.g. custom.region)")
    return parsed


def _number(value: Any, name: str) -> float | int | None:
    if value == "all":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_NUMBER:
        raise ValidationError(name, f"expected a number from 0 to {MAX_NUMBER} or \"all\", got {shown(value)}")
    return int(value) if float(value).is_integer() else float(value)


def _names(value: Any, name: str) -> list[str]:
    if value == "all":
        return []
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list) and len(items) > MAX_NAMES:
        raise ValidationError(name, f"at most {MAX_NAMES} names, got {len(items)}")
    if not isinstance(items, list) or not all(isinstance(i, str) and 0 < len(i) <= NAME_CHARS for i in items):
        raise ValidationError(name, f"expected a name (at most {NAME_CHARS} characters) or a list of names, got "
                                    f"{shown(value)}")
    return sorted(set(items))


def _custom_value(value: Any, name: str) -> Any:
    scalar = (str, int, float, bool)
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_NAMES:
        raise ValidationError(name, f"at most {MAX_NAMES} items, got {len(items)}")
    if all(isinstance(i, scalar) and not (isinstance(i, str) and len(i) > NAME_CHARS) for i in items):
        return value
    raise ValidationError(name, f"expected a string (at most {NAME_CHARS} characters), number, boolean or a list "
                                f"of them, got {shown(value)}")


# -- classes -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequirementClass:
    """Jobs of one service with the same canonical requirements and customer, sharing one claim queue."""

    id: str
    service: str
    requirements: dict[str, Any]
    customer_id: str
    queue: str

    def record(self) -> str:
        return orjson.dumps({"id": self.id, "service": self.service, "requirements": self.requirements,
                             "customer_id": self.customer_id, "queue": self.queue},
                            option=orjson.OPT_SORT_KEYS).decode()

    @classmethod
    def from_record(cls, text: str) -> RequirementClass:
        data = orjson.loads(text)
        return cls(str(data["id"]), str(data["service"]), dict(data["requirements"]),
                   str(data.get("customer_id") or ""), str(data["queue"]))


def class_id(service: str, requirements: dict[str, Any], customer_id: str) -> str | None:
    """The class of a job, or None when it has neither requirements nor a customer (its service's queue)."""
    if not requirements and not customer_id:
        return None
    canonical = orjson.dumps({"service": service, "requirements": requirements, "customer_id": customer_id},
                             option=orjson.OPT_SORT_KEYS)
    return hashlib.sha1(canonical).hexdigest()


# -- matching ------------------------------------------------------------------------------------------------
def listed(names: list[str]) -> str:
    """Names as a reason quotes them: the first few, then how many more."""
    head = ", ".join(shown(name, 40) for name in names[:REASON_NAMES])
    more = len(names) - REASON_NAMES
    return f"[{head}{f' and {more} more' if more > 0 else ''}]"


def clip_reason(reason: str, limit: int = REASON_CHARS) -> str:
    """A reason cut to `limit` characters (it is stored on every job of a class, sent and logged)."""
    return reason if len(reason) <= limit else reason[:limit - 12] + "… (cut)"


def mismatch(service: str, requirements: dict[str, Any], customer_id: str, capabilities: dict[str, Any],
             live: dict[str, Any] | None = None) -> str | None:
    """Why a worker with these capabilities cannot serve such a job, or None if it can.

    Args:
        live: the worker's latest telemetry, for `gpu_memory_free_gb`. None judges whether it could *ever*
            serve the job: free memory is then compared with the GPU's total memory.
    """
    if service not in (capabilities.get("services") or []):
        return f"does not offer service {service!r}"
    access = capabilities.get("customer_access") or {}
    allowed, denied = access.get("allowed_customers") or [], access.get("denied_customers") or []
    if allowed and customer_id not in allowed:
        return f"customer {customer_id or '(none)'!r} is not in its allowed_customers"
    if customer_id and customer_id in denied:
        return f"customer {customer_id!r} is in its denied_customers"
    for kind, want in requirements.items():
        if kind == "negative_requirements":
            continue
        reason = _unmet(kind, want, service, capabilities, live)
        if reason:
            return reason
    for kind, want in (requirements.get("negative_requirements") or {}).items():
        if _unmet(kind, want, service, capabilities, live) is None:
            return f"meets negative requirement {kind}={shown(want, 120)}"
    return None


def _unmet(kind: str, want: Any, service: str, caps: dict[str, Any],
           live: dict[str, Any] | None) -> str | None:
    hardware = caps.get("hardware") or {}
    if kind == "gpu_memory_free_gb":
        if live is None:
            have = _as_float(hardware.get("gpu_memory_gb"))
            return None if have >= want else f"gpu_memory_gb {have:g} < {want:g} (free memory asked)"
        gpu = live.get("gpu") or {}
        free = gpu.get("memory_free_gb")
        if not isinstance(free, (int, float)) or isinstance(free, bool):
            return "free GPU memory unknown (no GPU figures in its latest heartbeat)"
        return None if free >= want else f"gpu_memory_free_gb {free:g} < {want:g}"
    if kind in AT_LEAST:
        have = _as_float(hardware.get(kind))
        return None if have >= want else f"{kind} {have:g} < {want:g}"
    if kind == "gpu_model":
        model = str(hardware.get("gpu_model") or "")
        if any(name.lower() in model.lower() for name in want) and model:
            return None
        return f"gpu_model {shown(model or '(none)')} is not one of {listed(want)}"
    if kind == "models":
        models = caps.get("models") or {}
        held = set(models.get(service) or []) if isinstance(models, dict) else set(models)
        missing = [m for m in want if m not in held]
        return f"lacks models {listed(missing)}" if missing else None
    if kind == "customer_isolation":
        isolation = (caps.get("customer_access") or {}).get("isolation", "loose")
        return None if isolation == "strict" else f"customer isolation is {isolation!r}, strict asked"
    return _unmet_custom(kind, want, caps)


def _unmet_custom(path: str, want: Any, caps: dict[str, Any]) -> str | None:
    node: Any = caps
    for segment in path.split("."):
        if not isinstance(node, dict) or segment not in node:
            return f"has no capability {path}"
        node = node[segment]
    if _custom_ok(want, node):
        return None
    return f"capability {path}={shown(node, 120)} does not satisfy {shown(want, 120)}"


def _custom_ok(want: Any, have: Any) -> bool:
    if isinstance(want, list):
        return all(_custom_ok(item, have) for item in want)
    if isinstance(have, list):
        return want in have
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return isinstance(have, (int, float)) and not isinstance(have, bool) and have >= want
    return bool(want == have)


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError):
            return 0.0
    return float(value)
