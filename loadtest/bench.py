"""`bin/bench`: the appliance's benchmark, printed as figures beside their goals (nothing is asserted).

Cases, in one run on this machine: (1) end-to-end throughput of no-op jobs with the two default workers,
beside RQ's SimpleWorker (two workers, its own venv and redis-server, same Redis configuration);
(2) submit-to-claim latency for an idle worker; (3) claim cost with 100,000 pending jobs of another service
in front (on a bare redis-server); (4) SSE/WebSocket progress fan-out: (4a) steady subscriptions on the
bench's appliance (loadtest.fanout_figures), (4b) the locust `fanout` drill, subscribers following jobs to their
end and on to the next (loadtest.bench_fanout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from appliance.queue import Queue
from appliance.redis_conn import connect
from appliance.settings import QueueSettings
from loadtest import bench_cases
from loadtest.bench_cases import say
from loadtest.private import HOME, PrivateAppliance, PrivateRedis, stamp

GOAL_RATIO = 7.0
GOAL_P50_MS, GOAL_P99_MS = 1.5, 5.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bin/bench", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=10000, help="no-op jobs per round, appliance (10000)")
    p.add_argument("--rq-jobs", type=int, default=2000, help="no-op jobs per round, RQ (2000)")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds on each side (3; best and median)")
    p.add_argument("--samples", type=int, default=1000, help="submit-to-claim samples (1000)")
    p.add_argument("--in-front", type=int, default=100_000, help="pending jobs of another service (100000)")
    p.add_argument("--threads", type=int, default=4, help="submitting threads, both sides (4)")
    p.add_argument("--concurrency", type=int, default=32, help="WORKER_MAX_CONCURRENT_JOBS of the two workers")
    p.add_argument("--log-level", default="warning",
                   help="log level of both sides' workers (default warning: no line per job on either side)")
    p.add_argument("--fanout", type=int, default=1000, help="SSE/WebSocket subscribers for the fan-out case")
    p.add_argument("--skip", action="append", default=[], choices=["rq", "throughput", "latency", "claim", "fanout"],
                   help="leave a case out (repeatable)")
    p.add_argument("--run-dir", type=Path, default=None, help="run folder (default var/bench/<time>)")
    return p.parse_args(argv)


def commit() -> str:
    """The checkout's commit (with `+dirty` when the working tree has changes), for the record."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HOME, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HOME,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def row(case: str, figure: str, goal: str = "", verdict: str = "") -> str:
    return f"{case:<44} {figure:<34} {goal:<26} {verdict}"


def rates(side: dict[str, Any]) -> str:
    return f"{side['jobs_per_s']:,.0f} jobs/s best, {side['median_jobs_per_s']:,.0f} median"


