"""The programs supervisord runs for the appliance: the names the CLI accepts for them, and bringing the running
programs in line with freshly written program sections (supervisorctl's reread and update, then a start)."""

from __future__ import annotations

import configparser
import xmlrpc.client
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from supervisor.xmlrpc import Faults

UP_STATES = ("RUNNING", "STARTING")  # up or on its way; anything else is down and `start` starts it
STOPPABLE_STATES = ("RUNNING", "STARTING", "BACKOFF")


@dataclass(frozen=True)
class Program:
    """One supervisord process: its group, name, log file, state (empty when not loaded) and description."""

    group: str
    name: str
    logfile: str = ""
    state: str = ""
    description: str = ""

    @property
    def spec(self) -> str:
        """supervisorctl's name for it: `api`, `workers:worker1`."""
        return self.name if self.group == self.name else f"{self.group}:{self.name}"


def running_programs(rpc: Any) -> list[Program]:
    return [Program(i["group"], i["name"], i["stdout_logfile"], i["statename"], i["description"])
            for i in rpc.getAllProcessInfo()]


def configured_programs(texts: Iterable[str]) -> list[Program]:
    """The programs that program sections (RUN/conf.d/*.conf) declare, grouped as their [group:*] say."""
    parser = configparser.RawConfigParser(strict=False, inline_comment_prefixes=(";",))
    for text in texts:
        parser.read_string(text)
    groups = {}
    for section in parser.sections():
        if section.startswith("group:"):
            for member in parser.get(section, "programs").split(","):
                groups[member.strip()] = section.removeprefix("group:")
    return [Program(groups.get(name, name), name) for name in
            (s.removeprefix("program:") for s in parser.sections() if s.startswith("program:"))]


def program_names(programs: Iterable[Program]) -> dict[str, list[Program]]:
    """Every name that picks programs: a group (`workers`), `group:name`, and a member's own name (`worker1`)
    where no other group has one like it."""
    programs = list(programs)
    names: dict[str, list[Program]] = {}
    for p in programs:
        names.setdefault(p.group, []).append(p)
    for p in programs:
        if p.spec != p.group:
            names.setdefault(p.spec, []).append(p)
    members = [p.name for p in programs if p.spec != p.group]
    for p in programs:
        if p.spec != p.group and members.count(p.name) == 1 and p.name not in names:
            names[p.name] = [p]
    return names


def resolve(programs: Iterable[Program], wanted: Iterable[str]) -> tuple[list[Program], list[str]]:
    """The programs `wanted` names (in order, once each; supervisorctl's `group:*` and `group:` too) and the
    names that match none."""
    programs = list(programs)
    names = program_names(programs)
    groups = {p.group for p in programs}
    found: dict[str, Program] = {}
    unknown = []
    for name in wanted:
        for suffix in (":*", ":"):  # supervisorctl's `group:*` and `group:`
            if name.endswith(suffix) and name[:-len(suffix)] in groups:
                name = name[:-len(suffix)]
        if name not in names:
            unknown.append(name)
        for p in names.get(name, []):
            found.setdefault(p.spec, p)
    return list(found.values()), unknown


def _order(group: str) -> tuple[int, str]:
    """Start order: redis, api, other groups (comfyui), then the workers that use them; stops go the other way."""
    return {"redis": 0, "api": 1, "workers": 3}.get(group, 2), group


@dataclass(frozen=True)
class Applied:
    """What `apply` did: groups replaced because their section changed, groups added or removed, and the
    programs it started or restarted."""

    replaced: list[str]
    added: list[str]
    removed: list[str]
    started: list[str]
    pending: list[str]  # groups whose sections changed but were not among the targets

    @property
    def anything(self) -> bool:
        return bool(self.replaced or self.added or self.removed or self.started)


DEPENDENTS = {"comfyui": "workers"}  # a group whose programs' settings derive from another's (WORKER_COMFYUI_URL)


def apply(rpc: Any, targets: list[Program] | None, restart: bool, say: Callable[[str], None]) -> Applied:
    """Bring supervisord's programs in line with the program sections just written, then start them.

    Args:
        rpc: supervisord's XML-RPC namespace.
        targets: the programs to act on; None means all (and the groups added or removed with them).
        restart: restart targets whose section did not change too; else only start those not running.
        say: prints one progress line.

    A group whose section changed is stopped, replaced and started (supervisorctl's `update`), as a whole even
    when only one of its programs was named; a named group's dependent (DEPENDENTS: the workers of `comfyui`) is
    replaced with it when its section changed too (a new COMFYUI_BASE_PORT moves every worker's URL).
    Raises xmlrpc.client.Fault when supervisord refuses a step.
    """
    added, changed, removed = rpc.reloadConfig()[0]
    current = running_programs(rpc)
    chosen = current if targets is None else [t for t in targets if t.state]
    groups = {p.group for p in chosen} | ({g for g in added if targets is None or g in {t.group for t in targets}})
    for group, dependent in DEPENDENTS.items():
        if group in groups and dependent in changed and dependent not in groups:
            say(f"the settings of {dependent} changed with {group}'s (their addresses derive from its ports): "
                f"restarting {dependent} too")
            groups.add(dependent)
    replace = sorted((set(changed) | set(removed)) & groups, key=_order)
    for group in replace:
        whole = {p.spec for p in current if p.group == group}
        if targets is not None and not whole <= {t.spec for t in targets}:
            say(f"the settings of group {group} changed: restarting all of it to apply them")
    down = [p for p in chosen if p.group not in replace and (restart or p.state not in UP_STATES)]
    for group in sorted(replace, key=_order, reverse=True):
        rpc.stopProcessGroup(group, True)
    for p in sorted((p for p in down if p.state in STOPPABLE_STATES), key=lambda p: _order(p.group), reverse=True):
        _ignore_state_fault(rpc.stopProcess, p.spec)
    if replace or [g for g in added if g in groups]:
        say("applying the new settings to " + ", ".join(sorted(set(replace) | (set(added) & groups), key=_order)))
    started = []
    for group in sorted(groups, key=_order):
        if group in replace:
            rpc.removeProcessGroup(group)
            if group in removed:
                continue
        if group in replace or group in added:
            rpc.addProcessGroup(group)  # supervisord starts its programs (autostart)
            continue
        for p in (p for p in down if p.group == group):
            _ignore_state_fault(rpc.startProcess, p.spec, False)
            started.append(p.spec)
    pending = sorted(set(changed) - groups, key=_order)
    return Applied(replace, [g for g in added if g in groups], [g for g in removed if g in groups], started,
                   pending)


def _ignore_state_fault(call: Callable[..., Any], *args: Any) -> None:
    """Stop or start a process that may have reached that state meanwhile (ALREADY_STARTED, NOT_RUNNING)."""
    try:
        call(*args)
    except xmlrpc.client.Fault as exc:
        if exc.faultCode not in (Faults.ALREADY_STARTED, Faults.NOT_RUNNING):
            raise
