"""The Lua scripts, loaded once, each wrapped in one typed method that turns return codes into exceptions.

Each script lives in `appliance/lua/<verb>_<noun>.lua`. What a script is loaded with, in order:

- the generated prelude (`prelude()`): a named local for each of PRELUDE_SLOTS, the KEYS and ARGV every script
  receives first, and the status tables ACTIVE and TERMINAL from JobStatus;
- `_lib.lua`, the shared helpers;
- the script's own named locals (`script_locals()`), from the `-- KEYS name` / `-- ARGV name` lines of its
  header (`script_slots()`), in order after the prelude's;
- the script itself.

Scripts call them through `Scripts._run(name, keys={...}, args={...})`, by name: the order comes from the
header, computed once at load. tests/test_script_convention.py checks the table, the prelude, each header and
each call site against one another.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from operator import itemgetter
from typing import Any

import orjson
import redis

from appliance import clock
from appliance.errors import JobExists, JobFinished, JobLost, JobNotFound
from appliance.keys import Keys
from appliance.matching import RequirementClass
from appliance.record import ACTIVE, TERMINAL
from appliance.redis_conn import DirectCalls
from appliance.retry import Backoff
from appliance.settings import DEFAULT_LEASE_MS, QueueSettings

SCRIPT_NAMES = (
    "submit_job", "claim_job", "progress_job", "complete_jobs", "fail_job", "release_job", "cancel_job",
    "register_worker", "deregister_worker", "heartbeat_worker", "prune_jobs", "recover_jobs",
    "prune_classes", "mark_unworkable", "revive_unworkable", "annotate_job",
)
# A service a registered worker offered (was configured for, healthy or not) within this window counts as
# offered: its jobs wait in line. Past it, they are `unworkable` until a worker offering it registers. The window
# spans a worker's restart (`bin/appliance restart workers`, supervisord restarting one that crashed), so
# that restarts do not churn jobs between pending and unworkable.
OFFERED_WINDOW_MS = 300_000
UNWORKABLE_BATCH = 1000  # jobs moved to or from `unworkable` per script call

KEY, ARG = "KEYS", "ARGV"


@dataclass(frozen=True)
class Slot:
    """One KEYS or ARGV entry, bound to a named local of the same name in Lua."""

    name: str
    kind: str             # KEY or ARG
    about: str = ""
    number: bool = False  # tonumber() in Lua
    optional: bool = False  # a script's own: may be left out (only after the ones that may not)
    rest: bool = False      # a script's own, last: any number of values; Lua gets `<name>_at`, the first's index


# The KEYS and ARGV every script receives first, in this order; the prelude binds each to its named local.
# Scripts.__init__ binds their values by name, except CALL_ARGS (the last ones), which each call passes.
PRELUDE_SLOTS: tuple[Slot, ...] = (
    Slot("K_PENDING", KEY, "jobs:pending: zset, all pending jobs, higher score first"),
    Slot("K_DELAYED", KEY, "jobs:delayed: zset, jobs waiting for a retry, score = due time (ms)"),
    Slot("K_LEASES", KEY, "jobs:leases: zset, jobs held by workers, score = lease deadline (ms)"),
    Slot("K_INDEX_ALL", KEY, "jobs:index:all: zset, every job, score = sequence number"),
    Slot("K_EXPIRY", KEY, "jobs:expiry: zset, finished jobs, member id<TAB>status<TAB>service, score = expiry (ms)"),
    Slot("K_EVENTS", KEY, "events: stream, appliance-wide events (for monitors)"),
    Slot("K_STATS", KEY, "jobs:stats: hash, life-time counters"),
    Slot("K_CLOCK", KEY, "jobs:lease-clock: Redis's own time (ms) when leases were last judged or renewed"),
    Slot("K_ACTIVE", KEY, "workers:active: set, registered workers"),
    Slot("P_JOB", ARG, "prefix of job hashes (job:)"),
    Slot("P_PROGRESS", ARG, "prefix of progress streams (progress:)"),
    Slot("P_STATUS", ARG, "prefix of status indexes"),
    Slot("P_PENDING_SVC", ARG, "prefix of per-service claim queues"),
    Slot("P_WAKE", ARG, "prefix of per-service wake channels"),
    Slot("PROGRESS_MAXLEN", ARG, "progress stream MAXLEN (approximate)"),
    Slot("EVENTS_MAXLEN", ARG, "events stream MAXLEN (approximate)"),
    Slot("TTL_DONE", ARG, "retention of completed and cancelled jobs (s)", number=True),
    Slot("TTL_FAILED", ARG, "retention of failed jobs (s)", number=True),
    Slot("P_WORKER", ARG, "prefix of worker hashes (worker:)"),
    Slot("S_WORKER_JOBS", ARG, "suffix of a worker's set of held jobs (:jobs)"),
    Slot("S_HEARTBEAT", ARG, "suffix of a worker's heartbeat key (:heartbeat)"),
    Slot("P_IDLE", ARG, "prefix of idle-worker sets"),
    Slot("P_WAKE_WORKER", ARG, "prefix of per-worker wake channels"),
    Slot("LEASE_MS", ARG, "the caller's lease (ms), for a held job whose holder's lease is not known", number=True),
    Slot("NOW_MS", ARG, "now (epoch ms)", number=True),
    Slot("NOW_ISO", ARG, "now (ISO 8601)"),
    Slot("RETRY_BASE_MS", ARG, "retry backoff base (ms)", number=True),
    Slot("RETRY_MAX_MS", ARG, "retry backoff cap (ms)", number=True),
    Slot("JITTER", ARG, "a fraction in [0, 1], drawn by the caller so that scripts stay deterministic", number=True),
)
CALL_ARGS = ("NOW_MS", "NOW_ISO", "RETRY_BASE_MS", "RETRY_MAX_MS", "JITTER")  # each call's, in this order
FIXED_KEYS = tuple(s.name for s in PRELUDE_SLOTS if s.kind == KEY)
FIXED_ARGS = tuple(s.name for s in PRELUDE_SLOTS if s.kind == ARG)

_HEADER_SLOT = re.compile(r"^-- (KEYS|ARGV) ([a-z][a-z0-9_]*)(:num)?(\?|\.\.\.)?(?:\s+(.*))?$")


def _lua_list(names: Iterable[str]) -> str:
    return "{ " + ", ".join(f"{name} = true" for name in sorted(names)) + " }"


def prelude() -> str:
    """The Lua text every script starts with: PRELUDE_SLOTS as named locals, and the status tables."""
    lines = ["-- Generated by appliance/scripts.py from PRELUDE_SLOTS and appliance.record.JobStatus."]
    for kind in (KEY, ARG):
        slots = [s for s in PRELUDE_SLOTS if s.kind == kind]
        for n, slot in enumerate(slots, 1):
            value = f"{kind}[{n}]"
            lines.append(f"local {slot.name} = {f'tonumber({value})' if slot.number else value}  -- {slot.about}")
    lines.append(f"local ACTIVE = {_lua_list(ACTIVE)}")
    lines.append(f"local TERMINAL = {_lua_list(TERMINAL)}")
    return "\n".join(lines) + "\n"


def script_slots(source: str) -> tuple[tuple[Slot, ...], tuple[Slot, ...]]:
    """A script's own KEYS and ARGV, in order, from the `-- KEYS name[:num][?|...]  about` lines of its header
    (the comment lines before its first line of code).

    Raises:
        ValueError: a slot that may be left out before one that may not, or one after a `...` slot.
    """
    found: dict[str, list[Slot]] = {KEY: [], ARG: []}
    for line in source.splitlines():
        if not line.startswith("--"):
            break
        match = _HEADER_SLOT.match(line)
        if match:
            kind, name, number, mark, about = match.groups()
            slots = found[kind]
            if slots and (slots[-1].rest or (slots[-1].optional and mark != "?")):
                raise ValueError(f"{kind} {name}: after a slot that may be left out or that takes the rest")
            slots.append(Slot(name, kind, about or "", bool(number), mark == "?", mark == "..."))
    return tuple(found[KEY]), tuple(found[ARG])


def script_locals(source: str) -> str:
    """The Lua text that binds a script's own KEYS and ARGV (its header's) to named locals."""
    lines = []
    for kind, slots, first in zip((KEY, ARG), script_slots(source), (len(FIXED_KEYS) + 1, len(FIXED_ARGS) + 1),
                                  strict=True):
        for n, slot in enumerate(slots, first):
            if slot.rest:
                lines.append(f"local {slot.name}_at = {n}")
            else:
                value = f"{kind}[{n}]"
                lines.append(f"local {slot.name} = {f'tonumber({value})' if slot.number else value}")
    return "\n".join(lines) + "\n"


def load_source(name: str) -> str:
    """The full source of a script: the prelude, the shared helpers, its named locals and the script itself."""
    folder = resources.files("appliance") / "lua"
    own = (folder / f"{name}.lua").read_text()
    return prelude() + (folder / "_lib.lua").read_text() + "\n" + script_locals(own) + own


def _getter(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """A function that takes `names` from a mapping as a tuple, in this order (C speed: itemgetter)."""
    if len(names) >= 2:
        return itemgetter(*names)
    return (lambda given: (given[names[0]],)) if names else (lambda given: ())


@dataclass(frozen=True)
class _Order:
    """How a script's own KEYS and ARGV are taken from the names a call gives: one getter per number of names
    allowed (those that may be left out are the last), built once at load."""

    keys: dict[int, Callable[[Mapping[str, Any]], tuple[Any, ...]]]
    args: dict[int, Callable[[Mapping[str, Any]], tuple[Any, ...]]]

    @classmethod
    def of(cls, name: str) -> _Order:
        def getters(slots: tuple[Slot, ...]) -> dict[int, Callable[[Mapping[str, Any]], tuple[Any, ...]]]:
            names = tuple(s.name for s in slots if not s.rest)
            least = sum(1 for s in slots if not (s.optional or s.rest))
            return {n: _getter(names[:n]) for n in range(least, len(names) + 1)}

        keys, args = script_slots((resources.files("appliance") / "lua" / f"{name}.lua").read_text())
        return cls(getters(keys), getters(args))


@dataclass(frozen=True)
class Claimed:
    """A job a worker has just claimed: its record as stored, and the attempt number that proves the hold."""

    fields: dict[str, str]

    @property
    def id(self) -> str:
        return self.fields["id"]

    @property
    def attempt(self) -> str:
        return self.fields["attempt"]


@dataclass(frozen=True)
class Submitted:
    """A stored job: its place in line, and why it is `unworkable` ('' when it waits in line)."""

    seq: int
    unworkable_reason: str = ""


@dataclass(frozen=True)
class ClaimResult:
    jobs: list[Claimed]
    next_due_ms: int | None
    classes_version: int = 0


@dataclass(frozen=True)
class Completion:
    """One job's successful outcome, to record with `complete` or, batched, `complete_many`."""

    job_id: str
    worker_id: str
    attempt: str
    result: Any
    message: str = ""


