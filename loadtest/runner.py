"""`bin/loadtest SCENARIO`: run a locust drill headless for a bounded time, then audit Redis.

Starts a private appliance in its own run folder (or uses `--host`), runs the scenario's users with locust as
a library, lets the queue drain, audits every accepted job (lost, finished twice, stuck), writes locust's CSV
and HTML report and a summary under the run folder, prints a table, and exits 1 when the audit fails.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.util  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.html import get_html_report  # noqa: E402
from locust.stats import PERCENTILES_TO_REPORT, StatsCSVFileWriter, stats_history  # noqa: E402

from appliance.keys import Keys  # noqa: E402
from appliance.redis_conn import connect  # noqa: E402
from appliance.runtime import Paths, client_url, run_paths  # noqa: E402
from appliance.settings import QueueSettings, SettingsError  # noqa: E402
from loadtest import report  # noqa: E402
from loadtest.audit import audit, check_order, wait_for_drain  # noqa: E402
from loadtest.chaos import Chaos  # noqa: E402
from loadtest.drill import Drill  # noqa: E402
from loadtest.locustfile import SCENARIOS  # noqa: E402
from loadtest.private import HOME, PrivateAppliance, stamp  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    """Defaults of one scenario: load, workers, job shape, and the private appliance's settings."""

    users: int
    spawn_rate: float
    duration_s: float
    workers: int
    job_ms: tuple[int, int]
    steps: int
    drain_s: float = 60.0
    env: dict[str, str] = field(default_factory=dict)


FAST_LEASES = {"WORKER_LEASE_MS": "5000", "WORKER_HEARTBEAT_INTERVAL_MS": "1000", "WORKER_DRAIN_SECONDS": "5"}
DEFAULTS = {
    "basic": Scenario(10, 5, 30, 2, (200, 1000), 5, env={"WORKER_MAX_CONCURRENT_JOBS": "4"}),
    "priority": Scenario(2, 2, 30, 2, (100, 300), 2,
                         env={"WORKER_MAX_CONCURRENT_JOBS": "1", "EVENTS_STREAM_MAXLEN": "500000"}),
    "scale": Scenario(50, 25, 60, 5, (0, 50), 1, env={"WORKER_MAX_CONCURRENT_JOBS": "10"}),
    "resilience": Scenario(10, 10, 60, 3, (100, 500), 4, drain_s=90,
                           env={"WORKER_MAX_CONCURRENT_JOBS": "4", **FAST_LEASES}),
    "fanout": Scenario(1000, 200, 60, 2, (4000, 6000), 20, env={"WORKER_MAX_CONCURRENT_JOBS": "16"}),
}
ORDER_CHECKED = ("basic", "priority")


