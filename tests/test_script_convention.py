"""The script calling convention, in one place: PRELUDE_SLOTS (appliance/scripts.py) ↔ the generated prelude ↔
each script's header (its `-- KEYS name` / `-- ARGV name` lines) ↔ the `Scripts._run` call sites.

Nothing counts positions by hand: no script or prelude function indexes KEYS or ARGV with a number or an offset
of its own, every slot a header declares is used, and every call passes its script's slots by those names."""

from __future__ import annotations

import ast
import re
from importlib import resources
from pathlib import Path

import pytest
import redis

from appliance import scripts as scripts_module
from appliance.keys import Keys
from appliance.scripts import (
    ARG,
    CALL_ARGS,
    FIXED_ARGS,
    FIXED_KEYS,
    KEY,
    PRELUDE_SLOTS,
    SCRIPT_NAMES,
    Scripts,
    load_source,
    prelude,
    script_locals,
    script_slots,
)
from appliance.settings import QueueSettings

LUA = resources.files("appliance") / "lua"
ROOT = Path(__file__).resolve().parent.parent


def _source(name: str) -> str:
    return (LUA / f"{name}.lua").read_text()


def _body(name: str) -> str:
    """A script's code after its header, comments left out."""
    lines = _source(name).splitlines()
    start = next(n for n, line in enumerate(lines) if not line.startswith("--"))
    return "\n".join(line.split("--", 1)[0] for line in lines[start:])


def test_the_lua_folder_holds_exactly_the_scripts() -> None:
    found = {p.name[:-4] for p in LUA.iterdir() if p.name.endswith(".lua")}
    assert found == {*SCRIPT_NAMES, "_lib"}


def test_the_prelude_binds_every_slot_in_table_order() -> None:
    bound = re.findall(r"^local (\w+) = (tonumber\()?(KEYS|ARGV)\[(\d+)\]", prelude(), re.M)
    assert [name for name, *_ in bound] == [s.name for s in PRELUDE_SLOTS]
    for kind in (KEY, ARG):
        slots = [s for s in PRELUDE_SLOTS if s.kind == kind]
        rows = [row for row in bound if row[2] == kind]
        assert [int(row[3]) for row in rows] == list(range(1, len(slots) + 1))
        assert [bool(row[1]) for row in rows] == [s.number for s in slots]
    assert FIXED_ARGS[-len(CALL_ARGS):] == CALL_ARGS  # each call appends these after the bound ones
    assert len(FIXED_KEYS) == 9 and len(FIXED_ARGS) == 20


def test_scripts_bind_every_prelude_value_by_name(client: redis.Redis, settings: QueueSettings) -> None:
    s = Scripts(client, Keys("p:"), settings)
    assert s._fixed_keys[FIXED_KEYS.index("K_LEASES")] == "p:jobs:leases"
    assert s._fixed_keys[FIXED_KEYS.index("K_ACTIVE")] == "p:workers:active"
    assert s._fixed_args[FIXED_ARGS.index("P_JOB")] == "p:job:"
    assert s._fixed_args[FIXED_ARGS.index("S_HEARTBEAT")] == ":heartbeat"
    assert len(s._fixed_args) == len(FIXED_ARGS) - len(CALL_ARGS)


def test_no_lua_source_counts_positions_by_hand() -> None:
    for name in (*SCRIPT_NAMES, "_lib"):
        source = _source(name)
        assert "FIRST_KEY" not in source and "FIRST_ARG" not in source, name
        assert not re.search(r"\b(KEYS|ARGV)\[\s*\d", source), name  # KEYS[10], ARGV[21 .. 18+2n], ...
        assert not re.search(r"^local (K|P|S)_\w+ =", source, re.M), name  # the prelude's are generated
    assert not re.search(r"\b(KEYS|ARGV)\b", _lib_code_without(("offer",))), "only offer() reads KEYS/ARGV"


def _lib_code_without(functions: tuple[str, ...]) -> str:
    lib = "\n".join(line.split("--", 1)[0] for line in _source("_lib").splitlines())
    for name in functions:
        lib = re.sub(rf"^local function {name}\(.*?^end$", "", lib, flags=re.S | re.M)
    return lib


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_each_header_declares_slots_its_body_uses(name: str) -> None:
    keys, args = script_slots(_source(name))
    body = _body(name)
    prelude_names = {s.name for s in PRELUDE_SLOTS}
    for slot in (*keys, *args):
        local = f"{slot.name}_at" if slot.rest else slot.name
        assert re.search(rf"\b{local}\b", body), f"{name}: {slot.kind} {slot.name} is declared but not used"
        assert slot.name not in prelude_names
        assert not (slot.number and (slot.optional or slot.rest)), f"{name}: {slot.name}"
    assert len({s.name for s in (*keys, *args)}) == len(keys) + len(args)
    # the header's slot lines are the only ones that name slots: a line that looks like one must parse
    for line in _source(name).splitlines():
        if re.match(r"^-- (KEYS|ARGV)\b", line):
            assert scripts_module._HEADER_SLOT.match(line), line


