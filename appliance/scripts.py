"""The Lua scripts, loaded once, each wrapped in one typed method that turns return codes into exceptions.

Each script lives in `appliance/lua/<verb>_<noun>.lua`; `_lib.lua` is prepended to all of them when they are
loaded, so they share one set of helpers without a build step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import redis

from appliance import clock
from appliance.errors import JobExists, JobFinished, JobLost, JobNotFound
from appliance.keys import Keys
from appliance.matching import RequirementClass
from appliance.redis_conn import DirectCalls
from appliance.retry import Backoff
from appliance.settings import QueueSettings

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


def load_source(name: str) -> str:
    """The full source of a script: the shared prelude followed by the script itself."""
    folder = resources.files("appliance") / "lua"
    return (folder / "_lib.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


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

    def __init__(self, client: redis.Redis, keys: Keys, settings: QueueSettings):
        self.client = client
        self.keys = keys
        self.settings = settings
        self._scripts = {name: client.register_script(load_source(name)) for name in SCRIPT_NAMES}
        self._direct = DirectCalls(client)
        self._loaded: set[str] = set()  # scripts loaded for pipelines by this object
        self._fixed_keys = [keys.pending, keys.delayed, keys.leases, keys.index_all, keys.expiry, keys.events,
                            keys.stats, keys.lease_clock, keys.workers_active]
        self._prefixes = [keys.job_prefix, keys.progress_prefix, keys.index_status_prefix,
                          keys.pending_service_prefix, keys.wake_prefix, str(settings.progress_maxlen),
                          str(settings.events_maxlen)]
        self._fixed_after_now = [settings.completed_ttl_s, settings.failed_ttl_s, keys.worker_prefix,
                                 keys.WORKER_JOBS_SUFFIX, keys.WORKER_HEARTBEAT_SUFFIX, keys.idle_workers_prefix,
                                 keys.wake_worker_prefix, settings.lease_ms]
        self.backoff = Backoff(settings.retry_base_ms, settings.retry_max_ms)

    def _call(self, name: str, keys: list[str], args: list[Any], now_ms: int | None = None,
              client: Any = None, backoff: Backoff | None = None, jitter: float | None = None) -> Any:
        ms = clock.now_ms() if now_ms is None else now_ms
        argv = [*self._prefixes, ms, clock.iso(ms), *self._fixed_after_now,
                *(backoff or self.backoff).script_args(jitter), *args]
        script = self._scripts[name]
        all_keys = self._fixed_keys + keys
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
        reply = self._call("submit_job", *self._submit_call(job_id, service, priority, fields, job_class), now_ms)
        if reply[0] == "exists":
            raise JobExists(job_id)
        return Submitted(int(reply[1]), str(reply[2]))

    def submit_into(self, pipe: redis.client.Pipeline, job_id: str, service: str, priority: int,
                    fields: dict[str, str], job_class: RequirementClass | None = None,
                    now_ms: int | None = None) -> None:
        """Queue a `submit` in a pipeline (bulk loads); its reply, {"ok", seq} or {"exists"}, comes with the
        pipeline's. The script is loaded on this object's first use; after a Redis restart that lost the
        script cache, the pipeline fails with NoScriptError (use a new Scripts)."""
        self._call("submit_job", *self._submit_call(job_id, service, priority, fields, job_class), now_ms,
                   client=pipe)

    def _submit_call(self, job_id: str, service: str, priority: int, fields: dict[str, str],
                     job_class: RequirementClass | None) -> tuple[list[str], list[Any]]:
        k = self.keys
        flat = [item for pair in fields.items() for item in pair]
        keys = [k.job(job_id), job_class.queue if job_class else k.pending_service(service), k.seq,
                k.index_service(service), k.services, k.services_offered, k.unoffered(service)]
        if job_class is None:
            return keys, [job_id, service, priority, "", "", OFFERED_WINDOW_MS, *flat]
        keys += [k.requirement_class(job_class.id), k.requirement_classes(service), k.classes_version,
                 k.classes_used]
        return keys, [job_id, service, priority, job_class.id, job_class.record(), OFFERED_WINDOW_MS, *flat]

    def claim(self, worker_id: str, queues: list[str], count: int, lease_ms: int,
              now_ms: int | None = None, services: Sequence[str] = ()) -> ClaimResult:
        """Take up to `count` of the best jobs across `queues` (claim queue keys the worker can serve).

        `services` are the worker's services: a claim that empties its queues makes it idle for those whose
        own queue is among `queues`, so that the next job there wakes it (and only it). The result carries the
        requirement classes' version, so a worker learns of a new class from its claims (and plans its queues
        again) without asking Redis separately."""
        k = self.keys
        marked = [("+" if k.pending_service(s) in queues else "-") + s for s in services]
        reply = self._call("claim_job", [k.classes_version, *queues],
                           [worker_id, count, lease_ms, *marked], now_ms)
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
        reply = self._call("progress_job", [self.keys.worker_jobs(worker_id)],
                           [job_id, worker_id, attempt, percent, message, step, total], now_ms)
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
            args: list[Any] = [worker_id]
            for n in places:
                item = items[n]
                args += [item.job_id, item.attempt, orjson.dumps(item.result), item.message or "Job completed"]
            reply = self._call("complete_jobs", [k.worker_jobs(worker_id), k.worker(worker_id)], args, now_ms)
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
        reply = self._call("fail_job", [k.worker_jobs(worker_id), k.worker(worker_id)],
                           [job_id, worker_id, attempt, error, 1 if retryable else 0, final_status, details],
                           now_ms,
                           backoff=backoff, jitter=1.0 if backoff else jitter)
        reply = self._held_reply(reply, job_id, worker_id)
        if reply[0] == "retrying":
            return FailResult(True, "pending", int(reply[1]), int(reply[2]))
        return FailResult(False, str(reply[1]))

    def annotate(self, job_id: str, worker_id: str, attempt: str, fields: Mapping[str, str], event: str = "",
                 now_ms: int | None = None) -> None:
        """Record a held attempt's own fields on its job, and with `event` emit it on the job's stream.
        Raises JobLost or JobNotFound."""
        flat = [item for pair in fields.items() for item in pair]
        reply = self._call("annotate_job", [self.keys.worker_jobs(worker_id)],
                           [job_id, worker_id, attempt, event, *flat], now_ms)
        self._held_reply(reply, job_id, worker_id)

    def release(self, job_id: str, worker_id: str, attempt: str, reason: str,
                now_ms: int | None = None) -> None:
        k = self.keys
        reply = self._call("release_job", [k.worker_jobs(worker_id), k.worker(worker_id)],
                           [job_id, worker_id, attempt, reason], now_ms)
        self._held_reply(reply, job_id, worker_id)

    def cancel(self, job_id: str, reason: str = "Job cancelled by user", now_ms: int | None = None) -> str:
        """Cancel a job, which is `cancelled` at once: returns "cancelled" (it was waiting) or "cancelling" (it was
        running: its worker's attempt no longer holds it, and the worker is told to stop the connector).

        Raises JobNotFound, or JobFinished if it already ended.
        """
        reply = self._call("cancel_job", [self.keys.job(job_id)],
                           [job_id, self.keys.cancels, reason], now_ms)
        if reply[0] == "not_found":
            raise JobNotFound(job_id)
        if reply[0] == "finished":
            raise JobFinished(job_id, str(reply[1]))
        return str(reply[0])

    def recover(self, limit: int = 100, now_ms: int | None = None, jitter: float | None = None) -> Recovery:
        """Recover jobs whose lease expired (a retry after their backoff), put due retries back in line, and
        retire workers that are gone (heartbeat expired, or a lease expired without a heartbeat for as long)."""
        reply = self._call("recover_jobs", [], [limit], now_ms, jitter=jitter)
        return Recovery(int(reply[0]), [str(w) for w in reply[1:]])

    def prune(self, limit: int = 1000, now_ms: int | None = None) -> int:
        return int(self._call("prune_jobs", [], [limit, self.keys.index_service_prefix], now_ms))

    def prune_classes(self, idle_ms: int, limit: int = 100, now_ms: int | None = None) -> int:
        """Forget requirement classes idle for `idle_ms` whose jobs are all gone; returns how many."""
        k = self.keys
        return int(self._call("prune_classes", [k.classes_used, k.classes_version],
                              [idle_ms, limit, k.requirement_class_prefix, k.requirement_classes_prefix,
                               k.unworkable_prefix, k.unoffered_prefix], now_ms))

    def mark_unworkable(self, queue: str, unworkable_key: str, reason: str, *, unoffered_service: str = "",
                        now_ms: int | None = None) -> int:
        """Move the pending jobs of a claim queue out of line into `unworkable_key` as `unworkable`, with the
        reason; returns how many. With `unoffered_service` (the queue's service), only if no registered worker
        offered it within OFFERED_WINDOW_MS, checked atomically, and the reason names the services offered."""
        keys, args = [queue, unworkable_key], [reason, UNWORKABLE_BATCH]
        if unoffered_service:
            keys, args = [*keys, self.keys.services_offered], [*args, unoffered_service, OFFERED_WINDOW_MS]
        total = 0
        while True:
            marked, left = self._call("mark_unworkable", keys, args, now_ms)
            total += int(marked)
            if int(left) == 0:  # each call takes its batch off the queue, so this ends
                return total

    def revive_unworkable(self, unworkable_key: str, message: str, now_ms: int | None = None) -> int:
        """Put the jobs of `unworkable_key` back in line, each at its place; returns how many."""
        total = 0
        while True:
            revived, left = self._call("revive_unworkable", [unworkable_key], [message, UNWORKABLE_BATCH], now_ms)
            total += int(revived)
            if int(left) == 0:
                return total

    # -- workers ----------------------------------------------------------------------------------------
    def _worker_keys(self, worker_id: str) -> list[str]:
        k = self.keys
        return [k.worker(worker_id), k.worker_heartbeat(worker_id), k.worker_jobs(worker_id)]

    def _offer_call(self, worker_id: str, fields: dict[str, str],
                    offers: Mapping[str, str] | None) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of a worker's services (see `offer` in _lib.lua). Without `offers` (service → ''
        when healthy, else its health error) they are the services its capabilities list, healthy."""
        if offers is None:
            try:
                caps = orjson.loads(fields.get("capabilities") or "{}")
            except orjson.JSONDecodeError:
                caps = {}
            listed = caps.get("services") if isinstance(caps, dict) else None
            offers = {str(s): "" for s in listed} if isinstance(listed, list) else {}
        k = self.keys
        keys = [*self._worker_keys(worker_id), k.services_offered, k.services_serving, k.services_unhealthy,
                *(k.unoffered(s) for s in offers)]
        return keys, [len(offers), *(item for pair in offers.items() for item in pair)]

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
        flat = [item for pair in fields.items() for item in pair]
        jobs = [item for pair in (running or {}).items() for item in pair]
        keys, offered = self._offer_call(worker_id, fields, offers)
        lease = self.settings.lease_ms if lease_ms is None else lease_ms
        reply = self._call("register_worker", keys, [worker_id, ttl_s, lease, len(running or {}), *jobs, *offered,
                                                     *flat], now_ms, jitter=jitter)
        if int(reply[2]):  # more than one batch waited: the rest, a batch per call
            for key in keys[6:]:
                self.revive_unworkable(key, f"worker {worker_id} offers its service", now_ms)
        return int(reply[1])

    def deregister_worker(self, worker_id: str, now_ms: int | None = None) -> int:
        reply = self._call("deregister_worker", self._worker_keys(worker_id), [worker_id], now_ms)
        return int(reply[1])

    def heartbeat_worker(self, worker_id: str, ttl_s: int, lease_ms: int, fields: dict[str, str],
                         running: dict[str, str] | None = None, offers: Mapping[str, str] | None = None,
                         now_ms: int | None = None) -> Beat | None:
        """Refresh the heartbeat, the leases of `running` (job id → attempt) and the worker's services
        (`offers`, as for `register_worker`).

        Returns None if the worker is not registered (it must register again).
        """
        flat = [item for pair in fields.items() for item in pair]
        jobs = [item for pair in (running or {}).items() for item in pair]
        keys, offered = self._offer_call(worker_id, fields, offers)
        reply = self._call("heartbeat_worker", keys,
                           [worker_id, ttl_s, lease_ms, len(running or {}), *jobs, *offered, *flat], now_ms)
        if reply[0] == "unknown":
            return None
        orphans = [str(item) for item in reply[3]]
        return Beat([str(j) for j in reply[1]], [str(j) for j in reply[2]],
                    dict(zip(orphans[::2], orphans[1::2], strict=True)))
