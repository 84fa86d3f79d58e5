"""The job and worker records against their one declaration (appliance/record.py).

The Lua sources are parsed: every field a script or a prelude function writes or reads on a job hash or a worker
hash must be declared, and the declared writers must be exactly the units (script bodies, `_lib.<function>`) that
write it. The API's and the worker's own fields are checked at their source (JobSpec.stored_fields, the worker's
register and heartbeat fields). Statuses: JobStatus is the one list; the Lua prelude's tables come from it and
every status a script sets or compares with is one of it.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from appliance import record
from appliance.api import messages, monitor
from appliance.jobs import JobSpec, public_job
from appliance.record import API, JOB, JOB_EVENT, WORKER, WORKER_RECORD, JobStatus
from appliance.scripts import SCRIPT_NAMES, prelude

LUA = resources.files("appliance") / "lua"
ROOT = Path(__file__).resolve().parent.parent

# Expressions that name a job hash or a worker hash in the Lua sources.
JOB_KEY = re.compile(r"^(P_JOB \.\. \w+|job_key)$")
WORKER_KEY = re.compile(r"^(P_WORKER \.\. \w+|worker_key)$")
LITERAL = re.compile(r"^'([^']*)'$")


# -- a small Lua reader: enough for the calls the scripts make ---------------------------------------------------
def _outside_strings(text: str) -> Iterator[tuple[int, str, int]]:
    """(index, character, bracket depth) of each character of `text` outside string literals."""
    depth, quote = 0, ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
            continue
        if ch in ")}]":
            depth -= 1
        yield i, ch, depth
        if ch in "({[":
            depth += 1


def split_args(text: str) -> list[str]:
    """The top-level, comma-separated parts of an argument list (strings and brackets respected)."""
    parts, start = [], 0
    for i, ch, depth in _outside_strings(text):
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def calls(source: str, name: str) -> list[list[str]]:
    """The arguments of every call `name(...)` in `source` (not definitions)."""
    found = []
    for match in re.finditer(rf"(?<![\w.]){re.escape(name)}\(", source):
        if source[max(0, match.start() - 9):match.start()] == "function ":
            continue
        rest = source[match.end():]
        end = next(i for i, _, depth in _outside_strings(rest) if depth < 0)
        found.append(split_args(rest[:end]))
    return found


def table_names(table: str) -> list[str]:
    """The field names of a `{ 'name', value, 'name', value, ..., unpack(x) }` table."""
    items = split_args(table.strip()[1:-1])
    names = []
    for n in range(0, len(items), 2):
        literal = LITERAL.match(items[n])
        if literal is None:
            assert items[n].startswith("unpack"), f"not a name: {items[n]} in {table}"
            break
        names.append(literal.group(1))
    return names


def _strip_comments(source: str) -> str:
    return "\n".join(line.split("--", 1)[0] if "'--" not in line else line for line in source.splitlines())


def units() -> dict[str, str]:
    """Each script's code by name, and each function of _lib.lua as `_lib.<name>`."""
    lib = _strip_comments((LUA / "_lib.lua").read_text())
    out = {}
    for match in re.finditer(r"^local function (\w+)\(.*?^end$", lib, re.S | re.M):
        out[f"_lib.{match.group(1)}"] = match.group(0)
    for name in SCRIPT_NAMES:
        out[name] = _strip_comments((LUA / f"{name}.lua").read_text())
    return out


def hash_fields(code: str, key: re.Pattern[str]) -> tuple[set[str], set[str]]:
    """(written, read) field names of the hashes whose key expression `key` matches."""
    written: set[str] = set()
    read: set[str] = set()
    for args in calls(code, "redis.call"):
        command = LITERAL.match(args[0])
        if not command or len(args) < 3 or not key.match(args[1]):
            continue
        names = [m.group(1) for a in args[2:] if (m := LITERAL.match(a))]
        verb = command.group(1)
        if verb == "HSET":
            written |= {LITERAL.match(a).group(1) for a in args[2::2] if LITERAL.match(a)}  # type: ignore[union-attr]
        elif verb == "HINCRBY":
            written |= set(names[:1])  # count() passes its field as a variable: see below
        elif verb in ("HGET", "HMGET"):
            read |= set(names)
    for args in calls(code, "count"):  # count(worker_key, field): HINCRBY on a registered worker
        if key.match(args[0]):
            written.add(LITERAL.match(args[1]).group(1))  # type: ignore[union-attr]
    return written, read