def fmt(summary: dict[str, float], unit: str, digits: int = 2) -> str:
    return " / ".join(f"{summary[k]:.{digits}f}" for k in ("p50", "p95", "p99")) + f" {unit}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = (args.run_dir or HOME / "var" / "bench" / stamp()).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit(),
                               "loadavg_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    lines: list[str] = []
    say(f"run folder {work}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
        "(other processes on this machine make every figure noisy)")

    if "rq" not in args.skip and "throughput" not in args.skip:
        from loadtest.bench_rq import run_rq

        say("case 1b: RQ SimpleWorker throughput (two workers)")
        try:
            results["rq"] = run_rq(work, HOME / "var" / "bench" / "rq-venv", args.rq_jobs, 2, args.threads,
                                  args.log_level, args.rounds)
            say(f"  RQ: {rates(results['rq'])}")
        except Exception as exc:  # RQ is a comparison, not the subject: report and go on
            results["rq_error"] = str(exc)
            say(f"  RQ side failed: {exc}")

    if not {"throughput", "latency", "fanout"} <= set(args.skip):
        run_on_appliance(args, work, results)
    if "claim" not in args.skip:
        say(f"case 3: claim cost, alone and behind {args.in_front} pending jobs of another service (a bare "
            "redis-server with the appliance's configuration and scripts, nothing else talking to it)")
        with PrivateRedis(work, "claim") as server:
            bare = Queue(connect(server.url), QueueSettings(redis_url=server.url))
            results["claim"] = bench_cases.claim_cost(bare, args.in_front)
    if "fanout" not in args.skip:
        say(f"case 4b: progress fan-out through the locust fanout drill: {args.fanout} subscribers (half SSE, "
            "half WebSocket) following jobs to their end and on to the next, 30s (its own appliance)")
        from loadtest import bench_fanout

        results["fanout"] = bench_fanout.run(work, args.fanout)

    results["loadavg_at_end"] = os.getloadavg()
    lines.append(row("case", "figure", "goal", "verdict"))
    lines.append("-" * 112)
    ours, rq = results.get("throughput"), results.get("rq")
    if ours:
        lines.append(row("1 throughput, appliance (2 workers, noop)", rates(ours), f">= {GOAL_RATIO:g}x RQ"))
    if rq:
        lines.append(row("1 throughput, RQ SimpleWorker (2 workers)", rates(rq)))
    if ours and rq:
        ratio = ours["jobs_per_s"] / rq["jobs_per_s"]
        median_ratio = ours["median_jobs_per_s"] / rq["median_jobs_per_s"]
        results["ratio"], results["median_ratio"] = ratio, median_ratio
        lines.append(row("1 throughput ratio (best; median)", f"{ratio:.1f}x; {median_ratio:.1f}x",
                         f">= {GOAL_RATIO:g}x", "met" if ratio >= GOAL_RATIO else "MISSED"))
    elif ours:
        lines.append(row("1 throughput ratio", "n/a", "", f"RQ: {results.get('rq_error', 'skipped')}"))
    lat = results.get("latency")
    if lat:
        obs = lat["observed_ms"]
        met = obs["p50"] <= GOAL_P50_MS and obs["p99"] <= GOAL_P99_MS
        lines.append(row("2 submit-to-claim p50/p95/p99 (observed)", fmt(obs, "ms"),
                         f"p50<={GOAL_P50_MS:g}, p99<={GOAL_P99_MS:g} ms", "met" if met else "MISSED"))
        lines.append(row("  same, script clocks (1 ms resolution)", fmt(lat["recorded_ms"], "ms", 1)))
        lines.append(row("  submit to completed (the worker ran it)", fmt(lat["completed_ms"], "ms")))
        lines.append(row("  of which the submit call itself", fmt(lat["submit_call_ms"], "ms")))
        lines.append(row("  reference: one PING round trip", fmt(lat["ping_ms"], "ms")))
        lines.append(row(f"  same after {lat['gap_ms']:g} ms idle, as each job", fmt(lat["idle_ping_ms"], "ms"),
                         "(the host's wake-up cost)"))
    claim = results.get("claim")
    if claim:
        lines.append(row("3 claim, nothing else pending p50/p95/p99", fmt(claim["alone_us"], "us", 0)))
        lines.append(row(f"3 claim, {claim['in_front']:,} other jobs in front", fmt(claim["behind_us"], "us", 0),
                         "same as alone (no scan)", "met" if claim["ratio_p50"] <= 1.5 else "MISSED"))
        lines.append(row("  inside Redis per claim: alone / behind",
                         f"{claim['server_alone_us']:.1f} / {claim['server_behind_us']:.1f} us"))
    if results.get("fanout_steady"):
        lines.extend(steady_rows(results["fanout_steady"]))
    fan = results.get("fanout")
    if fan is not None:
        lines.extend(fanout_rows(fan))
    table = "\n".join(lines)
    print(table, flush=True)
    note = (f"commit {results['commit']}; load average {results['loadavg_at_start'][0]:.2f} at start, "
            f"{results['loadavg_at_end'][0]:.2f} at end on {results['cpus']} CPUs shared with other work: "
            "figures are noisy")
    print(note)
    (work / "bench.json").write_text(json.dumps(results, indent=2, default=_json_default))
    (work / "bench.txt").write_text(table + "\n" + note + "\n")
    say(f"figures saved in {work / 'bench.json'} and {work / 'bench.txt'}")
    return 0