def say(message: str) -> None:
    print(f"loadtest: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bin/loadtest", description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--users", type=int, help="locust users (scenario default)")
    p.add_argument("--spawn-rate", type=float, help="users started per second")
    p.add_argument("--duration", type=float, help="seconds of load (then the queue drains and is audited)")
    p.add_argument("--workers", type=int, help="worker processes of the private appliance (WORKER_COUNT)")
    p.add_argument("--host", help="use this running appliance (e.g. http://127.0.0.1:3001) instead of starting one")
    p.add_argument("--redis-url", help="the Redis of --host, for the audit (default: REDIS_URL, as the appliance)")
    p.add_argument("--supervisor-dir", type=Path,
                   help="run folder of --host, whose supervisor.sock the resilience drill uses (default: "
                        "APPLIANCE_RUN_DIR, as the appliance)")
    p.add_argument("--drain", type=float, help="seconds to wait for accepted jobs to finish before the audit")
    p.add_argument("--run-dir", type=Path, help="where results go (default var/loadtest/SCENARIO-<time>)")
    p.add_argument("--keep", action="store_true", help="leave the private appliance running")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for the private appliance, over the scenario's (repeatable)")
    p.add_argument("--json", type=Path, help="also write the summary JSON here")
    args = p.parse_args(argv)
    for item in args.env:
        if "=" not in item or not item.split("=", 1)[0].isidentifier():
            p.error(f"--env {item!r}: expected NAME=VALUE")
    if args.host:
        try:
            args.supervisor_dir = args.supervisor_dir or run_paths(os.environ).run_dir
            # the appliance's embedded Redis takes the password its run folder keeps
            args.redis_url = args.redis_url or client_url(QueueSettings.from_env(os.environ).redis_url,
                                                          Paths(args.supervisor_dir))
        except SettingsError as exc:
            p.error(f"bad setting: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    main_greenlet = gevent.getcurrent()
    for signum in (signal.SIGTERM, signal.SIGINT):  # stop the private appliance on the way out
        gevent.signal_handler(signum, gevent.kill, main_greenlet, SystemExit(128 + signum))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    scenario = DEFAULTS[args.scenario]
    users = args.users or scenario.users
    duration = args.duration or scenario.duration_s
    workers = args.workers or scenario.workers
    run_dir = (args.run_dir or HOME / "var" / "loadtest" / f"{args.scenario}-{stamp()}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    appliance = None
    if args.host:
        host, redis_url = args.host.rstrip("/"), args.redis_url
        socket_path = args.supervisor_dir / "supervisor.sock"
    else:
        extra = dict(item.split("=", 1) for item in args.env)
        appliance = PrivateAppliance(run_dir / "appliance", workers, {**scenario.env, **extra}, quiet=True)
        say(f"starting a private appliance ({workers} workers) in {appliance.run_dir}")
        appliance.start()
        host, redis_url, socket_path = appliance.url, appliance.redis_url, appliance.socket
    try:
        summary = drill(args, scenario, host, redis_url, socket_path, run_dir, users, duration, workers)
    finally:
        if appliance is not None and not args.keep:
            say("stopping the private appliance")
            appliance.stop()
    text = report.table(summary)
    print(text, flush=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (run_dir / "summary.txt").write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    say(f"results in {run_dir} (summary.txt, summary.json, locust_*.csv, report.html)")
    return 0 if summary["audit"]["ok"] else 1


def drill(args: argparse.Namespace, scenario: Scenario, host: str, redis_url: str, socket_path: Path | None,
          run_dir: Path, users: int, duration: float, workers: int) -> dict[str, Any]:
    """Run the users (and the chaos schedule), drain, audit; returns the summary."""
    client = connect(redis_url, max_connections=8)
    keys = Keys()
    last = client.xrevrange(keys.events, "+", "-", count=1)
    since_id = last[0][0] if last else "0-0"
    env = Environment(user_classes=SCENARIOS[args.scenario], host=host)
    job_ms, steps = scenario.job_ms, scenario.steps
    if args.scenario == "fanout":  # long jobs (a third of the drill, 2..12 s), 4 steps a second: steady streams
        length_ms = int(min(12.0, max(2.0, duration / 3)) * 1000)
        job_ms, steps = (int(length_ms * 0.8), int(length_ms * 1.2)), max(4, length_ms * 4 // 1000)
    env.drill = Drill(args.scenario, host, job_ms, steps)  # type: ignore[attr-defined]
    runner = env.create_local_runner()
    csv_writer = StatsCSVFileWriter(env, PERCENTILES_TO_REPORT, str(run_dir / "locust"), full_history=False)
    background = [gevent.spawn(stats_history, runner), gevent.spawn(csv_writer.stats_writer)]
    chaos = None
    if args.scenario == "resilience":
        if socket_path is not None and socket_path.exists():
            chaos = Chaos(socket_path, duration, say)
        else:
            say(f"resilience: no supervisord socket at {socket_path} (see --supervisor-dir): no disruptions")
    rate = args.spawn_rate or scenario.spawn_rate
    say(f"{args.scenario}: {users} users (spawn rate {rate:g}/s) for {duration:g}s against {host}")
    programs = ProgramCpu(socket_path)
    started = time.time()
    cpu_started = time.process_time()
    runner.start(users, spawn_rate=rate)
    if chaos:
        chaos.start()
    _progress(env, started, duration)
    _stop_users(runner, run_dir)
    load_s = time.time() - started
    client_cpu = (time.process_time() - cpu_started) / load_s
    program_cpu = programs.shares(load_s)
    if chaos:
        chaos.stop()
    drill_state = env.drill  # type: ignore[attr-defined]
    job_ids = drill_state.job_ids()
    drain_s = args.drain if args.drain is not None else scenario.drain_s
    say(f"load done: {len(job_ids)} jobs accepted; draining (at most {drain_s:g}s)")
    waited = wait_for_drain(client, keys, job_ids, drain_s, say)
    result = audit(client, keys, job_ids)
    if args.scenario in ORDER_CHECKED:
        result.order = check_order(client, keys, job_ids, since_id)
        if result.order["inversions"]:
            result.problems.append(f"{result.order['inversions']} claims took a job while a better one waited")
    if args.scenario == "priority" and workers >= 2 and result.finished >= 10 and len(result.per_worker) < 2:
        result.problems.append("only one worker took jobs")
    if not job_ids:
        result.problems.append("no job was accepted: the drill measured nothing")
    if args.scenario == "resilience" and not (chaos and chaos.log.counts.get("kill")):
        result.problems.append("no worker was killed: the resilience drill disrupted nothing")
    runner.quit()
    gevent.sleep(1.1)  # the CSV writer's last pass
    for greenlet in background:
        greenlet.kill(block=False)
    csv_writer.close_files()
    (run_dir / "report.html").write_text(get_html_report(env, show_download_link=False))
    summary = report.summarize(args.scenario, host, users, workers, load_s, waited, env, drill_state, result,
                               chaos.log if chaos else None)
    summary["client_cpu"] = round(client_cpu, 2)
    summary["program_cpu"] = program_cpu
    return summary


class ProgramCpu:
    """CPU time of the appliance's programs (and their children) over the load phase, via supervisord.

    Processes restarted meanwhile (the resilience drill) count from their start; missing ones are skipped."""

    def __init__(self, socket_path: Path | None):
        self.before: dict[str, float] = {}
        self.socket_path = socket_path if socket_path is not None and socket_path.exists() else None
        if self.socket_path is not None:
            self.before = self._sample()

    def _sample(self) -> dict[str, float]:
        import psutil

        from loadtest.private import supervisor_rpc

        out: dict[str, float] = {}
        try:
            infos = supervisor_rpc(self.socket_path).getAllProcessInfo()
        except OSError:
            return out
        for info in infos:
            if not info["pid"]:
                continue
            try:
                proc = psutil.Process(info["pid"])
                total = 0.0
                for p in [proc, *proc.children(recursive=True)]:
                    times = p.cpu_times()
                    total += times.user + times.system
            except psutil.Error:
                continue
            out[info["name"]] = total
        return out

    def shares(self, seconds: float) -> dict[str, float]:
        """Each program's CPU over `seconds` as a share of one CPU (1.0 = one core busy)."""
        if self.socket_path is None or seconds <= 0:
            return {}
        after = self._sample()
        return {name: round(max(0.0, value - self.before.get(name, 0.0)) / seconds, 2)
                for name, value in sorted(after.items())}


def _stop_users(runner: Any, run_dir: Path, timeout_s: float = 30.0) -> None:
    """Stop the users; if they do not stop in time, note where they hang and quit the runner."""
    stopper = gevent.spawn(runner.stop)
    stopper.join(timeout_s)
    if not stopper.ready():
        say(f"the users did not stop within {timeout_s:g}s; stacks in {run_dir / 'hang.txt'}; forcing")
        with open(run_dir / "hang.txt", "w") as out:
            gevent.util.print_run_info(file=out)
        stopper.kill(block=False)
        runner.quit()


def _progress(env: Environment, started: float, duration: float) -> None:
    """Sleep through the load phase, noting what the users have done every 5 seconds."""
    end = started + duration
    while time.time() < end:
        gevent.sleep(min(5.0, max(0.0, end - time.time())))
        total = env.stats.total
        say(f"{time.time() - started:5.0f}s: {env.runner.user_count if env.runner else 0} users, "
            f"{len(env.drill.ledger)} jobs accepted, {total.num_requests} requests, "  # type: ignore[attr-defined]
            f"{total.num_failures} failures, {total.current_rps:.0f} req/s")


if __name__ == "__main__":
    sys.exit(main())
