"""The audit after a drill: every job the users saw accepted is accounted for in Redis.

Per job it reads the record and the job's own event stream (`progress:{id}`): the terminal status, how many
terminal events the stream holds (two means the job finished twice), and whether a job that has not finished
is still somewhere a worker will find it (its claim queue, the retry schedule, a lease) or nowhere (lost).
The priority check replays the appliance-wide `events` stream, whose order is the order the scripts ran in.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

from appliance.keys import Keys

TERMINAL = frozenset({"completed", "failed", "timeout", "cancelled"})
BATCH = 500


def iso_ms(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000
    except ValueError:
        return None


@dataclass
class AuditResult:
    """What the audit found; `ok` is the verdict."""

    accepted: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    finished_twice: list[str] = field(default_factory=list)
    completed_twice: list[str] = field(default_factory=list)
    status_mismatch: list[str] = field(default_factory=list)
    attempts_over_one: int = 0
    per_worker: Counter[str] = field(default_factory=Counter)
    queue_wait_ms: list[float] = field(default_factory=list)
    end_to_end_ms: list[float] = field(default_factory=list)
    first_submitted_ms: float | None = None
    last_finished_ms: float | None = None
    order: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return sum(n for status, n in self.statuses.items() if status in TERMINAL)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.stuck or self.finished_twice or self.status_mismatch or self.problems)

    def summary(self) -> dict[str, Any]:
        span_s = ((self.last_finished_ms - self.first_submitted_ms) / 1000
                  if self.first_submitted_ms is not None and self.last_finished_ms is not None else 0.0)
        return {
            "ok": self.ok, "accepted": self.accepted, "finished": self.finished, "statuses": dict(self.statuses),
            "lost": len(self.lost), "stuck": len(self.stuck), "finished_twice": len(self.finished_twice),
            "completed_twice": len(self.completed_twice), "status_mismatch": len(self.status_mismatch),
            "retried_or_requeued": self.attempts_over_one, "per_worker": dict(self.per_worker),
            "span_s": span_s, "finished_per_s": self.finished / span_s if span_s > 0 else 0.0,
            "order": self.order, "problems": self.problems,
            "examples": {"lost": self.lost[:5], "stuck": self.stuck[:5], "finished_twice": self.finished_twice[:5],
                         "status_mismatch": self.status_mismatch[:5]},
        }


def _chunks(items: Sequence[str], size: int = BATCH) -> Iterable[Sequence[str]]:
    for first in range(0, len(items), size):
        yield items[first:first + size]


def unfinished(client: redis.Redis, keys: Keys, job_ids: Sequence[str]) -> list[str]:
    """The ids among `job_ids` whose record does not show a terminal status (missing ones included)."""
    left = []
    for chunk in _chunks(job_ids):
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hget(keys.job(job_id), "status")
        for job_id, status in zip(chunk, pipe.execute(), strict=True):
            if status not in TERMINAL:
                left.append(job_id)
    return left


def wait_for_drain(client: redis.Redis, keys: Keys, job_ids: Sequence[str], timeout_s: float,
                   say: Callable[[str], None]) -> float:
    """Wait until every job is terminal or `timeout_s` passes, noting progress; returns the seconds waited.

    Redis may be unreachable for a moment (a drill restarts it): such errors only mean "not yet"."""
    started = time.monotonic()
    left = list(job_ids)
    last_note = 0.0
    while True:
        try:
            left = unfinished(client, keys, left)
        except redis.RedisError as exc:
            say(f"drain: Redis not reachable ({exc}); retrying")
        if not left or time.monotonic() - started > timeout_s:
            return time.monotonic() - started
        if time.monotonic() - last_note > 3:
            say(f"drain: {len(left)} of {len(job_ids)} accepted jobs not finished yet "
                f"({time.monotonic() - started:.0f}s of at most {timeout_s:.0f}s)")
            last_note = time.monotonic()
        time.sleep(0.25)


def audit(client: redis.Redis, keys: Keys, job_ids: Sequence[str]) -> AuditResult:
    """Account for every accepted job (see the module docstring)."""
    result = AuditResult(accepted=len(job_ids))
    seen: set[str] = set()
    for chunk in _chunks(list(dict.fromkeys(job_ids))):
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(keys.job(job_id), "status", "queue", "worker_id", "attempt")
            pipe.xrange(keys.progress(job_id), "-", "+")
            pipe.zscore(keys.delayed, job_id)
            pipe.zscore(keys.leases, job_id)
        replies = pipe.execute()
        for n, job_id in enumerate(chunk):
            fields, entries, delayed, leased = replies[4 * n:4 * n + 4]
            seen.add(job_id)
            _one(client, keys, result, job_id, fields, entries, delayed is not None, leased is not None)
    if len(seen) != len(job_ids):
        result.problems.append(f"{len(job_ids) - len(seen)} job ids were accepted twice by the API")
    return result


def _one(client: redis.Redis, keys: Keys, result: AuditResult, job_id: str, fields: list[str | None],
         entries: list[tuple[str, dict[str, str]]], delayed: bool, leased: bool) -> None:
    status, queue, worker_id, attempt = fields
    if status is None:
        result.statuses["(no record)"] += 1
        result.lost.append(job_id)
        return
    result.statuses[status] += 1
    events = [(f.get("event", ""), f) for _, f in entries]
    terminal = [(e, f) for e, f in events if e in TERMINAL]
    if len(terminal) > 1:
        result.finished_twice.append(job_id)
    if sum(1 for e, _ in terminal if e == "completed") > 1:
        result.completed_twice.append(job_id)
    if int(attempt or 0) > 1 or any(e in ("requeued", "retrying") for e, _ in events):
        result.attempts_over_one += 1
    submitted = next((iso_ms(f.get("updated_at")) for e, f in events if e == "submitted"), None)
    assigned = next((iso_ms(f.get("updated_at")) for e, f in events if e == "assigned"), None)
    if submitted is not None:
        result.first_submitted_ms = min(submitted, result.first_submitted_ms or submitted)
        if assigned is not None:
            result.queue_wait_ms.append(assigned - submitted)
    if status in TERMINAL:
        if not terminal:
            result.status_mismatch.append(job_id)  # finished, but its stream never said so
            return
        event, last = terminal[-1]
        if event != status:
            result.status_mismatch.append(job_id)
        done = iso_ms(last.get("updated_at"))
        if done is not None:
            result.last_finished_ms = max(done, result.last_finished_ms or done)
            if submitted is not None:
                result.end_to_end_ms.append(done - submitted)
        if status == "completed":
            result.per_worker[last.get("worker_id") or worker_id or "?"] += 1
        return
    in_line = bool(queue) and client.zscore(queue, job_id) is not None
    if in_line or delayed or leased:
        result.stuck.append(job_id)
    else:
        result.lost.append(job_id)  # not finished and nowhere a worker would find it


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _complete_since(client: redis.Redis, keys: Keys, since_id: str) -> bool:
    """Whether the `events` stream still holds every entry after `since_id` (none trimmed away)."""
    if _id(since_id) != (0, 0):
        first = client.xrange(keys.events, "-", "+", count=1)
        return bool(first) and _id(first[0][0]) <= _id(since_id)
    try:
        info = client.xinfo_stream(keys.events)
    except redis.ResponseError:
        return True  # no stream: nothing was trimmed
    added = info.get("entries-added")  # Redis 7; 6.2 does not say, and we assume nothing was trimmed
    return added is None or int(added) == int(info.get("length", 0))


def check_order(client: redis.Redis, keys: Keys, job_ids: Iterable[str], since_id: str) -> dict[str, Any]:
    """Replay the `events` stream from `since_id`: each first claim of a job must take the best pending job
    of its service (highest priority, then earliest), among the drill's jobs.

    A job going back to the retry schedule leaves the pending set (it re-enters silently when due), so the
    check can miss an inversion after a retry but never reports a false one."""
    ours = set(job_ids)
    complete = _complete_since(client, keys, since_id)
    heaps: dict[str, list[tuple[int, int, str]]] = {}
    pending: dict[str, tuple[int, int, str]] = {}
    known: dict[str, tuple[int, str, int]] = {}
    inversions: list[dict[str, Any]] = []
    claims = 0
    order = 0
    cursor = f"({since_id}"
    while True:
        entries = client.xrange(keys.events, cursor, "+", count=5000)
        if not entries:
            break
        cursor = f"({entries[-1][0]}"
        for _, f in entries:
            job_id, event = f.get("job_id", ""), f.get("event", "")
            if job_id not in ours:
                continue
            order += 1
            if event == "submitted":
                known[job_id] = (int(f.get("priority") or 0), f.get("service_required", ""), order)
            if event in ("submitted", "requeued") and job_id in known:
                priority, service, place = known[job_id]  # a requeued job keeps its place in line
                item = (-priority, place, job_id)
                pending[job_id] = item
                heapq.heappush(heaps.setdefault(service, []), item)
            elif event == "assigned":
                item = pending.pop(job_id, None)
                if item is None:
                    continue
                claims += 1
                heap = heaps[known[job_id][1]]
                while heap and pending.get(heap[0][2]) != heap[0] and heap[0] != item:
                    heapq.heappop(heap)
                if heap and heap[0] != item and heap[0] < item:
                    best = heap[0]
                    inversions.append({"claimed": job_id, "priority": -item[0], "waiting": best[2],
                                       "waiting_priority": -best[0]})
            elif event in TERMINAL or event == "retrying":
                pending.pop(job_id, None)
    return {"checked": complete, "claims": claims, "inversions": len(inversions), "examples": inversions[:5],
            "note": "" if complete else "the events stream was trimmed before the drill began: partial check"}