def run_on_appliance(args: argparse.Namespace, work: Path, results: dict[str, Any]) -> None:
    """Cases 1a and 2 against a private appliance with two noop workers."""
    env = {"WORKER_CONNECTORS": "noop", "WORKER_SERVICES": "noop",
           "WORKER_MAX_CONCURRENT_JOBS": str(args.concurrency), "LOG_LEVEL": args.log_level}
    appliance = PrivateAppliance(work / "appliance", workers=2, env=env, quiet=True)
    say(f"starting a private appliance (2 noop workers, {args.concurrency} jobs each, LOG_LEVEL "
        f"{args.log_level}) in {appliance.run_dir}")
    appliance.start()
    try:
        queue = Queue(connect(appliance.redis_url), QueueSettings(redis_url=appliance.redis_url))
        if "throughput" not in args.skip:
            say(f"case 1a: appliance throughput, {args.rounds} rounds of {args.jobs} no-op jobs, two workers")
            results["throughput"] = bench_cases.throughput(queue, args.jobs, args.threads, args.rounds)
            say(f"  appliance: {rates(results['throughput'])}")
        if "latency" not in args.skip:
            say(f"case 2: submit-to-claim for an idle worker, {args.samples} jobs one at a time")
            results["latency"] = bench_cases.submit_to_claim(queue, args.samples)
        if "fanout" not in args.skip:
            results["fanout_steady"] = steady_fanout(queue, appliance.api_port, args.fanout)
    finally:
        say("stopping the private appliance")
        appliance.stop()


def steady_fanout(queue: Queue, api_port: int, subscribers: int) -> dict[str, Any]:
    """Case 4a: `loadtest.fanout_figures` (steady subscriptions, 20 events/s over 10 jobs) on the bench's API."""
    from loadtest import fanout_figures

    out: dict[str, Any] = {}
    for kind in ("sse", "ws"):
        say(f"case 4a: steady fan-out, {subscribers} {kind.upper()} subscribers on 10 jobs (loadtest.fanout_figures)")
        try:
            out[kind] = fanout_figures.measure(queue, api_port, subscribers, kind)
        except Exception as exc:  # a figure we could not take is reported, the bench goes on
            out[kind] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def steady_rows(fan: dict[str, Any]) -> list[str]:
    rows = []
    for kind, f in fan.items():
        if "error" in f:
            rows.append(row(f"4a steady fan-out {kind.upper()}", "not measured", "", f["error"][:60]))
            continue
        rows.append(row(f"4a steady fan-out {kind.upper()}, {f['subscribers']} subscribers",
                        fmt(f["latency_ms"], "ms", 1), "",
                        f"delivered {f['delivered']}/{f['expected']}, {f['client_errors']} errors"))
        rows.append(row("   Redis connections, API RSS per subscriber",
                        f"{f['redis_connections']} (before {f['redis_connections_before']}), "
                        f"{f['rss_per_connection_kb']} KB"))
    return rows


def fanout_rows(fan: dict[str, Any]) -> list[str]:
    if "skipped" in fan:
        return [row("4b drill fan-out", "not measured", "", fan["skipped"])]
    rows = []
    for kind in ("sse", "ws"):
        if kind in fan:
            f = fan[kind]
            rows.append(row(f"4b drill fan-out {kind.upper()}, {f['subscribers']} subscribers",
                            fmt(f["latency_ms"], "ms", 1), "", f"{f['delivered']} events delivered"))
    if fan.get("errors"):
        rows.append(row("4b drill fan-out errors", str(sum(fan["errors"].values())), "", "see fanout/summary.txt"))
    return rows


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
