"""The worker: claims jobs it can serve from Redis, runs them through connectors, reports back.

Runs under gevent (see `appliance.worker_process`): one greenlet per running job, one for heartbeats and
lease renewal, one listening for wake-ups and cancels. `run_once(now_ms)` is one claim step, so tests can
drive the loop and its clock.

Every Redis call goes through `_redis`: an outage (appliance.retry.is_outage) is waited out with backoff, while
running jobs go on and hold their progress and outcomes; any other error ends the worker with the error logged
(exit status 1), so that supervisord restarts it and its log says why.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import gevent
import gevent.event
import orjson
import redis

from appliance import __version__, clock
from appliance.classes import ClaimPlanner, ClassBook
from appliance.connector import Connector, ConnectorError, JobContext, JobStopped, ServiceUnavailable
from appliance.errors import JobLost, JobNotFound
from appliance.keys import Keys
from appliance.outputs import OutputStore
from appliance.retry import STOP_MARGIN_S, is_outage, outage_waits
from appliance.scripts import Claimed, Completion, Scripts
from appliance.settings import WorkerSettings
from appliance.telemetry import HostSampler

log = logging.getLogger(__name__)
T = TypeVar("T")
STOP_GRACE_S = 5.0
BACKLOG_MAX = 100
DEREGISTER_WAIT_S = 10.0     # how long a stopping worker waits out an outage to deregister
EXIT_RESERVE_S = 3.0         # of supervisord's stopwaitsecs, kept for deregistering and exiting
OUTAGE_LOG_EVERY_S = 10.0    # while Redis is away, how often each waiting call says so again
ERROR_DETAILS_MAX_BYTES = 64 * 1024  # a failure's connector details, as JSON, stored at most this long


class Stopping(Exception):
    """A call that waited out a Redis outage gave up because the worker is stopping."""


@dataclass
class Running:
    """A job attempt this worker holds."""

    claimed: Claimed
    context: JobContext
    greenlet: gevent.Greenlet | None = None
    started_ms: int = field(default_factory=clock.now_ms)
    backlog: list[tuple[int, str, int | str, int | str]] = field(default_factory=list)
    progress_at: float = float("-inf")             # time.monotonic() when progress_tokens was counted
    progress_tokens: float = 0.0                   # progress writes it may make now (a token bucket)
    flush_later: gevent.Greenlet | None = None     # writes a step held back by WORKER_PROGRESS_MAX_PER_SECOND
    finished: bool = False                         # the connector's run is over: only its outcome is left to record


class Worker:
    """One worker process's loop over the queue."""

    def __init__(self, settings: WorkerSettings, client: redis.Redis, listener_client: redis.Redis,
                 connectors: dict[str, Connector], sampler: HostSampler | None = None):
        self.settings = settings
        self.id = settings.worker_id
        self.client = client
        self.listener_client = listener_client
        self.keys = Keys(settings.queue.key_prefix)
        self.scripts = Scripts(client, self.keys, settings.queue, lease_ms=settings.lease_ms)
        self.outputs = OutputStore(client, self.keys, settings.queue.completed_ttl_s)  # connectors' files
        self.connectors = connectors
        self.by_service: dict[str, Connector] = {}
        for connector in connectors.values():
            for service in connector.services:
                self.by_service.setdefault(service, connector)
        self.services = tuple(s for s in settings.services if s in self.by_service)
        self.sampler = sampler or HostSampler.for_worker(settings.gpu_device)
        self.profile = settings.profile  # customer access, custom capabilities
        self.planner = ClaimPlanner(ClassBook(client, self.keys, self.scripts))
        self.running: dict[str, Running] = {}
        self.draining = False
        self.stopped = gevent.event.Event()
        self._wake = gevent.event.Event()
        self._next_due_ms: int | None = None
        self._backlog = True  # the worker's queues may hold jobs (False after a claim that emptied them)
        self._wakes = 0  # wake-up messages received
        self._greenlets: list[gevent.Greenlet] = []
        self._giving_back: list[gevent.Greenlet] = []
        self._completions: list[tuple[Completion, gevent.event.AsyncResult]] = []
        self._completions_ready = gevent.event.Event()
        self._reporter: gevent.Greenlet | None = None
        self._term_count = 0
        self._stop_by: float | None = None  # time.monotonic() by which a stopping worker exits (see _drain)
        self._fatal: BaseException | None = None
        # outages are retried often enough that a holder renews its leases within a sixth of a lease of Redis's
        # return (see present in appliance/lua/_lib.lua)
        self._outage_cap_s = min(2.0, settings.lease_ms / 6000)

    # -- lifecycle ------------------------------------------------------------------------------------
    def capabilities(self) -> dict[str, Any]:
        """What requirements are matched against (appliance/matching.py): WORKER_* settings, filled in from
        NVML for this worker's GPU and from psutil for RAM; models are listed per service."""
        hw = self.settings.hardware
        gpu = self.sampler.gpu.sample() if self.sampler.gpu is not None else {}
        return {
            "worker_id": self.id,
            "services": list(self.services),
            "hardware": {"gpu_count": hw.gpu_count or (1 if gpu else 0),
                         "gpu_memory_gb": hw.gpu_memory_gb or gpu.get("memory_total_gb", 0.0),
                         "gpu_model": hw.gpu_model or gpu.get("name", ""),
                         "gpu_uuid": gpu.get("uuid", ""), "gpu_device": gpu.get("device", ""),
                         "gpu_index": self.profile.gpu_index,
                         "cpu_cores": hw.cpu_cores, "ram_gb": hw.ram_gb or HostSampler.ram_total_gb()},
            "models": {service: c.models() for service, c in self.by_service.items() if service in self.services},
            "customer_access": self.profile.customer_access(),
            "custom": self.profile.custom,
            "performance": {"concurrent_jobs": self.settings.max_concurrent_jobs,
                            "max_processing_time_minutes": self.settings.job_timeout_minutes},
            "metadata": {"version": __version__, "python": platform.python_version(),
                         "platform": platform.system().lower(), "arch": platform.machine(),
                         "hostname": socket.gethostname()},
        }

    def register(self) -> None:
        offers = self.offers()  # health is known (each connector's start ran its first check)
        offering = [s for s, error in offers.items() if not error]
        fields = {
            "capabilities": orjson.dumps(self.capabilities()).decode(),
            "services": ",".join(offering),  # the healthy ones only, as each heartbeat writes them
            "connectors": ",".join(self.connectors),
            "max_concurrent_jobs": str(self.settings.max_concurrent_jobs),
            "lease_ms": str(self.settings.lease_ms),  # the lease of a job handed to it at submit
            "pid": str(os.getpid()),
            "hostname": socket.gethostname(),
            "version": __version__,
            "telemetry": orjson.dumps(self.sampler.sample()).decode(),
            "services_health": self.services_health(),
        }
        running = {job_id: job.claimed.attempt for job_id, job in self.running.items()}
        orphans = self.scripts.register_worker(self.id, self.settings.heartbeat_ttl_s, fields, offers,
                                               running=running)
        down = [s for s in self.services if s not in offering]
        log.info("worker registered id=%s services=%s%s max_concurrent=%d", self.id, ",".join(offering),
                 f" (not offered while unhealthy: {','.join(down)})" if down else "",
                 self.settings.max_concurrent_jobs)
        if orphans:
            log.warning("recovered %d jobs an earlier process of worker %s left running (each retried after its "
                        "backoff)", orphans, self.id)

    def services_health(self) -> str:
        """Each configured service's backing-service state (Connector.health_info), as JSON for the record."""
        return orjson.dumps({s: self.by_service[s].health_info() for s in self.services}).decode()

    def offers(self) -> dict[str, str]:
        """The services this worker is configured for: '' for each healthy one, else why it is not (the
        connector's health error), which jobs waiting for it show (appliance/queue.py `waiting_reason`)."""
        offers = {}
        for service in self.services:
            connector = self.by_service[service]
            offers[service] = "" if connector.healthy() else connector.health_error() or "its health check fails"
        return offers

    def run(self, stop_requested: Callable[[], bool] = lambda: False) -> int:
        """Register, then claim and run jobs until told to stop; hand back what is left; deregister.

        Signal handlers come first: a SIGTERM at any moment stops the worker cleanly. `stop_requested` says
        whether a stop came before they were installed (the process's own early handler, or supervisord); the
        worker then exits without registering. Returns the exit status: 0 after a clean stop, 1 after an error
        that is not a Redis outage (logged; supervisord starts the worker again)."""
        gevent.signal_handler(signal.SIGTERM, self.terminate)
        gevent.signal_handler(signal.SIGINT, self.terminate)
        if stop_requested():
            log.info("worker %s was told to stop before it registered: exiting", self.id)
            return 0
        registered = False
        try:
            for connector in self.connectors.values():
                connector.start()
            try:
                if self.draining:
                    raise Stopping("register")
                self._redis(self.register, "register", give_up=lambda: self.draining)
            except Stopping:
                log.info("worker %s was told to stop before it could register: exiting", self.id)
                return 0
            registered = True
            self._greenlets = [gevent.spawn(self._guarded, self._heartbeat_loop, "the heartbeat"),
                               gevent.spawn(self._guarded, self._listen_loop, "the wake-up listener")]
            while not self.draining and self._fatal is None:
                try:
                    self._redis(self.run_once, "claim", give_up=self._leaving)
                except Stopping:
                    break
                if self._fatal is None and (not self._backlog or self.free_slots() == 0 or not self.services):
                    self._wait_for_work()
            if self._fatal is None:
                self._drain()
        except Exception as exc:  # not an outage (those are waited out): the worker ends, supervisord restarts it
            self._die(exc, "the claim loop")
        finally:
            for greenlet in self._greenlets:
                greenlet.kill(block=False)
            if registered:
                self._deregister()
            for connector in self.connectors.values():
                connector.stop()
            self.stopped.set()
            log.info("worker stopped id=%s", self.id)
        return 0 if self._fatal is None else 1

    def terminate(self) -> None:
        """SIGTERM: the first stops claiming and drains; the second hands back running jobs at once."""
        self._term_count += 1
        self.draining = True
        self.stop_deadline()
        self._wake.set()
        if self._term_count > 1:
            unfinished = self._unfinished()
            log.warning("second stop signal: handing back %d running jobs now", len(unfinished))
            for job in unfinished:
                job.context.stop("shutdown")

    def stop_deadline(self) -> float:
        """When (time.monotonic()) a stopping worker exits, whatever it still holds: WORKER_DRAIN_SECONDS plus
        STOP_MARGIN_S after the stop signal (supervisord's stopwaitsecs, bin/appliance writes it so), less
        EXIT_RESERVE_S to deregister and exit before supervisord would SIGKILL it."""
        if self._stop_by is None:
            self._stop_by = time.monotonic() + self.settings.drain_seconds + STOP_MARGIN_S - EXIT_RESERVE_S
        return self._stop_by

    def _unfinished(self) -> list[Running]:
        """The jobs whose connector still runs (a finished one only has its outcome left to record)."""
        return [job for job in self.running.values() if not job.finished]

    def _leaving(self) -> bool:
        return self.draining or self._fatal is not None

    def _deregister(self) -> None:
        """Remove the worker's record: after a clean stop, waiting out an outage for up to DEREGISTER_WAIT_S;
        after an error, one try (its jobs are recovered when a worker with this id registers again)."""
        deadline = time.monotonic() + DEREGISTER_WAIT_S
        if self._stop_by is not None:
            deadline = min(deadline, self._stop_by)
        try:
            if self._fatal is not None:
                self.scripts.deregister_worker(self.id)
            else:
                self._redis(lambda: self.scripts.deregister_worker(self.id), "deregister",
                            give_up=lambda: time.monotonic() > deadline)
        except Stopping:
            log.warning("could not deregister worker %s: Redis stayed unavailable for %.0fs", self.id,
                        DEREGISTER_WAIT_S)
        except Exception as exc:
            log.warning("could not deregister worker %s: %s", self.id, exc)

    def _drain(self) -> None:
        try:
            self._redis(lambda: self.scripts.leave_idle(self.id, self.services), "leave the idle sets",
                        give_up=lambda: True)
        except Stopping:
            pass  # Redis is away: a wake-up for this worker skips it once it stops listening
        stop_by = self.stop_deadline()
        if self._unfinished():
            log.info("draining: waiting up to %ds for %d running jobs", self.settings.drain_seconds,
                     len(self._unfinished()))
        deadline = gevent.get_hub().loop.now() + self.settings.drain_seconds
        while self._unfinished() and gevent.get_hub().loop.now() < deadline and self._fatal is None:
            if all(job.context.stop_reason == "shutdown" for job in self._unfinished()):
                break
            self._wake.clear()
            self._wake.wait(0.2)
        for job in self._unfinished():
            job.context.stop("shutdown")
        # What is left records its outcome or hands its job back, waiting out an outage: a finished job's outcome
        # is held as long as supervisord lets the worker live (stop_deadline), then the worker exits anyway.
        held = [job for job in self.running.values() if job.finished]
        if held:
            log.info("draining: %d finished jobs wait to record their outcome (Redis unavailable?); holding them "
                     "for up to %.0fs", len(held), max(0.0, stop_by - time.monotonic()))
        for job in list(self.running.values()):
            if job.greenlet is not None:
                job.greenlet.join(max(0.0, stop_by - time.monotonic()))
        gevent.joinall(self._giving_back, timeout=max(0.0, stop_by - time.monotonic()))
        left = len(self.running) + sum(1 for g in self._giving_back if not g.dead)
        if left:
            log.warning("exiting with %d job outcomes or hand-backs not recorded: Redis stayed unavailable until "
                        "the stop deadline (WORKER_DRAIN_SECONDS + %ds after the stop signal, within supervisord's "
                        "stopwaitsecs); their jobs are recovered when their leases run out (a retry counted)",
                        left, STOP_MARGIN_S)

    # -- claiming -------------------------------------------------------------------------------------
    def free_slots(self) -> int:
        return max(0, self.settings.max_concurrent_jobs - len(self.running))

    def run_once(self, now_ms: int | None = None) -> int:
        """Claim as many jobs as there are free slots and start them; returns how many were claimed.

        A claim that left the worker's queues empty clears `backlog`: finishing jobs then does not set off
        further claims, until a wake-up says a job arrived (or the poll interval passes)."""
        slots = self.free_slots()
        if slots == 0 or self.draining or not self.services:
            return 0
        claimed = 0
        for _ in range(2):  # once more at once if the claim reports a new requirement class
            wakes = self._wakes
            result = self.scripts.claim(self.id, self.claim_queues(), slots, self.settings.lease_ms, now_ms,
                                        self.services)
            self._backlog = len(result.jobs) == slots or self._wakes != wakes
            self._next_due_ms = result.next_due_ms
            self._start_claimed(result.jobs)
            claimed += len(result.jobs)
            slots = self.free_slots()
            if not self.planner.observe(result.classes_version) or slots == 0:
                break
        return claimed

    def _start_claimed(self, jobs: list[Claimed]) -> None:
        for job in jobs:
            if self.free_slots() > 0:
                self._start(job)
            else:  # a job handed over while the claim was on its way took the slot
                self._give_back(job, "its slot was taken meanwhile")

    def claim_queues(self) -> list[str]:
        """The claim queues this worker can serve now: its healthy services' queues and the requirement
        classes it fits, given its latest telemetry (appliance/classes.py; cached between changes)."""
        services = [s for s in self.services if self.by_service[s].healthy()]
        return self.planner.queues(services, self.capabilities, self.sampler.latest)

    def _wait_for_work(self) -> None:
        timeout_s = self.settings.poll_interval_ms / 1000
        if self._next_due_ms is not None and self.free_slots() > 0:  # a due retry matters with a slot for it
            timeout_s = max(0.0, min(timeout_s, (self._next_due_ms - clock.now_ms()) / 1000))
        self._wake.wait(timeout_s)
        self._wake.clear()

    # -- running a job --------------------------------------------------------------------------------
    def _start(self, claimed: Claimed) -> None:
        fields = claimed.fields
        context = JobContext(fields, _json_object(fields.get("payload")), _json_object(fields.get("requirements")),
                             lambda pct, msg, step, total: self._report(claimed, pct, msg, step, total),
                             lambda fields, event: self._annotate(claimed, fields, event), self.outputs)
        job = Running(claimed, context)
        old = self.running.get(claimed.id)
        if old is not None:  # it lost the job (lease expired) and claimed it again: the old attempt is void
            old.context.stop("lost")
        self.running[claimed.id] = job
        job.greenlet = gevent.spawn(self._execute, job)
        log.info("job claimed id=%s service=%s priority=%s attempt=%s", claimed.id, context.service,
                 fields.get("priority"), claimed.attempt)

    def timeout_s(self, fields: dict[str, str]) -> float:
        value = fields.get("timeout_seconds")
        return float(value) if value else self.settings.job_timeout_minutes * 60

    def _execute(self, job: Running) -> None:
        context, claimed = job.context, job.claimed
        connector = self.by_service[context.service]
        runner = gevent.spawn(_outcome, connector.run, context)
        try:
            gevent.wait([runner, context.stopped], timeout=self.timeout_s(claimed.fields), count=1)
            if not runner.ready():
                context.stop("timeout")
                self._hard_stop(connector, context, runner)
            self._record(job, runner)
        except Exception as exc:  # not an outage: the worker ends (its jobs are recovered when it registers again)
            self._die(exc, f"recording the outcome of job {claimed.id}")
        finally:
            if self.running.get(claimed.id) is job:
                del self.running[claimed.id]
            if self._backlog or self.draining:  # a free slot matters only if there may be work for it
                self._wake.set()

    def _hard_stop(self, connector: Connector, context: JobContext, runner: gevent.Greenlet) -> None:
        """Tell the connector to stop the job, then abandon the attempt for real if it does not."""
        try:
            connector.cancel(context)
        except Exception:
            log.exception("connector cancel failed id=%s", context.id)
        runner.join(STOP_GRACE_S)
        if not runner.ready():
            runner.kill(block=True, timeout=1)

    def _record(self, job: Running, runner: gevent.Greenlet) -> None:
        context, claimed = job.context, job.claimed
        job_id, attempt = claimed.id, claimed.attempt
        job.finished = True  # a drain no longer waits for it: only its outcome is left (see _drain)
        self._wake.set()
        reason = context.stop_reason
        outcome = runner.value if runner.successful() and isinstance(runner.value, Outcome) else \
            Outcome(error=JobStopped("the connector's run was stopped"))
        finished = outcome.error is None
        error = outcome.error
        if finished:
            try:  # a result that cannot be stored fails the job (else it stays held forever)
                orjson.dumps(outcome.value)
            except TypeError as exc:
                finished, error = False, ConnectorError(f"result is not JSON-serialisable: {exc}", retryable=False)
        if job.flush_later is not None:
            job.flush_later.kill()
        if reason != "lost":
            self._flush_progress(job, persist=True)
            reason = context.stop_reason
        try:
            if reason == "lost":
                log.warning("job lost id=%s: this attempt no longer holds it (cancelled, or its lease ran out); its "
                            "outcome is dropped", job_id)
            elif finished and reason != "cancel":
                self._complete(Completion(job_id, self.id, attempt, outcome.value))
                log.info("job completed id=%s", job_id)
            elif reason == "shutdown":
                self._redis(lambda: self.scripts.release(job_id, self.id, attempt, "worker shutting down"),
                            "hand back a job")
                log.info("job handed back id=%s", job_id)
            elif reason == "cancel":
                self._cancelled(job_id, attempt)
            elif reason == "timeout":
                message = f"Job timed out after {self.timeout_s(claimed.fields):g}s"
                self._fail(job_id, attempt, message, retryable=True, final_status="timeout")
            elif isinstance(error, ServiceUnavailable):  # the service's outage, not the job's failure
                self._redis(lambda: self.scripts.release(job_id, self.id, attempt, f"handed back: {error}"),
                            "hand back a job")
                log.warning("job handed back id=%s: %s", job_id, error)
            elif isinstance(error, ConnectorError):
                self._fail(job_id, attempt, str(error), retryable=error.retryable, details=error.details)
            else:
                self._fail(job_id, attempt, f"{type(error).__name__}: {error}", retryable=True)
        except (JobLost, JobNotFound) as exc:
            log.warning("job outcome refused id=%s: %s", job_id, exc)

    def _cancelled(self, job_id: str, attempt: str) -> None:
        """A cancelled job's connector has stopped. The cancel ended the job in Redis already (cancel_job); a
        job whose cancel was only flagged (a record from before that) is ended here."""
        try:
            self._redis(lambda: self.scripts.fail(job_id, self.id, attempt, "Job cancelled by user",
                                                  retryable=False, final_status="cancelled"), "record a cancel")
        except (JobLost, JobNotFound):
            pass
        log.info("job cancelled id=%s", job_id)

    def _complete(self, completion: Completion) -> None:
        """Record a success through the reporter, which sends the completions of jobs that finish together
        in one pipeline. Raises JobLost or JobNotFound like `Scripts.complete`."""
        done: gevent.event.AsyncResult = gevent.event.AsyncResult()
        self._completions.append((completion, done))
        self._completions_ready.set()
        if self._reporter is None or self._reporter.dead:
            self._reporter = gevent.spawn(self._report_completions)
        code = done.get()
        if code == "lost":
            raise JobLost(completion.job_id, self.id)
        if code == "not_found":
            raise JobNotFound(completion.job_id)

    def _report_completions(self) -> None:
        while True:
            self._completions_ready.wait()
            self._completions_ready.clear()
            gevent.sleep(0)  # let the other jobs finishing now join this batch
            batch, self._completions = self._completions, []
            if not batch:
                continue
            try:
                codes = self._redis(functools.partial(self.scripts.complete_many, [c for c, _ in batch]),
                                    "record completions")
            except Exception as exc:  # not an outage: each waiting job gets the error
                for _, done in batch:
                    done.set_exception(exc)
                continue
            for (_, done), code in zip(batch, codes, strict=True):
                done.set(code)

    def _fail(self, job_id: str, attempt: str, message: str, *, retryable: bool,
              final_status: str = "failed", details: dict[str, Any] | None = None) -> None:
        """Record a failed attempt: retried after its backoff (appliance.retry, computed by the script) while
        retries remain, else ended. `details` (the connector's) are stored with it, bounded in size."""
        text = _details_json(details)
        result = self._redis(lambda: self.scripts.fail(job_id, self.id, attempt, message, retryable=retryable,
                                                       final_status=final_status, details=text),
                             "record a failure")
        if result.retrying:
            log.warning("job failed, will retry id=%s retry=%d error=%s", job_id, result.retry_count, message)
            if self._next_due_ms is None or result.due_ms < self._next_due_ms:
                self._next_due_ms = result.due_ms
            self._wake.set()  # the claim loop waits until the retry is due, not for the poll interval
        else:
            log.warning("job ended id=%s status=%s error=%s", job_id, result.status, message)

    def _report(self, claimed: Claimed, percent: int, message: str, step: int | str, total: int | str) -> None:
        """Write a progress step; while Redis is down, hold steps (the latest BACKLOG_MAX) to deliver later."""
        job = self.running.get(claimed.id)
        if job is None or job.claimed is not claimed:
            return
        job.backlog.append((percent, message, step, total))
        del job.backlog[:-BACKLOG_MAX]
        # at most WORKER_PROGRESS_MAX_PER_SECOND writes per job (a second's worth at once): a step that comes
        # sooner replaces the one held back and goes out when a write is due (or at the job's end), so the
        # latest step always arrives
        wait_s = self._progress_wait_s(job)
        if wait_s > 0:
            del job.backlog[:-1]
            if job.flush_later is None or job.flush_later.dead:
                job.flush_later = gevent.spawn_later(wait_s, self._flush_held, job)
            return
        self._flush_progress(job, persist=False)

    def _progress_wait_s(self, job: Running) -> float:
        """0 and a write taken from the job's bucket, or the seconds until one is due."""
        rate = self.settings.progress_max_per_second
        now = time.monotonic()
        burst = max(1.0, rate)
        job.progress_tokens = min(burst, job.progress_tokens + (now - job.progress_at) * rate)
        job.progress_at = now
        if job.progress_tokens >= 1:
            job.progress_tokens -= 1
            return 0.0
        return (1 - job.progress_tokens) / rate

    def _flush_held(self, job: Running) -> None:
        if self.running.get(job.claimed.id) is job and job.backlog:
            if self._progress_wait_s(job) > 0:
                job.progress_tokens -= 1      # due by now all but rounding: take the write all the same
            self._flush_progress(job, persist=False)

    def _flush_progress(self, job: Running, *, persist: bool) -> None:
        """Write the held progress steps in order. With `persist` (the job's end), wait out an outage; without,
        keep them held until the next step or the end. An error that is not an outage ends the worker."""
        claimed = job.claimed
        while job.backlog:
            write = functools.partial(self.scripts.progress, claimed.id, self.id, claimed.attempt, *job.backlog[0])
            try:
                self._redis(write, "write progress") if persist else write()
            except (JobLost, JobNotFound):
                job.backlog.clear()
                job.context.stop("lost")
                return
            except redis.RedisError as exc:
                if is_outage(exc):
                    log.warning("progress held until Redis is back id=%s (%d steps held): %s", claimed.id,
                                len(job.backlog), exc)
                elif not persist:  # raised from a connector's progress call: never into the connector
                    self._die(exc, f"writing progress of job {claimed.id}")
                else:
                    raise
                return
            job.backlog.pop(0)

    def _annotate(self, claimed: Claimed, fields: dict[str, str], event: str) -> None:
        """A connector's own fields on its job (`<service>_...` only), fenced by the attempt like progress. One
        try: while Redis is away or the job was lost, it is logged and dropped."""
        job = self.running.get(claimed.id)
        if job is None or job.claimed is not claimed:
            return
        prefix = job.context.service + "_"
        named = {str(k): str(v) for k, v in fields.items() if str(k).startswith(prefix)}
        if len(named) != len(fields):
            log.warning("job annotation refused id=%s: field names must start with %r", claimed.id, prefix)
            return
        try:
            self.scripts.annotate(claimed.id, self.id, claimed.attempt, named, event)
        except (JobLost, JobNotFound):
            job.context.stop("lost")
        except redis.RedisError as exc:
            log.warning("job annotation dropped id=%s: %s", claimed.id, exc)

    def stop_job(self, job_id: str, reason: str) -> bool:
        job = self.running.get(job_id)
        if job is None:
            return False
        job.context.stop(reason)
        return True

    # -- background loops -----------------------------------------------------------------------------
    def heartbeat(self, now_ms: int | None = None) -> None:
        """Refresh heartbeat, telemetry and leases; stop jobs whose lease was lost; re-register if unknown."""
        offers = self.offers()
        fields = {
            "telemetry": orjson.dumps(self.sampler.sample()).decode(),
            "capabilities": orjson.dumps(self.capabilities()).decode(),
            "services": ",".join(s for s, error in offers.items() if not error),
            "services_health": self.services_health(),
        }
        running = {job_id: job.claimed.attempt for job_id, job in self.running.items()}
        beat = self.scripts.heartbeat_worker(self.id, self.settings.heartbeat_ttl_s, self.settings.lease_ms,
                                             fields, running, offers, now_ms)
        if beat is None:
            log.warning("worker record missing (Redis restarted or flushed?): registering again")
            self.register()
            return
        for job_id in beat.lost:
            self.stop_job(job_id, "lost")
        for job_id in beat.cancel:
            self.stop_job(job_id, "cancel")
        for job_id, attempt in beat.orphans.items():
            if job_id not in self.running:
                log.warning("job handed to this worker never arrived id=%s: giving it back", job_id)
                self._give_back(Claimed({"id": job_id, "attempt": attempt}), "its hand-off message was lost")
        recovery = self.scripts.recover(now_ms=now_ms)
        if recovery.jobs or recovery.dead_workers:
            log.warning("recovered %d jobs with expired leases; workers gone: %s", recovery.jobs,
                        ",".join(recovery.dead_workers) or "none")

    def beat_interval_s(self) -> float:
        return min(self.settings.heartbeat_interval_ms, self.settings.lease_ms / 3) / 1000

    def _heartbeat_loop(self) -> None:
        """Beat every interval; while Redis is away, try again at short intervals (outage_waits), so that the
        worker renews its leases soon after Redis is back."""
        while True:
            gevent.sleep(self.beat_interval_s())
            self._redis(self.heartbeat, "heartbeat")

    def _listen_loop(self) -> None:
        while True:
            self._redis(self._listen, "listen for wake-ups")

    def _listen(self) -> None:
        """Subscribe to the worker's wake-up and cancel channels and handle messages until the connection fails."""
        channels = [self.keys.wake(s) for s in self.services] + [self.keys.wake_worker(self.id), self.keys.cancels]
        pubsub = self.listener_client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(*channels)
            # Read the subscribed connection directly: PubSub.listen's per-message machinery costs more than the
            # message (wake-ups arrive every few jobs under load).
            connection = pubsub.connection
            for _ in channels:  # subscribed for sure before the claim below can make this worker idle
                connection.read_response()
            self._woken()  # anything submitted while we were not listening
            own = self.keys.wake_worker(self.id)
            while True:
                kind, channel, data = connection.read_response()
                if kind == "message":
                    self._on_message(channel, data, own)
        finally:
            pubsub.close()

    def _on_message(self, channel: str, data: str, own: str) -> None:
        try:
            if channel == self.keys.cancels:
                self._on_cancel(data)
            elif channel == own and data.startswith("["):
                self._handed(data)
            else:
                self._woken()
        except Exception:  # one bad message must not end the listener
            log.exception("wake-up or cancel message not understood on %s: %.200s", channel, data)
            self._woken()

    def _woken(self) -> None:
        """A job arrived in an empty claim queue of ours: claim again."""
        self._wakes += 1
        self._backlog = True
        self._wake.set()

    def _handed(self, data: str) -> None:
        """A job handed to this idle worker at submit (already assigned to it, see `wake` in _lib.lua): run it,
        or give it back if its slot has gone meanwhile (a claim raced it) or the worker is draining."""
        flat = orjson.loads(data)
        claimed = Claimed(dict(zip(flat[::2], flat[1::2], strict=False)))
        connector = self.by_service.get(claimed.fields.get("service_required", ""))
        if self.draining:
            self._give_back(claimed, "the worker is stopping")
        elif self.free_slots() == 0:
            self._give_back(claimed, "its slot was taken meanwhile")
        elif connector is None or not connector.healthy():
            self._give_back(claimed, "its service is not available on this worker now")
        else:
            self._start(claimed)
        self._woken()  # claim again: what else waits, or back into the idle set

    def _give_back(self, claimed: Claimed, why: str) -> None:
        """Put a job this worker was given but will not run back in line (no retry counted), in the
        background; `_drain` waits for these before the worker deregisters."""
        def release() -> None:
            try:
                self._redis(lambda: self.scripts.release(claimed.id, self.id, claimed.attempt, f"handed back: {why}"),
                            "hand back a job")
                log.info("job handed back id=%s: %s", claimed.id, why)
            except (JobLost, JobNotFound) as exc:
                log.warning("job hand-back refused id=%s: %s", claimed.id, exc)
            except Exception as exc:
                self._die(exc, f"handing back job {claimed.id}")

        self._giving_back = [g for g in self._giving_back if not g.dead] + [gevent.spawn(release)]

    def _on_cancel(self, data: str) -> None:
        try:
            command = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if command.get("worker_id") == self.id and self.stop_job(str(command.get("job_id")), "cancel"):
            log.info("cancel requested id=%s", command.get("job_id"))

    # -- Redis outages and errors ------------------------------------------------------------------------
    def _redis(self, fn: Callable[[], T], what: str, give_up: Callable[[], bool] | None = None) -> T:
        """Run `fn`, waiting out Redis outages (appliance.retry.is_outage) with backoff until it succeeds, or
        until `give_up()` (asked after each failure) says to stop: then Stopping is raised. Any other error is
        raised as it is: it is a bug or a misconfiguration, and ends the worker (`_die`)."""
        waits = outage_waits(self._outage_cap_s)
        began = said = 0.0
        while True:
            try:
                value = fn()
            except redis.RedisError as exc:
                if not is_outage(exc):
                    raise
                now = time.monotonic()
                if not began:
                    began = said = now
                    log.warning("Redis unavailable (%s): %s waits for it", exc, what)
                elif now - said >= OUTAGE_LOG_EVERY_S:
                    said = now
                    log.warning("Redis still unavailable after %.0fs (%s): %s waits for it", now - began, exc, what)
                if give_up is not None and give_up():
                    raise Stopping(what) from exc
                gevent.sleep(next(waits))
                continue
            if began:
                log.info("Redis is back: %s went through after %.1fs", what, time.monotonic() - began)
            return value

    def _guarded(self, loop: Callable[[], None], what: str) -> None:
        """Run a background loop; an error that escapes it (not an outage: those are waited out) ends the worker."""
        try:
            loop()
        except Exception as exc:
            self._die(exc, what)

    def _die(self, exc: BaseException, what: str) -> None:
        """End the worker after an error that is not a Redis outage: log it (once), stop claiming; `run` returns
        1, and supervisord starts the worker again."""
        if self._fatal is None:
            self._fatal = exc
            log.error("%s failed with an error that is not a Redis outage; stopping the worker (exit 1) so that "
                      "it is started again: %s: %s", what, type(exc).__name__, exc, exc_info=exc)
        self._wake.set()


@dataclass(frozen=True)
class Outcome:
    """How a connector's run ended: a value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None


def _outcome(fn: Callable[[JobContext], Any], context: JobContext) -> Outcome:
    try:
        return Outcome(value=fn(context))
    except Exception as exc:  # the connector's failure becomes the job's, never the worker's
        if not isinstance(exc, (ConnectorError, JobStopped)):
            log.exception("connector raised id=%s", context.id)
        return Outcome(error=exc)


def _details_json(details: dict[str, Any] | None) -> str:
    """A failure's details as JSON of at most ERROR_DETAILS_MAX_BYTES; when longer, a marker with the start."""
    if not details:
        return ""
    try:
        text = orjson.dumps(details, default=str)
    except TypeError as exc:
        return orjson.dumps({"_unserialisable": str(exc)}).decode()
    if len(text) <= ERROR_DETAILS_MAX_BYTES:
        return text.decode()
    head = text[:ERROR_DETAILS_MAX_BYTES - 200].decode(errors="ignore")
    return orjson.dumps({"_truncated": f"{len(text)} bytes, cut to the first {len(head)}", "start": head}).decode()


def _json_object(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