@dataclass(frozen=True)
class Beat:
    """What a heartbeat learned: jobs this worker lost, jobs whose cancel was requested, and jobs Redis holds
    for it that it does not run (id -> attempt: a hand-off whose message was lost)."""

    lost: list[str]
    cancel: list[str]
    orphans: dict[str, str]


@dataclass(frozen=True)
class Recovery:
    """What a recovery pass did: jobs whose expired lease it handled, and dead workers it retired."""

    jobs: int
    dead_workers: list[str]


@dataclass(frozen=True)
class FailResult:
    retrying: bool
    status: str
    retry_count: int = 0
    due_ms: int = 0


class Scripts:
    """Typed access to every Lua script over one Redis client."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: QueueSettings, lease_ms: int = DEFAULT_LEASE_MS):
        """`lease_ms`: the caller's lease (a worker's WORKER_LEASE_MS; the default elsewhere), used for a job whose
        holder's record does not say its own."""
        self.client = client
        self.keys = keys
        self.settings = settings
        self.lease_ms = lease_ms
        self._scripts = {name: client.register_script(load_source(name)) for name in SCRIPT_NAMES}
        self._orders = {name: _Order.of(name) for name in SCRIPT_NAMES}
        self._direct = DirectCalls(client)
        self._loaded: set[str] = set()  # scripts loaded for pipelines by this object
        fixed: dict[str, Any] = {
            "K_PENDING": keys.pending, "K_DELAYED": keys.delayed, "K_LEASES": keys.leases,
            "K_INDEX_ALL": keys.index_all, "K_EXPIRY": keys.expiry, "K_EVENTS": keys.events, "K_STATS": keys.stats,
            "K_CLOCK": keys.lease_clock, "K_ACTIVE": keys.workers_active,
            "P_JOB": keys.job_prefix, "P_PROGRESS": keys.progress_prefix, "P_STATUS": keys.index_status_prefix,
            "P_PENDING_SVC": keys.pending_service_prefix, "P_WAKE": keys.wake_prefix,
            "PROGRESS_MAXLEN": str(settings.progress_maxlen), "EVENTS_MAXLEN": str(settings.events_maxlen),
            "TTL_DONE": settings.completed_ttl_s, "TTL_FAILED": settings.failed_ttl_s,
            "P_WORKER": keys.worker_prefix, "S_WORKER_JOBS": keys.WORKER_JOBS_SUFFIX,
            "S_HEARTBEAT": keys.WORKER_HEARTBEAT_SUFFIX, "P_IDLE": keys.idle_workers_prefix,
            "P_WAKE_WORKER": keys.wake_worker_prefix, "LEASE_MS": lease_ms,
        }
        if set(fixed) != set(FIXED_KEYS + FIXED_ARGS) - set(CALL_ARGS) or FIXED_ARGS[-len(CALL_ARGS):] != CALL_ARGS:
            raise RuntimeError("Scripts binds other slots than PRELUDE_SLOTS declares")
        self._fixed_keys = [fixed[name] for name in FIXED_KEYS]
        self._fixed_args = [fixed[name] for name in FIXED_ARGS[:-len(CALL_ARGS)]]
        self.backoff = Backoff(settings.retry_base_ms, settings.retry_max_ms)

    def _run(self, name: str, keys: Mapping[str, Any], args: Mapping[str, Any], *, more_keys: Sequence[Any] = (),
             more_args: Sequence[Any] = (), now_ms: int | None = None, client: Any = None,
             backoff: Backoff | None = None, jitter: float | None = None) -> Any:
        """Run script `name` with its own KEYS and ARGV by the names of its header (those that may be left out,
        last), then `more_keys`/`more_args` for its `...` slot."""
        order = self._orders[name]
        try:
            own_keys, own_args = order.keys[len(keys)](keys), order.args[len(args)](args)
        except KeyError as exc:  # a name its header does not declare, or one missing
            raise TypeError(f"{name}: KEYS {sorted(keys)} or ARGV {sorted(args)} differ from its header") from exc
        ms = clock.now_ms() if now_ms is None else now_ms
        argv = [*self._fixed_args, ms, clock.iso(ms), *(backoff or self.backoff).script_args(jitter), *own_args,
                *more_args]
        all_keys = [*self._fixed_keys, *own_keys, *more_keys]
        script = self._scripts[name]
        if client is not None:  # a pipeline: its EVALSHA cannot load the script on NOSCRIPT, so load it first
            if name not in self._loaded:
                script.sha = self._direct.execute("SCRIPT", "LOAD", script.script)
                self._loaded.add(name)
            return client.evalsha(script.sha, len(all_keys), *all_keys, *argv)
        try:
            return self._direct.execute("EVALSHA", script.sha, len(all_keys), *all_keys, *argv)
        except redis.exceptions.NoScriptError:  # first use, or Redis restarted without its script cache
            script.sha = self._direct.execute("SCRIPT", "LOAD", script.script)
            return self._direct.execute("EVALSHA", script.sha, len(all_keys), *all_keys, *argv)

    # -- jobs -------------------------------------------------------------------------------------------
    def submit(self, job_id: str, service: str, priority: int, fields: dict[str, str],
               job_class: RequirementClass | None = None, now_ms: int | None = None) -> Submitted:
        """Create a pending job, in its requirement class's queue if it has one (recording the class), else in
        its service's queue; or, if no registered worker offered its service within OFFERED_WINDOW_MS, an
        `unworkable` one, out of line until such a worker registers.

        Raises:
            JobExists: a job with this id exists.
        """
        reply = self._submit(job_id, service, priority, fields, job_class, now_ms)
        if reply[0] == "exists":
            raise JobExists(job_id)
        return Submitted(int(reply[1]), str(reply[2]))

    def submit_into(self, pipe: redis.client.Pipeline, job_id: str, service: str, priority: int,
                    fields: dict[str, str], job_class: RequirementClass | None = None,
                    now_ms: int | None = None) -> None:
        """Queue a `submit` in a pipeline (bulk loads); its reply, {"ok", seq} or {"exists"}, comes with the
        pipeline's. The script is loaded on this object's first use; after a Redis restart that lost the
        script cache, the pipeline fails with NoScriptError (use a new Scripts)."""
        self._submit(job_id, service, priority, fields, job_class, now_ms, pipe)

    def _submit(self, job_id: str, service: str, priority: int, fields: dict[str, str],
                job_class: RequirementClass | None, now_ms: int | None, pipe: Any = None) -> Any:
        k = self.keys
        keys = {"job_key": k.job(job_id), "queue_key": job_class.queue if job_class else k.pending_service(service),
                "seq_key": k.seq, "service_index_key": k.index_service(service), "services_key": k.services,
                "offered_key": k.services_offered, "unoffered_key": k.unoffered(service)}
        if job_class is not None:
            keys |= {"class_key": k.requirement_class(job_class.id),
                     "service_classes_key": k.requirement_classes(service),
                     "version_key": k.classes_version, "used_key": k.classes_used}
        args = {"job_id": job_id, "service": service, "priority": priority,
                "class_id": job_class.id if job_class else "", "class_record": job_class.record() if job_class else "",
                "window_ms": OFFERED_WINDOW_MS}
        return self._run("submit_job", keys, args, more_args=[item for pair in fields.items() for item in pair],
                         now_ms=now_ms, client=pipe)

    def claim(self, worker_id: str, queues: list[str], count: int, lease_ms: int,
              now_ms: int | None = None, services: Sequence[str] = ()) -> ClaimResult:
        """Take up to `count` of the best jobs across `queues` (claim queue keys the worker can serve).

        `services` are the worker's services: a claim that empties its queues makes it idle for those whose
        own queue is among `queues`, so that the next job there wakes it (and only it). The result carries the
        requirement classes' version, so a worker learns of a new class from its claims (and plans its queues
        again) without asking Redis separately."""
        k = self.keys
        marked = [("+" if k.pending_service(s) in queues else "-") + s for s in services]
        reply = self._run("claim_job", {"version_key": k.classes_version},
                          {"worker_id": worker_id, "want": count, "lease_ms": lease_ms},
                          more_keys=queues, more_args=marked, now_ms=now_ms)
        jobs = [Claimed(dict(zip(flat[::2], flat[1::2], strict=False))) for flat in reply[2:]]
        next_due = int(reply[0])
        return ClaimResult(jobs, None if next_due < 0 else next_due, int(reply[1]))

    def leave_idle(self, worker_id: str, services: Sequence[str]) -> None:
        """Take the worker out of its services' idle sets (it stops claiming), so no job's wake-up goes to it."""
        pipe = self.client.pipeline(transaction=False)
        for service in services:
            pipe.srem(self.keys.idle_workers(service), worker_id)
        pipe.execute()

    def _held_reply(self, reply: list[Any], job_id: str, worker_id: str) -> list[Any]:
        if reply[0] == "not_found":
            raise JobNotFound(job_id)
        if reply[0] == "lost":
            raise JobLost(job_id, worker_id)
        return reply

    def progress(self, job_id: str, worker_id: str, attempt: str, percent: int, message: str = "",
                 step: int | str = "", total: int | str = "", now_ms: int | None = None) -> str:
        """Record a progress step; returns its stream entry id. Raises JobLost or JobNotFound."""
        reply = self._run("progress_job", {"jobs_key": self.keys.worker_jobs(worker_id)},
                          {"job_id": job_id, "worker_id": worker_id, "attempt": attempt, "percent": percent,
                           "message": message, "step": step, "total": total}, now_ms=now_ms)
        return str(self._held_reply(reply, job_id, worker_id)[1])

    def complete(self, job_id: str, worker_id: str, attempt: str, result: Any, message: str = "",
                 now_ms: int | None = None) -> None:
        reply = self.complete_many([Completion(job_id, worker_id, attempt, result, message)], now_ms)
        self._held_reply(reply, job_id, worker_id)

    def complete_many(self, items: list[Completion], now_ms: int | None = None) -> list[str]:
        """Complete several jobs, one script call per worker (normally one call in all); returns each reply
        code in order: "ok", "lost" or "not_found"."""
        k = self.keys
        by_worker: dict[str, list[int]] = {}
        for n, item in enumerate(items):
            by_worker.setdefault(item.worker_id, []).append(n)
        codes = [""] * len(items)
        for worker_id, places in by_worker.items():
            jobs: list[Any] = []
            for n in places:
                item = items[n]
                jobs += [item.job_id, item.attempt, orjson.dumps(item.result), item.message or "Job completed"]
            reply = self._run("complete_jobs",
                              {"jobs_key": k.worker_jobs(worker_id), "worker_key": k.worker(worker_id)},
                              {"worker_id": worker_id}, more_args=jobs, now_ms=now_ms)
            for n, code in zip(places, reply, strict=True):
                codes[n] = str(code)
        return codes

    def fail(self, job_id: str, worker_id: str, attempt: str, error: str, *, retryable: bool,
             final_status: str = "failed", delay_ms: int | None = None, jitter: float | None = None,
             now_ms: int | None = None, details: str = "") -> FailResult:
        """Record a failed attempt: a retry after the backoff of JOB_RETRY_BASE_MS/JOB_RETRY_MAX_MS (with
        `jitter`, random by default), or the end in `final_status`. `delay_ms` fixes the wait instead (tools and
        tests). `details` (JSON text, e.g. the connector's error details) is stored as `error_details` and sent
        with the event. Raises JobLost or JobNotFound."""
        k = self.keys
        backoff = None if delay_ms is None else Backoff.fixed(delay_ms)
        reply = self._run("fail_job", {"jobs_key": k.worker_jobs(worker_id), "worker_key": k.worker(worker_id)},
                          {"job_id": job_id, "worker_id": worker_id, "attempt": attempt, "err": error,
                           "retryable": 1 if retryable else 0, "final": final_status, "details": details},
                          now_ms=now_ms, backoff=backoff, jitter=1.0 if backoff else jitter)
        reply = self._held_reply(reply, job_id, worker_id)
        if reply[0] == "retrying":
            return FailResult(True, "pending", int(reply[1]), int(reply[2]))
        return FailResult(False, str(reply[1]))

    def annotate(self, job_id: str, worker_id: str, attempt: str, fields: Mapping[str, str], event: str = "",
                 now_ms: int | None = None) -> None:
        """Record a held attempt's own fields on its job, and with `event` emit it on the job's stream.
        Raises JobLost or JobNotFound."""
        reply = self._run("annotate_job", {"jobs_key": self.keys.worker_jobs(worker_id)},
                          {"job_id": job_id, "worker_id": worker_id, "attempt": attempt, "event": event},
                          more_args=[item for pair in fields.items() for item in pair], now_ms=now_ms)
        self._held_reply(reply, job_id, worker_id)

    def release(self, job_id: str, worker_id: str, attempt: str, reason: str,
                now_ms: int | None = None) -> None:
        k = self.keys
        reply = self._run("release_job", {"jobs_key": k.worker_jobs(worker_id), "worker_key": k.worker(worker_id)},
                          {"job_id": job_id, "worker_id": worker_id, "attempt": attempt, "reason": reason},
                          now_ms=now_ms)
        self._held_reply(reply, job_id, worker_id)

    def cancel(self, job_id: str, reason: str = "Job cancelled by user", now_ms: int | None = None) -> str:
        """Cancel a job, which is `cancelled` at once: returns "cancelled" (it was waiting) or "cancelling" (it was
        running: its worker's attempt no longer holds it, and the worker is told to stop the connector).

        Raises JobNotFound, or JobFinished if it already ended.
        """
        reply = self._run("cancel_job", {"job_key": self.keys.job(job_id)},
                          {"job_id": job_id, "cancel_channel": self.keys.cancels, "reason": reason}, now_ms=now_ms)
        if reply[0] == "not_found":
            raise JobNotFound(job_id)
        if reply[0] == "finished":
            raise JobFinished(job_id, str(reply[1]))
        return str(reply[0])

    def recover(self, limit: int = 100, now_ms: int | None = None, jitter: float | None = None) -> Recovery:
        """Recover jobs whose lease expired (a retry after their backoff), put due retries back in line, and
        retire workers that are gone (heartbeat expired, or a lease expired without a heartbeat for as long)."""
        reply = self._run("recover_jobs", {}, {"limit": limit}, now_ms=now_ms, jitter=jitter)
        return Recovery(int(reply[0]), [str(w) for w in reply[1:]])

    def prune(self, limit: int = 1000, now_ms: int | None = None) -> int:
        return int(self._run("prune_jobs", {}, {"limit": limit, "p_service": self.keys.index_service_prefix},
                             now_ms=now_ms))

    def prune_classes(self, idle_ms: int, limit: int = 100, now_ms: int | None = None) -> int:
        """Forget requirement classes idle for `idle_ms` whose jobs are all gone; returns how many."""
        k = self.keys
        return int(self._run("prune_classes", {"used_key": k.classes_used, "version_key": k.classes_version},
                             {"idle_ms": idle_ms, "limit": limit, "p_class": k.requirement_class_prefix,
                              "p_classes": k.requirement_classes_prefix, "p_unworkable": k.unworkable_prefix,
                              "p_unoffered": k.unoffered_prefix}, now_ms=now_ms))

    def mark_unworkable(self, queue: str, unworkable_key: str, reason: str, *, unoffered_service: str = "",
                        now_ms: int | None = None) -> int:
        """Move the pending jobs of a claim queue out of line into `unworkable_key` as `unworkable`, with the
        reason; returns how many. With `unoffered_service` (the queue's service), only if no registered worker
        offered it within OFFERED_WINDOW_MS, checked atomically, and the reason names the services offered."""
        keys = {"queue_key": queue, "unworkable_key": unworkable_key}
        args: dict[str, Any] = {"reason": reason, "limit": UNWORKABLE_BATCH}
        if unoffered_service:
            keys |= {"offered_key": self.keys.services_offered}
            args |= {"service": unoffered_service, "window_ms": OFFERED_WINDOW_MS}
        total = 0
        while True:
            marked, left = self._run("mark_unworkable", keys, args, now_ms=now_ms)
            total += int(marked)
            if int(left) == 0:  # each call takes its batch off the queue, so this ends
                return total

    def revive_unworkable(self, unworkable_key: str, message: str, now_ms: int | None = None) -> int:
        """Put the jobs of `unworkable_key` back in line, each at its place; returns how many."""
        total = 0
        while True:
            revived, left = self._run("revive_unworkable", {"unworkable_key": unworkable_key},
                                      {"message": message, "limit": UNWORKABLE_BATCH}, now_ms=now_ms)
            total += int(revived)
            if int(left) == 0:
                return total

    # -- workers ----------------------------------------------------------------------------------------
    def _offers(self, fields: dict[str, str], offers: Mapping[str, str] | None) -> Mapping[str, str]:
        """A worker's services (see `offer` in _lib.lua). Without `offers` (service → '' when healthy, else its
        health error) they are the services its capabilities list, healthy."""
        if offers is None:
            try:
                caps = orjson.loads(fields.get("capabilities") or "{}")
            except orjson.JSONDecodeError:
                caps = {}
            listed = caps.get("services") if isinstance(caps, dict) else None
            offers = {str(s): "" for s in listed} if isinstance(listed, list) else {}
        return offers

    def _beat(self, name: str, worker_id: str, ttl_s: int, lease_ms: int, fields: dict[str, str],
              running: Mapping[str, str] | None, offers: Mapping[str, str], now_ms: int | None,
              jitter: float | None = None) -> Any:
        """register_worker or heartbeat_worker: the same KEYS and ARGV (see their headers)."""
        k = self.keys
        jobs = [item for pair in (running or {}).items() for item in pair]
        offered = [len(offers), *(item for pair in offers.items() for item in pair)]
        flat = [item for pair in fields.items() for item in pair]
        return self._run(name, {"worker_key": k.worker(worker_id), "heartbeat_key": k.worker_heartbeat(worker_id),
                                "jobs_key": k.worker_jobs(worker_id), "offered_key": k.services_offered,
                                "serving_key": k.services_serving, "unhealthy_key": k.services_unhealthy},
                         {"worker_id": worker_id, "ttl_s": ttl_s, "lease_ms": lease_ms, "n": len(running or {})},
                         more_keys=[k.unoffered(s) for s in offers], more_args=[*jobs, *offered, *flat],
                         now_ms=now_ms, jitter=jitter)

    def register_worker(self, worker_id: str, ttl_s: int, fields: dict[str, str],
                        offers: Mapping[str, str] | None = None, now_ms: int | None = None,
                        running: Mapping[str, str] | None = None, lease_ms: int | None = None,
                        jitter: float | None = None) -> int:
        """Register a worker; returns how many jobs an earlier process with this id left behind (recovered, each
        a retry after its backoff). `running` (job id → attempt) are the jobs this process runs, if it registers
        again after its record was lost: those it still holds stay its own, under a fresh lease (`lease_ms`,
        the settings' by default).

        Its services (`offers`: service → '' when healthy, else its health error; by default those its
        capabilities list) count as offered from now on, and their unworkable jobs go back in line."""
        offers = self._offers(fields, offers)
        lease = self.lease_ms if lease_ms is None else lease_ms
        reply = self._beat("register_worker", worker_id, ttl_s, lease, fields, running, offers, now_ms, jitter)
        if int(reply[2]):  # more than one batch waited: the rest, a batch per call
            for service in offers:
                self.revive_unworkable(self.keys.unoffered(service), f"worker {worker_id} offers its service", now_ms)
        return int(reply[1])

    def deregister_worker(self, worker_id: str, now_ms: int | None = None) -> int:
        k = self.keys
        reply = self._run("deregister_worker", {"worker_key": k.worker(worker_id),
                                                "heartbeat_key": k.worker_heartbeat(worker_id),
                                                "jobs_key": k.worker_jobs(worker_id)},
                          {"worker_id": worker_id}, now_ms=now_ms)
        return int(reply[1])

    def heartbeat_worker(self, worker_id: str, ttl_s: int, lease_ms: int, fields: dict[str, str],
                         running: dict[str, str] | None = None, offers: Mapping[str, str] | None = None,
                         now_ms: int | None = None) -> Beat | None:
        """Refresh the heartbeat, the leases of `running` (job id → attempt) and the worker's services
        (`offers`, as for `register_worker`).

        Returns None if the worker is not registered (it must register again).
        """
        reply = self._beat("heartbeat_worker", worker_id, ttl_s, lease_ms, fields, running,
                           self._offers(fields, offers), now_ms)
        if reply[0] == "unknown":
            return None
        orphans = [str(item) for item in reply[3]]
        return Beat([str(j) for j in reply[1]], [str(j) for j in reply[2]],
                    dict(zip(orphans[::2], orphans[1::2], strict=True)))