def job_writes(code: str) -> set[str]:
    """Fields a unit writes on a job hash: its HSETs, and the field tables it hands to set_status."""
    written, _ = hash_fields(code, JOB_KEY)
    for args in calls(code, "set_status"):
        if len(args) > 4:
            written |= set(table_names(args[4]))
            if "unpack(fields)" in args[4]:  # names appended to that list by the script (submit_job's queue)
                written |= set(re.findall(r"fields\[#fields \+ 1\] = '(\w+)'", code))
    return written


def writers(key: re.Pattern[str], extra: bool) -> tuple[dict[str, set[str]], set[str]]:
    """field -> the units that write it, and every field read, for the hashes `key` matches."""
    by_field: dict[str, set[str]] = defaultdict(set)
    read_any: set[str] = set()
    for unit, code in units().items():
        written, read = hash_fields(code, key)
        if extra:
            written = job_writes(code)
        for name in written:
            by_field[name].add(unit)
        read_any |= read
    return by_field, read_any


# -- the job hash ----------------------------------------------------------------------------------------------
def test_every_job_field_a_script_writes_or_reads_is_declared_with_its_writers() -> None:
    written, read = writers(JOB_KEY, extra=True)
    assert set(written) | read <= set(JOB), "declare these in appliance/record.py JOB"
    declared = {name: set(f.writers) - {API, WORKER} for name, f in JOB.items()}
    assert dict(written) == {name: units for name, units in declared.items() if units}
    # the fields read on a job hash are ones somebody writes (or ones kept for records of earlier versions)
    assert read <= {name for name, f in JOB.items() if f.writers or "read only" in f.about}


def test_the_parser_sees_what_it_checks() -> None:
    """The Lua reader finds the writes it must (so that the test above can fail)."""
    written, read = writers(JOB_KEY, extra=True)
    assert written["attempt"] == {"submit_job", "_lib.take"}
    assert written["queue"] == {"submit_job"} and "status" in written and "cancel_requested" in read
    assert "unworkable_reason" in written and "error_details" in written
    w_written, w_read = writers(WORKER_KEY, extra=False)
    assert w_written["total_jobs_failed"] == {"register_worker", "fail_job"}
    assert {"lease_ms", "max_concurrent_jobs", "last_heartbeat_ms"} <= w_read


def test_every_stream_field_a_script_emits_is_declared() -> None:
    names: set[str] = set()
    for code in units().values():
        for args in calls(code, "emit"):
            names |= set(table_names(args[1]))
    lib = (LUA / "_lib.lua").read_text()
    names |= set(table_names("{" + re.search(r"'\*',\s*('job_id'.*?unpack)", lib, re.S).group(1) + "}"))  # type: ignore[union-attr]
    assert "will_retry" in names and "event" in names
    assert names <= set(JOB) | set(JOB_EVENT)


def test_the_api_writes_the_submission_fields() -> None:
    body = {"service_required": "simulation", "priority": 5, "payload": {"a": 1}, "requirements": {},
            "customer_id": "c", "max_retries": 2, "timeout_seconds": 3, "workflow_id": "w",
            "workflow_priority": 7, "workflow_datetime": 1, "step_number": 2}
    fields = JobSpec.parse(body, submitted_by="alice").stored_fields()
    assert set(fields) == {name for name, f in JOB.items() if API in f.writers}


def test_public_job_and_the_wire_tables_come_from_the_declaration() -> None:
    assert record.JOB_FIELDS == {**{n: f.wire for n, f in JOB.items()},
                                 **{n: f.wire for n, f in JOB_EVENT.items() if f.wire != record.TEXT}}
    assert record.WORKER_FIELDS == {n: f.wire for n, f in WORKER_RECORD.items()}
    stored = {name: "1" for name in JOB} | {"status": "pending", "payload": "{}", "result": "{}",
                                             "requirements": "{}", "error_details": "{}", "created_at": "x"}
    shown = public_job(stored)
    assert set(shown) == {n for n, f in JOB.items() if f.wire != record.HIDDEN} | {"job_type"}
    assert set(monitor.SUMMARY_FIELDS) <= set(JOB)
    assert set(record.CONNECTOR_VIEW) <= set(JOB)


