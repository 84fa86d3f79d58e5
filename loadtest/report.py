"""A drill's summary (a JSON-ready dict) and the table `bin/loadtest` prints from it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from loadtest.audit import AuditResult
from loadtest.chaos import ChaosLog
from loadtest.drill import Drill
from loadtest.followers import DELIVERY


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.5) - 1))]

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": ordered[-1], "count": len(ordered)}


def _locust(env: Any, name: str, method: str) -> dict[str, float] | None:
    entry = env.stats.entries.get((name, method))
    if entry is None or not entry.num_requests:
        return None
    # locust's percentiles are rounded to its buckets (e.g. 17 ms for 16.6): never past the true maximum
    top = entry.max_response_time
    return {"p50": min(top, entry.get_response_time_percentile(0.5)),
            "p95": min(top, entry.get_response_time_percentile(0.95)),
            "p99": min(top, entry.get_response_time_percentile(0.99)), "max": top,
            "count": entry.num_requests, "failures": entry.num_failures}


def summarize(scenario: str, host: str, users: int, workers: int, load_s: float, drain_s: float, env: Any,
              drill: Drill, result: AuditResult, chaos: ChaosLog | None) -> dict[str, Any]:
    errors: dict[str, int] = {}
    for error in env.stats.errors.values():
        key = f"{error.method} {error.name}: {error.error}"
        errors[key] = errors.get(key, 0) + error.occurrences
    for exc in env.runner.exceptions.values() if env.runner else []:
        key = f"exception in a user: {exc['msg']}"
        errors[key] = errors.get(key, 0) + exc["count"]
    audit = result.summary()
    return {
        "scenario": scenario, "host": host, "users": users, "workers": workers, "load_s": round(load_s, 1),
        "drain_s": round(drain_s, 1), "loadavg": os.getloadavg(), "cpus": os.cpu_count(),
        "jobs": {"accepted": len(drill.ledger), "refused": dict(drill.rejected), "finished": result.finished,
                 "accepted_per_s": len(drill.ledger) / load_s if load_s else 0.0,
                 "finished_per_s": audit["finished_per_s"]},
        "latency_ms": {
            "submit (HTTP POST)": _locust(env, "submit", "POST"),
            "queue wait (submit to claim)": percentiles(result.queue_wait_ms),
            "end to end (submit to end)": percentiles(result.end_to_end_ms),
            "progress delivery SSE": _locust(env, DELIVERY, "SSE"),
            "progress delivery WS": _locust(env, DELIVERY, "WS"),
            "SSE connect": _locust(env, "connect", "SSE"),
            "WS connect": _locust(env, "connect", "WS"),
        },
        "errors": errors,
        "chaos": {"counts": dict(chaos.counts), "errors": chaos.errors, "events": chaos.events} if chaos else None,
        "audit": audit,
    }


def table(s: dict[str, Any]) -> str:
    jobs, audit = s["jobs"], s["audit"]
    lines = [f"scenario {s['scenario']}: {s['users']} users for {s['load_s']:g}s against {s['host']} "
             f"({s['workers']} workers); drained in {s['drain_s']:g}s; load average {s['loadavg'][0]:.2f} on "
             f"{s['cpus']} CPUs (shared machine: noisy)",
             f"jobs: accepted {jobs['accepted']:,} ({jobs['accepted_per_s']:.1f}/s), refused "
             f"{sum(jobs['refused'].values()):,}, finished {jobs['finished']:,}; throughput "
             f"{jobs['finished_per_s']:.1f} jobs/s (first submit to last end)",
             "CPU over the load phase (1.0 = one core): locust " + f"{s.get('client_cpu', 0):.2f}"
             + "".join(f", {name} {share:.2f}" for name, share in (s.get("program_cpu") or {}).items()),
             "",
             f"{'latency (ms)':<32} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8} {'count':>8}"]
    for name, row in s["latency_ms"].items():
        if row is None:
            continue
        lines.append(f"{name:<32} " + " ".join(f"{row[k]:>8.1f}" for k in ("p50", "p95", "p99", "max"))
                     + f" {row['count']:>8}")
    lines.append("")
    if s["errors"]:
        lines.append("errors by kind:")
        lines += [f"  {n:>6}  {kind}" for kind, n in sorted(s["errors"].items(), key=lambda kv: -kv[1])]
    else:
        lines.append("errors by kind: none")
    if s["chaos"]:
        c = s["chaos"]["counts"]
        lines.append(f"disruptions: {c.get('kill', 0)} SIGKILLs, {c.get('restart', 0)} workers back, "
                     f"{c.get('group_restart', 0)} group restarts, {c.get('redis_restart', 0)} Redis restarts"
                     + (f"; failed steps: {'; '.join(s['chaos']['errors'])}" if s["chaos"]["errors"] else ""))
    order = audit.get("order") or {}
    lines.append(f"audit: lost {audit['lost']}, finished twice {audit['finished_twice']} (completed twice "
                 f"{audit['completed_twice']}), stuck {audit['stuck']}, status/stream mismatch "
                 f"{audit['status_mismatch']}; statuses {audit['statuses']}; retried or requeued "
                 f"{audit['retried_or_requeued']}")
    lines.append(f"       jobs per worker {audit['per_worker']}")
    if order:
        lines.append(f"       priority order: {order['claims']} first claims replayed, {order['inversions']} "
                     f"inversions{'; ' + order['note'] if order.get('note') else ''}")
    for problem in audit["problems"]:
        lines.append(f"       problem: {problem}")
    for kind, ids in audit["examples"].items():
        if ids:
            lines.append(f"       e.g. {kind}: {', '.join(ids)}")
    lines.append(f"AUDIT {'PASSED' if audit['ok'] else 'FAILED'}")
    return "\n".join(lines)
