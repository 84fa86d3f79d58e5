"""`bin/appliance`: start, stop, status, restart and logs of the appliance, wrapping supervisord."""

from __future__ import annotations

import argparse
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

from appliance import comfyui_host
from appliance.configure import CliError, Configured, api_url, configure, running_settings, supervisord_environment
from appliance.drill import run_drill
from appliance.keys import Keys
from appliance.programs import Program, apply, configured_programs, program_names, resolve, running_programs
from appliance.queue import Queue
from appliance.redis_conn import connect
from appliance.runtime import (
    HOME,
    Paths,
    changed_settings,
    client_url,
    human_bytes,
    read_env_file,
    recorded_settings,
    redis_cli_binary,
    redis_cli_options,
    redis_maxmemory,
    run_paths,
    venv_dir,
)
from appliance.settings import ApiSettings, QueueSettings, SettingsError, redact_setting, redact_url

START_TIMEOUT_S = 90
SUPERVISORD_GRACE_S = 10  # how long supervisord may take to write its pid file after daemonizing


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


def with_recorded(env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The settings of a running appliance (recorded at its start or last restart) under this shell's, and the
    names taken from the record: a command run from a shell without the start's variables keeps them (this
    shell's value wins; one set empty goes back to its default). A stopped appliance starts from this shell's."""
    paths = run_paths(env)
    if supervisord_pid(paths) is None:
        return env, []
    recorded = recorded_settings(paths)
    return {**recorded, **env}, sorted(key for key in recorded if key not in env)


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
    """Start supervisord with every program; on a running appliance, apply the settings and start what is down."""
    paths = run_paths(env)
    if supervisord_pid(paths):
        return update(env, paths, [], restart=False, kept=args.kept)
    configured = configure(env, paths, running=False)
    say(configured.redis.note)
    if configured.redis.embedded:
        maxmemory = redis_maxmemory(env)
        say(f"embedded Redis maxmemory {human_bytes(maxmemory) if maxmemory else 'none'} (REDIS_MAXMEMORY); the "
            f"API refuses submits at {configured.api.submit_memory_percent}% of it (API_SUBMIT_MEMORY_PERCENT)")
    say(configured.workers.note)
    if configured.comfyui.programs:
        say(configured.comfyui.note)
    say(configured.api.access_note())
    keys_file = env.get("API_KEYS_FILE", "").strip()
    if keys_file and Path(keys_file).expanduser().stat().st_mode & 0o077:
        say(f"warning: API_KEYS_FILE {keys_file} is readable by other users; `chmod 600 {keys_file}`")
    configured.write(paths)
    count = len(configured.workers.programs)
    comfyui = f" and {len(configured.comfyui.programs)} ComfyUI" if configured.comfyui.programs else ""
    say(f"starting supervisord (run folder {paths.run_dir}) with the api, {count} workers{comfyui}")
    subprocess.run([str(venv_dir() / "bin" / "supervisord"), "-c", str(HOME / "etc" / "supervisord.conf")],
                   env=supervisord_environment(env, paths), check=True)
    wait_until_ready(paths, env, configured)
    key = " -H \"Authorization: Bearer $API_KEY\"" if configured.api.api_keys else ""
    print(f"  try: curl -X POST {configured.api_url}/api/jobs{key} -H 'Content-Type: application/json' "
          "-d '{\"service_required\":\"simulation\",\"priority\":100,\"payload\":{\"duration\":2000}}'")
    return 0


def update(env: dict[str, str], paths: Paths, names: list[str], restart: bool, kept: list[str]) -> int:
    """Rewrite the program sections from the settings, replace the programs whose section changed, start (or
    with `restart`, restart) the named programs (all when none is named), and wait until ready."""
    configured = configure(env, paths, running=True)
    sup = rpc(paths)
    targets = None
    if names and names != ["all"]:
        loaded = running_programs(sup)
        known = loaded + [p for p in configured_programs(configured.texts.values())
                          if p.spec not in {q.spec for q in loaded}]
        targets = known_names(known, names)
    changed = changed_settings(recorded_settings(paths), configured.settings)
    if kept:
        say(f"settings kept from the last start or restart (not set in this shell): {', '.join(kept)}; set one "
            "empty (NAME=) for its default")
    if changed:
        say(f"settings changed since the last start or restart: {', '.join(changed)}")
    configured.write(paths)
    try:
        applied = apply(sup, targets, restart, say)
    except xmlrpc.client.Fault as exc:
        raise CliError(f"supervisord refused: {exc.faultString}; see {paths.logs}/supervisord.log") from None
    for group in applied.pending:
        say(f"the settings of {group} changed too: `bin/appliance restart {group}` applies them")
    if not applied.anything:
        say(f"already running (run folder {paths.run_dir}); see `bin/appliance status`")
        return 0
    if applied.started:
        say(("restarted " if restart else "started ") + ", ".join(applied.started))
    wait_until_ready(paths, env, configured)
    return 0


def wait_until_ready(paths: Paths, env: Mapping[str, str], configured: Configured) -> None:
    """Wait for /health to answer and every worker to register, showing progress; explain a failure."""
    queue = Queue(connect(configured.redis.url), QueueSettings.from_env({**env, "REDIS_URL": configured.redis.url}))
    url, ids = configured.api_url, [p.worker_id for p in configured.workers.programs]
    workers = len(ids)
    started = time.monotonic()
    last = ""
    seen = False
    fatal: list[str] = []
    logfiles: dict[str, str | None] = {}
    while time.monotonic() < started + START_TIMEOUT_S:
        code, _ = read_health(url)
        try:
            registered = live_registrations(queue.client, queue.keys, ids)
        except redis.RedisError:
            registered = 0
        if supervisord_pid(paths) is None:
            # it daemonizes before writing its pid file: absent for a moment after the start, fatal later
            if seen or time.monotonic() > started + SUPERVISORD_GRACE_S:
                last = "supervisord exited" if seen else "supervisord wrote no pid file"
                break
            time.sleep(0.1)
            continue
        seen = True
        programs = [i for i in rpc(paths).getAllProcessInfo() if i["statename"] != "STOPPED"]
        verdict, names = readiness(code, registered, workers, programs)
        if verdict == "fatal":  # before "ready": a FATAL program is neither starting nor ready
            fatal = names
            logfiles = {i["name"]: i.get("stdout_logfile") for i in programs if i["name"] in fatal}
            last = f"{', '.join(fatal)} failed to start"
            break
        state = f"api {'up' if code == 200 else 'starting'}, workers {registered}/{workers}" + (
            f", starting {', '.join(names)}" if code == 200 and registered >= workers and names else "")
        if state != last:
            say(f"waiting: {state}")
            last = state
        if verdict == "ready":
            say(f"ready after {time.monotonic() - started:.0f}s: API at {url} (WebSocket on the same port); "
                f"logs in {paths.logs}")
            return
        time.sleep(0.3)
    for name in dict.fromkeys(("supervisord", "redis", "api", "worker1", *fatal)):
        log = Path(logfiles.get(name) or paths.logs / f"{name}.log")
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-8:]
            print(f"--- {log} ---\n" + "\n".join(tail), file=sys.stderr)
    raise CliError(f"not ready after {time.monotonic() - started:.0f}s ({last}); read the logs above, fix the "
                   "cause, then `bin/appliance stop` and start again")


def readiness(code: int, registered: int, workers: int, programs: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """("fatal", the FATAL programs) first: one that gave up is neither starting nor ready; then ("ready", [])
    when /health answers, every worker registered and nothing is STARTING or BACKOFF; else ("waiting", the
    programs still starting)."""
    fatal = [str(i["name"]) for i in programs if i["statename"] == "FATAL"]
    if fatal:
        return "fatal", fatal
    starting = [str(i["name"]) for i in programs if i["statename"] in ("STARTING", "BACKOFF")]
    if code == 200 and registered >= workers and not starting:
        return "ready", []
    return "waiting", starting


def live_registrations(client: redis.Redis, keys: Keys, worker_ids: list[str]) -> int:
    """How many of these workers are registered with a live heartbeat: a registration left by a worker no longer
    configured (one removed while Redis was down could not deregister) or one whose heartbeat lapsed is not."""
    pipe = client.pipeline(transaction=False)
    for worker_id in worker_ids:
        pipe.sismember(keys.workers_active, worker_id)
        pipe.exists(keys.worker_heartbeat(worker_id))
    replies = pipe.execute()
    return sum(1 for member, alive in zip(replies[::2], replies[1::2], strict=True) if member and alive)


def cmd_stop(env: dict[str, str], args: argparse.Namespace) -> int:
    paths = run_paths(env)
    pid = supervisord_pid(paths)
    if pid is None:
        say(f"not running (run folder {paths.run_dir})")
        return 0
    say("stopping workers (they hand back running jobs), then comfyui, the api and redis")
    try:
        rpc(paths).shutdown()
    except (OSError, xmlrpc.client.Fault) as exc:
        say(f"supervisord did not take the shutdown ({exc}); sending it SIGTERM")
        os.kill(pid, 15)
    started = time.monotonic()
    while supervisord_pid(paths) == pid and time.monotonic() < started + 180:
        time.sleep(0.2)
    if supervisord_pid(paths) == pid:
        raise CliError(f"supervisord (pid {pid}) is still running after {time.monotonic() - started:.0f}s; see "
                       f"{paths.logs}/supervisord.log")
    say("stopped")
    return 0


def cmd_status(env: dict[str, str], args: argparse.Namespace) -> int:
    """Exit 0 when every program runs, 1 naming those that do not, 3 when the appliance is not running."""
    paths = run_paths(env)
    if supervisord_pid(paths) is None:
        say(f"not running (run folder {paths.run_dir}); start it with `bin/appliance start`")
        return 3
    programs = running_programs(rpc(paths))
    for program in programs:
        print(f"{program.spec:<22} {program.state:<9} {program.description}")
    down = [f"{p.spec} ({p.state})" for p in programs if p.state != "RUNNING"]
    recorded = running_settings(paths, env)
    api = ApiSettings.from_env(env)
    embedded = recorded.get("embedded_redis", True)
    print(f"\nredis: {redact_url(recorded['redis_url'])}" + (f" (embedded; password in {paths.redis_password}; "
          "`bin/appliance redis-cli` uses it)" if embedded else " (external)"))
    print(f"api: {recorded.get('api_url', api_url(env))}: {api.access_note()}")
    if recorded.get("comfyui"):
        print("comfyui (one per worker; a worker offers comfyui while its ComfyUI answers):")
        states = {p.name: (p.state, p.description) for p in programs}
        print("\n".join(comfyui_host.describe(recorded["comfyui"], states)))
    kept = recorded_settings(paths)
    if kept:
        print("settings: " + " ".join(f"{k}={redact_setting(k, v)}" for k, v in kept.items()))
    try:
        redis_url = running_redis_url(paths, env)
        queue = Queue(connect(redis_url), QueueSettings.from_env({**env, "REDIS_URL": redis_url}))
        counts = queue.counts()
        print(f"queue: {queue.depth()} pending in line; " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        workers = queue.workers()
        external = "" if embedded else " (external Redis)"
        print(f"workers registered: {len(workers)}{external}")
        for w in workers:
            print(f"  {w['id']:<22} {w.get('status', '?'):<6} services={','.join(w.get('services') or [])} "
                  f"jobs={w.get('current_jobs', 0)} done={w.get('total_jobs_completed', 0)} "
                  f"failed={w.get('total_jobs_failed', 0)} heartbeat_age={w.get('heartbeat_age_s')}s "
                  f"gpu={gpu_owned(w)}")
            for service, h in (w.get("services_health") or {}).items():  # its backing services (ComfyUI)
                if isinstance(h, dict) and h.get("url"):
                    state = f"up, version {h.get('version')}, queue {h.get('queue_remaining')}" if h.get("ok") \
                        else f"DOWN: {h.get('error')}"
                    print(f"    {service} at {h['url']}: {state}")
        for line in queue.service_notes():  # jobs nobody can serve, or waiting for an unhealthy service
            print(line)
    except redis.RedisError as exc:
        print(f"queue: Redis not reachable ({redact_url(str(exc))}); check the redis program above")
    if down:
        print(f"\nnot running: {', '.join(down)}; see `bin/appliance logs NAME`; `bin/appliance start` starts "
              "what is down")
        return 1
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


def known_programs(paths: Paths) -> list[Program]:
    """supervisord's programs; when it is not running, those of the last written program sections."""
    if supervisord_pid(paths) is not None:
        return running_programs(rpc(paths))
    return configured_programs(f.read_text() for f in sorted(paths.conf_d.glob("*.conf")))


def known_names(programs: list[Program], names: list[str]) -> list[Program]:
    """The programs `names` pick (`api`, `workers`, `worker1`, `workers:worker1`, ...); CliError listing the
    valid names for one that picks nothing."""
    found, unknown = resolve(programs, names)
    if unknown:
        valid = ", ".join(program_names(programs)) or "none (no program sections written yet)"
        raise CliError(f"no program named {', '.join(unknown)}; valid names: {valid}")
    return found


def cmd_restart(env: dict[str, str], args: argparse.Namespace) -> int:
    paths = run_paths(env)
    if supervisord_pid(paths) is None:
        raise CliError("not running; start it with `bin/appliance start`")
    return update(env, paths, args.programs, restart=True, kept=args.kept)


def cmd_logs(env: dict[str, str], args: argparse.Namespace) -> int:
    paths = run_paths(env)
    if args.program:
        chosen = known_names(known_programs(paths), [args.program])
        files = list(dict.fromkeys(Path(p.logfile) if p.logfile else paths.logs / f"{p.name}.log" for p in chosen))
    else:
        files = sorted(p for p in paths.logs.glob("*.log"))
    files = [f for f in files if f.exists()]
    if not files:
        raise CliError(f"no log files in {paths.logs} for {args.program or 'any program'}")
    cmd = ["tail", "-n", str(args.lines)] + (["-F"] if args.follow else []) + [str(f) for f in files]
    return subprocess.run(cmd).returncode


def running_redis_url(paths: Paths, env: Mapping[str, str]) -> str:
    """The appliance's Redis as a client reaches it (with the embedded Redis's password)."""
    recorded = running_settings(paths, env)
    url = str(recorded["redis_url"])
    return client_url(url, paths) if recorded.get("embedded_redis", True) else url


def cmd_drill(env: dict[str, str], args: argparse.Namespace) -> int:
    paths = run_paths(env)
    if supervisord_pid(paths) is None:
        raise CliError("not running; start it with `bin/appliance start`, then run the drill")
    running = running_settings(paths, env)
    url = running_redis_url(paths, env)
    queue = Queue(connect(url), QueueSettings.from_env({**env, "REDIS_URL": url}))
    keys = ApiSettings.from_env(env).api_keys
    key = next((k.key for k in keys if k.admin), keys[0].key if keys else None)  # the drill's jobs, its key's
    lost = run_drill(running["api_url"], queue, rpc(paths), say, api_key=key)
    return 0 if lost == 0 else 1


def cmd_redis_cli(env: dict[str, str], args: argparse.Namespace) -> int:
    """redis-cli on the appliance's Redis (host, port, database, user and TLS from its URL; the password through
    REDISCLI_AUTH, never on the command line), with the arguments given, e.g. `ZREVRANGE jobs:pending 0 -1`."""
    paths = run_paths(env)
    binary = redis_cli_binary()
    if binary is None:
        raise CliError("no redis-cli binary found; install Debian's redis-tools (`apt-get install redis-tools`), "
                       "or use `bin/appliance status`")
    if supervisord_pid(paths) is not None:
        url = running_redis_url(paths, env)
    else:
        url = client_url(QueueSettings.from_env(env).redis_url, paths)
    options, password = redis_cli_options(url)
    child_env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    if password is not None:
        child_env["REDISCLI_AUTH"] = password
    return subprocess.run([binary, *options, *args.argv], env=child_env).returncode


# supervisorctl commands that take program names, and how many arguments come before the names
NAMED_COMMANDS = {"start": 1, "stop": 1, "restart": 1, "status": 1, "clear": 1, "pid": 1, "fg": 1, "tail": 1,
                  "signal": 2}


def cmd_ctl(env: dict[str, str], args: argparse.Namespace) -> int:
    """supervisorctl with the appliance's program names (`workers` → `workers:*`, `worker1` → `workers:worker1`)."""
    paths = run_paths(env)
    argv = list(args.argv)
    skip = NAMED_COMMANDS.get(argv[0], len(argv)) if argv else 0
    if skip < len(argv):
        programs = known_programs(paths)
        for i in range(skip, len(argv)):
            arg = argv[i]
            if arg == "all" or arg.startswith("-") or (argv[0] == "tail" and arg in ("stdout", "stderr")):
                continue
            chosen = known_names(programs, [arg])
            groups = {p.group for p in chosen}
            argv[i] = chosen[0].spec if len(chosen) == 1 else f"{groups.pop()}:*" if len(groups) == 1 else arg
    cmd = [str(venv_dir() / "bin" / "supervisorctl"), "-c", str(HOME / "etc" / "supervisord.conf"), *argv]
    return subprocess.run(cmd, env={**os.environ, "APPLIANCE_RUN_DIR": str(paths.run_dir)}).returncode


PASSTHROUGH = ("redis-cli", "ctl")  # commands whose arguments go to another program as they are


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """The arguments argparse reads, and those after `redis-cli` or `ctl` (None for other commands), which go
    to that program untouched: argparse would take `--scan` or `--raw` for options of its own. A leading `--` is
    dropped (`bin/appliance redis-cli -- --help`)."""
    if argv and argv[0] in PASSTHROUGH:
        rest = argv[1:]
        return argv[:1], rest[1:] if rest[:1] == ["--"] else rest
    return argv, None


def main(argv: list[str] | None = None) -> int:
    argv, passed = split_passthrough(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(prog="bin/appliance", description="Run the GPU job appliance.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="start redis (embedded unless REDIS_URL answers), the api and the workers; on a "
                                 "running appliance, apply the settings and start what is down")
    sub.add_parser("stop", help="stop everything; workers hand back running jobs")
    sub.add_parser("status", help="programs, queue depth and registered workers; exit 1 if a program is not "
                                  "running, 3 if the appliance is not")
    restart = sub.add_parser("restart", help="apply the settings and restart programs (api, redis, workers, "
                                        "worker1, comfyui, comfyui1, ...; default all)")
    restart.add_argument("programs", nargs="*")
    logs = sub.add_parser("logs", help="show a program's log (default: all)")
    logs.add_argument("program", nargs="?")
    logs.add_argument("-n", "--lines", type=int, default=50)
    logs.add_argument("--no-follow", dest="follow", action="store_false")
    sub.add_parser("drill", help="the guide's resilience scenario: kill a worker mid-job, check nothing is lost")
    ctl = sub.add_parser("ctl", help="run supervisorctl with these arguments")
    ctl.add_argument("argv", nargs=argparse.REMAINDER)
    cli = sub.add_parser("redis-cli", help="run redis-cli on the appliance's Redis (its password from the run "
                                           "folder), e.g. `bin/appliance redis-cli ZREVRANGE jobs:pending 0 -1`")
    cli.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if passed is not None:
        args.argv = passed
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `bin/appliance status | head` ends quietly
    commands = {"start": cmd_start, "stop": cmd_stop, "status": cmd_status, "restart": cmd_restart,
                "logs": cmd_logs, "ctl": cmd_ctl, "drill": cmd_drill, "redis-cli": cmd_redis_cli}
    try:
        env, args.kept = with_recorded(environment())
        return commands[args.command](env, args)
    except SettingsError as exc:
        print(f"appliance: bad setting: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