def test_a_connector_reads_only_declared_fields() -> None:
    """JobContext and the connectors read the record by these names: declared ones, or their own annotations."""
    sources = [ROOT / "appliance" / "connector.py", *sorted((ROOT / "connectors").glob("*.py"))]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Subscript) and isinstance(node.value, (ast.Name, ast.Attribute)) \
                    and getattr(node.value, "id", getattr(node.value, "attr", "")) == "fields" \
                    and isinstance(node.slice, ast.Constant):
                name = node.slice.value
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "fields" \
                    and node.args and isinstance(node.args[0], ast.Constant):
                name = node.args[0].value
            if name is not None:
                assert name in JOB or record.ANNOTATION_RE.match(name), (path.name, name)


# -- the worker hash --------------------------------------------------------------------------------------------
def test_every_worker_field_a_script_writes_or_reads_is_declared_with_its_writers() -> None:
    written, read = writers(WORKER_KEY, extra=False)
    assert set(written) | read <= set(WORKER_RECORD), "declare these in appliance/record.py WORKER_RECORD"
    declared = {name: set(f.writers) - {WORKER} for name, f in WORKER_RECORD.items()}
    assert dict(written) == {name: units for name, units in declared.items() if units}


def test_the_worker_process_writes_its_declared_fields() -> None:
    """The field dicts the worker sends with register_worker and heartbeat_worker (appliance/worker.py)."""
    sent: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / "appliance" / "worker.py").read_text())):
        if isinstance(node, ast.Dict) and node.keys and all(isinstance(k, ast.Constant) for k in node.keys):
            names = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if "capabilities" in names and "telemetry" in names:
                sent |= names
    assert sent == {name for name, f in WORKER_RECORD.items() if WORKER in f.writers}


# -- statuses ----------------------------------------------------------------------------------------------------
def test_the_prelude_status_tables_come_from_jobstatus() -> None:
    text = prelude()
    tables = {name: set(re.findall(r"(\w+) = true", body))
              for name, body in re.findall(r"^local (ACTIVE|TERMINAL) = (\{.*\})$", text, re.M)}
    assert tables == {"ACTIVE": {s.value for s in record.ACTIVE}, "TERMINAL": {s.value for s in record.TERMINAL}}
    assert "local ACTIVE" not in (LUA / "_lib.lua").read_text()
    assert "local TERMINAL" not in (LUA / "_lib.lua").read_text()


def test_every_status_a_script_sets_or_compares_is_a_jobstatus() -> None:
    used: set[str] = set()
    for code in units().values():
        for args in calls(code, "set_status"):
            used |= {m.group(1) for a in args[1:3] if (m := LITERAL.match(a))}
        for args in calls(code, "retire") + calls(code, "end_cancelled"):
            used |= {m.group(1) for a in args[1:2] if (m := LITERAL.match(a))}
        used |= set(re.findall(r"(?:status|job\[1\]|j\[1\]|job\[3\]|done\[1\]|final)\s*[~=]=\s*'(\w+)'", code))
    assert {"pending", "assigned", "in_progress", "unworkable", "completed", "cancelled"} <= used
    assert used <= set(record.STATUS_VALUES)


def test_the_api_uses_jobstatus() -> None:
    assert messages.TERMINAL_EVENTS == {s.value for s in record.TERMINAL}
    assert messages.FAILED_EVENTS == {s.value for s in record.TERMINAL} - {"completed"}
    bucketed = [s for group in monitor._BUCKETS.values() for s in group]
    assert sorted(bucketed) == sorted(JobStatus) and len(bucketed) == len(set(bucketed))
    assert record.TERMINAL <= {*monitor._BUCKETS["completed"], *monitor._BUCKETS["failed"]}


@pytest.mark.parametrize("name", sorted(JOB))
def test_each_job_field_is_described_enough(name: str) -> None:
    field = JOB[name]
    assert field.wire in (record.INT, record.FLOAT, record.JSON, record.BOOL, record.TIME, record.LIST,
                          record.HIDDEN, record.TEXT)
    assert field.writers or "read only" in field.about
