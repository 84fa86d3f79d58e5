"""The benchmark's cases against a running appliance's Redis: throughput, submit-to-claim, claim cost.

Each case returns plain figures; `loadtest.bench` prints them beside their goals. Nothing here asserts.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import redis

from appliance.jobs import JobSpec
from appliance.queue import Queue


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def iso_ms(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000


def submit_many(queue: Queue, specs: Sequence[JobSpec], threads: int = 1,
                progress: Callable[[int], None] | None = None) -> None:
    """Submit each job with `Queue.submit` (one script call, one round trip each), from `threads` threads.

    `Queue.submit` reads the script's reply, so it cannot ride in a pipeline; RQ's side enqueues the same way,
    one `Queue.enqueue` call per job.
    """
    if threads <= 1:
        for n, spec in enumerate(specs, 1):
            queue.submit(spec)
            if progress and n % 1000 == 0:
                progress(n)
        return
    from concurrent.futures import ThreadPoolExecutor

    chunks = [specs[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda chunk: submit_many(queue, chunk, 1, progress), chunks):
            pass


def _completed(queue: Queue) -> int:
    return int(queue.client.hget(queue.keys.stats, "completed") or 0)


def throughput(queue: Queue, jobs: int, threads: int = 4, rounds: int = 1, service: str = "noop",
               timeout_s: float = 600) -> dict[str, Any]:
    """Submit `jobs` no-op jobs from `threads` threads; time until the workers have completed all of them.

    Done `rounds` times after a warm-up; `jobs_per_s` is the best round, `median_jobs_per_s` the median."""
    warm = min(200, jobs)
    base = _completed(queue)
    submit_many(queue, [JobSpec(service, priority=50) for _ in range(warm)])  # connections, scripts
    _wait_completed(queue, base + warm, timeout_s)
    measured = [_one_round(queue, jobs, threads, service, timeout_s) for _ in range(rounds)]
    rates = sorted(m["jobs_per_s"] for m in measured)
    return {"jobs": jobs, "rounds": measured, "jobs_per_s": rates[-1], "median_jobs_per_s": rates[len(rates) // 2]}


def _one_round(queue: Queue, jobs: int, threads: int, service: str, timeout_s: float) -> dict[str, Any]:
    base = _completed(queue)
    specs = [JobSpec(service, priority=50, payload={"n": n}) for n in range(jobs)]
    started = time.perf_counter()
    submit_many(queue, specs, threads)
    enqueue_s = time.perf_counter() - started
    _wait_completed(queue, base + jobs, timeout_s, started, jobs)
    total_s = time.perf_counter() - started
    return {"jobs": jobs, "enqueue_s": enqueue_s, "total_s": total_s, "jobs_per_s": jobs / total_s}


def _wait_completed(queue: Queue, target: int, timeout_s: float, started: float = 0.0, jobs: int = 0) -> None:
    """Poll the life-time `completed` counter until it reaches `target`, noting progress every 2 s."""
    deadline = time.monotonic() + timeout_s
    last_note = time.monotonic()
    while _completed(queue) < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers did not finish within {timeout_s:.0f}s; see the worker logs")
        if jobs and time.monotonic() - last_note > 2:
            done = _completed(queue) - (target - jobs)
            say(f"  {done}/{jobs} completed after {time.perf_counter() - started:.1f}s")
            last_note = time.monotonic()
        time.sleep(0.002)


def submit_to_claim(queue: Queue, samples: int, service: str = "noop", gap_s: float = 0.01) -> dict[str, Any]:
    """One job at a time into an idle worker: from the submit call to the claim.

    `observed_ms`: from just before the submit call until this client reads the job's `assigned` entry with
    an XREAD BLOCK on its progress stream, sent on a connection of its own before the submit (so that no
    request of the measurement follows the submit): an upper bound that includes one delivery to this client.
    The claim is made by the submit script itself when it hands the job to an idle worker, so `completed_ms`
    (until this client reads the `completed` entry the no-op job's worker wrote) shows when the worker really
    had it. `recorded_ms`: the claim's clock minus the submit's (both in whole milliseconds on this host's
    clock), read from the job's stream entries.
    """
    client = queue.client
    watch = client.connection_pool.make_connection()  # carries the XREAD sent ahead of each submit
    observed: list[float] = []
    completed: list[float] = []
    recorded: list[float] = []
    submit_calls: list[float] = []
    for n in range(samples + 20):
        time.sleep(gap_s)  # the worker is idle again: its last job finished long ago
        spec = JobSpec(service, priority=50)
        stream = queue.keys.progress(spec.id)
        watch.send_command("XREAD", "COUNT", 10, "BLOCK", 2000, "STREAMS", stream, "0")
        started = time.perf_counter()
        queue.submit(spec)
        returned = time.perf_counter()
        last_id, assigned, seen, done = "0", None, 0.0, False
        first = watch.read_response()  # raw: [[stream, [[id, [field, value, ...]], ...]]] or None
        entries = [(i, dict(zip(f[::2], f[1::2], strict=True))) for i, f in (first[0][1] if first else [])]
        while not done:
            if not entries:
                raise RuntimeError(f"job {spec.id} was not claimed and completed within 2 s; are the noop "
                                   "workers up?")
            for entry_id, fields in entries:
                last_id = entry_id
                if fields.get("event") == "submitted":
                    submitted_ms = iso_ms(fields["updated_at"])
                if fields.get("event") == "assigned":
                    assigned, seen = fields, time.perf_counter()
                done = done or fields.get("event") == "completed"
            if not done:
                more = client.xread({stream: last_id}, count=10, block=2000)
                entries = more[0][1] if more else []
        finished = time.perf_counter()
        if n >= 20 and assigned is not None:  # the first ones warm up connections and scripts
            observed.append((seen - started) * 1000)
            completed.append((finished - started) * 1000)
            submit_calls.append((returned - started) * 1000)
            recorded.append(iso_ms(assigned["updated_at"]) - submitted_ms)
    pings, idle_pings = [], []
    for _ in range(samples):
        started = time.perf_counter()
        client.ping()
        pings.append((time.perf_counter() - started) * 1000)
    watch.disconnect()
    for _ in range(samples):  # the same idle gap as the jobs: what waking idle processes costs on this host
        time.sleep(gap_s)
        started = time.perf_counter()
        client.ping()
        idle_pings.append((time.perf_counter() - started) * 1000)
    return {"samples": samples, "observed_ms": _summary(observed), "completed_ms": _summary(completed),
            "recorded_ms": _summary(recorded),
            "submit_call_ms": _summary(submit_calls),
            "ping_ms": _summary(pings), "idle_ping_ms": _summary(idle_pings), "gap_ms": gap_s * 1000}


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "max": max(values) if values else float("nan"), "mean": statistics.fmean(values) if values else 0.0}


def claim_cost(queue: Queue, in_front: int, claims: int = 2000) -> dict[str, Any]:
    """Time single-job claims of one service, first alone, then with `in_front` pending jobs of another
    service at a higher priority (a claimer that no worker competes with: services bench-mine/-other)."""
    mine, other = "bench-mine", "bench-other"
    keys = [queue.keys.pending_service(mine)]
    scripts = queue.scripts

    server: dict[str, float] = {}

    def offer() -> None:
        """Both services count as offered (else their jobs are unworkable at submit): a stand-in worker registers
        and leaves at once, so the claims below stay those of an unregistered claimer, as measured before."""
        scripts.register_worker("bench-claimer", 60, {}, {mine: "", other: ""})
        scripts.deregister_worker("bench-claimer")

    def measure(label: str) -> list[float]:
        offer()
        submit_many(queue, [JobSpec(mine, priority=10) for _ in range(claims)])
        before = _evalsha_stats(queue.client)
        times = []
        for _ in range(claims):
            started = time.perf_counter()
            result = scripts.claim("bench-claimer", keys, 1, 600_000)
            times.append((time.perf_counter() - started) * 1e6)
            if not result.jobs:
                raise RuntimeError(f"claim cost ({label}): the claim found no job")
        after = _evalsha_stats(queue.client)
        calls = after[0] - before[0]
        server[label] = (after[1] - before[1]) / calls if calls else float("nan")
        return times

    measure("warm-up")
    alone = measure("alone")
    say(f"  filling {in_front} pending jobs of service {other} in front (priority 1000000)")
    last = [0.0]

    def note(done: int) -> None:
        if time.monotonic() - last[0] > 2:
            say(f"  {done}/{in_front} submitted")
            last[0] = time.monotonic()

    offer()
    submit_many(queue, [JobSpec(other, priority=1_000_000) for _ in range(in_front)], threads=4, progress=note)
    depth = int(queue.client.zcard(queue.keys.pending_service(other)))
    waited = _wait_aof_rewrite(queue.client)
    if waited:
        say(f"  waited {waited:.1f}s for Redis's AOF rewrite (set off by the fill) to finish")
    behind = measure("behind")
    return {"claims": claims, "in_front": depth, "alone_us": _summary(alone), "behind_us": _summary(behind),
            "ratio_p50": percentile(behind, 50) / percentile(alone, 50),
            "server_alone_us": server["alone"], "server_behind_us": server["behind"]}


def _evalsha_stats(client: redis.Redis) -> tuple[int, int]:
    """Redis's own count of EVALSHA calls and the microseconds it spent in them (INFO commandstats)."""
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def _wait_aof_rewrite(client: redis.Redis, timeout_s: float = 120) -> float:
    """Wait while Redis rewrites its AOF (a forked child competing for the CPU); returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        info = client.info("persistence")
        if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
            break
        time.sleep(0.2)
    return time.monotonic() - started if time.monotonic() - started > 0.05 else 0.0


def redis_info(client: redis.Redis) -> dict[str, Any]:
    info = client.info("server")
    return {"version": info.get("redis_version"), "port": info.get("tcp_port")}