def test_the_generated_locals_follow_the_prelude() -> None:
    text = script_locals(_source("submit_job"))
    assert text.splitlines()[:2] == ["local job_key = KEYS[10]", "local queue_key = KEYS[11]"]
    assert "local class_key = KEYS[17]" in text and "local priority = tonumber(ARGV[23])" in text
    assert text.splitlines()[-1] == "local fields_at = 27"
    claim = script_locals(_source("claim_job")).splitlines()
    assert claim == ["local version_key = KEYS[10]", "local queues_at = 11", "local worker_id = ARGV[21]",
                     "local want = tonumber(ARGV[22])", "local lease_ms = tonumber(ARGV[23])", "local services_at = 24"]


def test_a_header_slot_out_of_order_is_refused() -> None:
    with pytest.raises(ValueError):
        script_slots("-- KEYS a?\n-- KEYS b\nreturn 1\n")
    with pytest.raises(ValueError):
        script_slots("-- ARGV rest...\n-- ARGV b\nreturn 1\n")


# -- the call sites ----------------------------------------------------------------------------------------------
def _dict_names(node: ast.expr, function: ast.FunctionDef) -> set[str]:
    """The string keys a dict argument can hold: a literal, or a local built from literals (with `|=`)."""
    if isinstance(node, ast.Dict):
        return {k.value for k in node.keys if isinstance(k, ast.Constant)}
    assert isinstance(node, ast.Name), ast.dump(node)
    names: set[str] = set()
    for stmt in ast.walk(function):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] \
            if isinstance(stmt, (ast.AugAssign, ast.AnnAssign)) else []
        if any(isinstance(t, ast.Name) and t.id == node.id for t in targets) and isinstance(stmt.value, ast.Dict):
            names |= _dict_names(stmt.value, function)
    assert names, f"{node.id}: not built from dict literals in {function.name}"
    return names


def call_sites() -> dict[str, list[tuple[set[str], set[str], bool, bool]]]:
    """script name -> each call's (key names, arg names, more_keys given, more_args given)."""
    tree = ast.parse((ROOT / "appliance" / "scripts.py").read_text())
    functions = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    sites: dict[str, list[tuple[set[str], set[str], bool, bool]]] = {}
    for function in functions.values():
        for node in ast.walk(function):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "_run"):
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant):
                names = [first.value]
            else:  # a name passed in: the constants its callers pass (e.g. _beat)
                names = [c.args[0].value for c in ast.walk(tree) if isinstance(c, ast.Call)
                         and isinstance(c.func, ast.Attribute) and c.func.attr == function.name
                         and c.args and isinstance(c.args[0], ast.Constant)]
            given = {kw.arg for kw in node.keywords}
            call = (_dict_names(node.args[1], function), _dict_names(node.args[2], function),
                    "more_keys" in given, "more_args" in given)
            for name in names:
                sites.setdefault(name, []).append(call)
    return sites


def test_every_script_is_called_by_the_names_its_header_declares() -> None:
    sites = call_sites()
    assert set(sites) == set(SCRIPT_NAMES), "every script has a typed Scripts method"
    for name, calls in sites.items():
        keys, args = script_slots(_source(name))
        for key_names, arg_names, more_keys, more_args in calls:
            assert key_names == {s.name for s in keys if not s.rest}, name
            assert arg_names == {s.name for s in args if not s.rest}, name
            assert more_keys == any(s.rest for s in keys), name
            assert more_args == any(s.rest for s in args), name


def test_only_scripts_py_runs_scripts() -> None:
    for path in [*(ROOT / "appliance").rglob("*.py"), *(ROOT / "connectors").rglob("*.py")]:
        if path.name == "scripts.py":
            continue
        text = path.read_text()
        assert not re.search(r"\.(_run|_call|_scripts)\b", text.replace("self._run", "")), path


def test_every_script_compiles(client: redis.Redis) -> None:
    for name in SCRIPT_NAMES:
        assert client.script_load(load_source(name))


def test_a_call_missing_a_slot_is_refused(client: redis.Redis, settings: QueueSettings) -> None:
    s = Scripts(client, Keys(), settings)
    with pytest.raises(TypeError):
        s._run("cancel_job", {"job_key": "job:x"}, {"job_id": "x"})
    with pytest.raises(TypeError):
        s._run("cancel_job", {"job_key": "job:x"}, {"job_id": "x", "channel": "c", "reason": "r"})
    with pytest.raises(TypeError):  # a slot that may be left out, given without the one before it
        s._run("mark_unworkable", {"queue_key": "q", "unworkable_key": "u"},
               {"reason": "", "limit": 1, "window_ms": 1})
