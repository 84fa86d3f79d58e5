"""`bin/appliance` on a running appliance: restart applies changed settings, status names what is not running,
start brings up a half-up appliance, program names are the same everywhere; and the API's log lines."""

from __future__ import annotations

import re
import stat
import urllib.error
import urllib.request
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
import redis
from supervisor.xmlrpc import SupervisorTransport

from appliance.programs import Program, program_names, resolve
from appliance.runtime import (
    Paths,
    environment_line,
    is_setting,
    record_settings,
    recorded_settings,
    redis_cli_options,
    redis_conf,
    redis_maxmemory,
    redis_password,
    run_paths,
    with_password,
)
from appliance.settings import SettingsError, redact_setting
from live_api import running_api
from loadtest.private import PrivateAppliance
from procs import appliance_cmd, wait_for

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \[([^]]+)\] ")


def test_program_names_cover_groups_members_and_specs() -> None:
    programs = [Program("api", "api"), Program("workers", "worker1"), Program("workers", "worker2"),
                Program("comfyui1", "comfyui1")]
    assert list(program_names(programs)) == ["api", "workers", "comfyui1", "workers:worker1", "workers:worker2",
                                             "worker1", "worker2"]
    found, unknown = resolve(programs, ["worker2", "workers:*", "comfyui1", "nosuch"])
    assert [p.spec for p in found] == ["workers:worker2", "workers:worker1", "comfyui1"]
    assert unknown == ["nosuch"]


def test_environment_line_round_trips_through_supervisors_parser() -> None:
    from supervisor.datatypes import dict_of_key_value_pairs
    from supervisor.options import UnhosedConfigParser

    values = {"A": "x\\y", "B": 'say "hi" now', "C": "p,q%r", "D": "", "E": "two words"}
    parser = UnhosedConfigParser()
    parser.read_string("[program:x]\n" + environment_line(values) + "\n")
    raw = parser.get("program:x", "environment", raw=True).replace("%%", "%")  # supervisord expands %%
    assert dict_of_key_value_pairs(raw) == values
    for bad in ('"quoted"', "a ;comment", "both ' and \"", "two\nlines"):
        with pytest.raises(SettingsError, match="^X"):
            environment_line({"X": bad})


def test_redis_password_maxmemory_and_recorded_settings(tmp_path: Path) -> None:
    assert with_password("redis://127.0.0.1:7000/0", "p/w") == "redis://:p%2Fw@127.0.0.1:7000/0"
    assert with_password("redis://app:own@h:1/0", "other") == "redis://app:own@h:1/0"   # its own wins
    assert with_password("rediss://app@h:1/2", "pw") == "rediss://app:pw@h:1/2"
    assert redact_setting("REDIS_URL", "redis://app:pw@h:1/0") == "redis://app:***@h:1/0"
    assert redact_setting("API_KEYS", "a:0123456789abcdefgh") == "***"
    assert redact_setting("API_KEYS_FILE", "/etc/keys") == "/etc/keys"
    assert redis_maxmemory({"REDIS_MAXMEMORY": "512mb"}) == 512 * 1024**2
    assert redis_maxmemory({"REDIS_MAXMEMORY": "0"}) == 0
    assert 256 * 1024**2 <= redis_maxmemory({}) <= 16 * 1024**3
    with pytest.raises(SettingsError, match="^REDIS_MAXMEMORY"):
        redis_maxmemory({"REDIS_MAXMEMORY": "lots"})
    assert "requirepass" not in redis_conf("") and redis_conf("abc").endswith("requirepass abc\n")
    assert redis_cli_options("rediss://app:p%40ss@db.example:6380/2") == (
        ["-h", "db.example", "-p", "6380", "-n", "2", "--user", "app", "--tls"], "p@ss")
    assert redis_cli_options("redis://127.0.0.1:7000/0") == (["-h", "127.0.0.1", "-p", "7000"], None)
    assert redis_cli_options("unix:///run/redis.sock?db=3") == (["-s", "/run/redis.sock", "-n", "3"], None)

    paths = Paths(tmp_path / "run")
    assert redis_password(paths) == ""
    made = redis_password(paths, create=True)
    assert len(made) >= 32 and redis_password(paths, create=True) == made
    assert stat.S_IMODE(paths.redis_password.stat().st_mode) == 0o600
    record_settings(paths, {"API_PORT": "4000", "API_KEYS": "a:0123456789abcdefgh", "PATH": "/bin",
                            "APPLIANCE_ENV_FILE": "x.env", "COMFYUI_DIR": ""})  # set empty: its default
    assert recorded_settings(paths) == {"API_PORT": "4000", "API_KEYS": "a:0123456789abcdefgh"}
    assert stat.S_IMODE(paths.settings.stat().st_mode) == 0o600
    sticky = tmp_path / "shared"
    sticky.mkdir()
    sticky.chmod(0o1777)
    with pytest.raises(SettingsError, match="^APPLIANCE_RUN_DIR"):
        run_paths({"APPLIANCE_RUN_DIR": str(sticky)})


def test_api_lines_carry_time_level_program_and_access_log(env_base: dict[str, str]) -> None:
    with running_api(env_base, LOG_LEVEL="info", API_ACCESS_LOG="1") as api:
        assert api.get_json("/health")[0] == 200
        wait_for(lambda: '"GET /health HTTP/1.1" 200' in api.log_text(), 10, "the access log line")
        lines = api.log_text().splitlines()
    booting = [line for line in lines if "Booting worker" in line]
    assert booting and all(LINE.match(line) for line in booting), lines
    assert LINE.match(booting[0]).group(2).startswith("api "), booting  # type: ignore[union-attr]
    access = [line for line in lines if '"GET /health HTTP/1.1" 200' in line]
    assert access and LINE.match(access[0]) and " INFO " in access[0], lines
    with running_api(env_base, LOG_LEVEL="info") as api:  # off by default
        assert api.get_json("/health")[0] == 200
        assert "GET /health" not in api.log_text()


KEY, ADMIN = "cli-test-key-0123456789", "cli-test-admin-0123456789"


@pytest.mark.slow
def test_restart_status_start_and_names_on_a_running_appliance(tmp_path: Path) -> None:
    settings = {"WORKER_SERVICES": "simulation", "WORKER_DRAIN_SECONDS": "2", "LOG_LEVEL": "info",
                "API_KEYS": f"user:{KEY},ops:{ADMIN}:admin", "API_ACCESS_LOG": "1"}
    with PrivateAppliance(tmp_path / "run", workers=1, env=settings, quiet=True) as app:
        env = app.environment()
        client = redis.Redis.from_url(app.redis_url, decode_responses=True)
        conf = app.run_dir / "conf.d" / "workers.conf"
        transport = SupervisorTransport(None, None, f"unix://{app.socket}")
        rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor
        try:
            check_running_appliance(app, env, client, conf, rpc)
        finally:
            transport.close()
            client.close()


def check_running_appliance(app: PrivateAppliance, env: dict[str, str], client: redis.Redis, conf: Path,
                            rpc: Any) -> None:
    """The checks of the test above, in order, on one appliance (each start and stop costs seconds)."""

    def cli(*argv: str, **extra: str) -> tuple[int, str, str]:
        done = appliance_cmd({**env, **extra}, *argv)
        return done.returncode, done.stdout, done.stderr

    def state(spec: str) -> str:
        return str(rpc.getProcessInfo(spec)["statename"])

    code, out, _ = cli("status")
    assert code == 0 and f"redis: redis://127.0.0.1:{app.redis_port}/0 (embedded" in out, out
    assert "API keys required" in out and KEY not in out and app.redis_password not in out, out
    assert " API_KEYS=*** " in out and f" API_PORT={app.api_port} " in out, out   # settings, secrets redacted
    assert cli("start")[:2] == (0, f"appliance: already running (run folder {app.run_dir}); see "
                                   "`bin/appliance status`\n")
    check_security(app, cli)

    # one name list for logs, restart and ctl; a wrong name is refused once, with the valid ones
    valid = "valid names: api, redis, workers, workers:worker1, worker1\n"
    for argv in (("restart", "nosuch"), ("logs", "nosuch", "--no-follow"), ("ctl", "stop", "nosuch")):
        assert cli(*argv) == (1, "", f"appliance: no program named nosuch; {valid}"), argv
    for name in ("workers", "worker1", "workers:worker1"):
        code, out, _ = cli("logs", name, "-n", "200", "--no-follow")
        registered = [line for line in out.splitlines() if "worker registered" in line]
        assert code == 0 and registered, out
        assert LINE.match(registered[0]).group(2) == "worker worker1-direct"  # type: ignore[union-attr]

    # a bad value: one line naming the variable, exit 2, nothing changed
    before, pid = conf.read_text(), rpc.getProcessInfo("workers:worker1")["pid"]
    code, out, err = cli("restart", "workers", WORKER_COUNT="many")
    assert (code, err.count("\n"), "WORKER_COUNT" in err) == (2, 1, True), err
    assert conf.read_text() == before and rpc.getProcessInfo("workers:worker1")["pid"] == pid

    # restart applies a changed setting, to the programs named only
    api_pid = rpc.getProcessInfo("api")["pid"]
    code, out, err = cli("restart", "workers", WORKER_CONNECTORS="simulation,noop",
                         WORKER_SERVICES="simulation,noop")
    assert code == 0, out + err
    assert "settings changed since the last start or restart: WORKER_CONNECTORS, WORKER_SERVICES\n" in out, out
    assert "noop" in client.hget("worker:worker1-direct", "services"), out
    assert rpc.getProcessInfo("api")["pid"] == api_pid and "changed too" not in out
    env.update(WORKER_CONNECTORS="simulation,noop", WORKER_SERVICES="simulation,noop")

    # status names a stopped program (exit 1); start starts it (and only it)
    assert cli("ctl", "stop", "worker1")[0] == 0
    code, out, _ = cli("status")
    assert code == 1 and "not running: workers:worker1 (STOPPED)" in out, out
    code, out, err = cli("start")
    assert code == 0 and "started workers:worker1" in out, out + err
    assert state("workers:worker1") == "RUNNING" and cli("status")[0] == 0

    # a program that keeps failing ends FATAL: status exits 1 naming it; start applies the settings again
    # (no retries in the edited section: the generated one retries ten times with supervisord's growing backoff)
    broken = conf.read_text().replace("environment=", 'environment=WORKER_MAX_CONCURRENT_JOBS="0",')
    conf.write_text(re.sub(r"startretries=\d+", "startretries=0", broken))
    assert cli("ctl", "update", "workers")[0] == 0
    wait_for(lambda: state("workers:worker1") == "FATAL", 60, "workers:worker1 to end FATAL")
    code, out, _ = cli("status")
    assert code == 1 and "not running: workers:worker1 (FATAL)" in out, out
    code, out, err = cli("start")
    assert code == 0 and "applying the new settings to workers" in out, out + err
    assert "WORKER_MAX_CONCURRENT_JOBS" not in conf.read_text()
    assert state("workers:worker1") == "RUNNING" and cli("status")[0] == 0

    # a restart from a shell without the start's settings keeps them (API_PORT, API_KEYS, REDIS_URL, ...)
    bare = {k: v for k, v in env.items() if not is_setting(k)} | {"APPLIANCE_ENV_FILE": env["APPLIANCE_ENV_FILE"]}
    api_pid = rpc.getProcessInfo("api")["pid"]
    done = appliance_cmd(bare, "restart", "api")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "settings kept from the last start or restart (not set in this shell): " in done.stdout, done.stdout
    assert "API_KEYS" in done.stdout and "API_PORT" in done.stdout and "settings changed" not in done.stdout
    assert KEY not in done.stdout + done.stderr
    assert rpc.getProcessInfo("api")["pid"] != api_pid and cli("status")[0] == 0
    assert fetch(f"{app.url}/api/jobs", KEY)[0] == 200 and fetch(f"{app.url}/api/jobs")[0] == 401
    code, out, _ = cli("restart", "api", API_ACCESS_LOG="")   # set empty: back to its default
    assert code == 0 and "settings changed since the last start or restart: API_ACCESS_LOG" in out, out


def fetch(url: str, key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def check_security(app: PrivateAppliance, cli: Any) -> None:
    """Keys on every route, none in the logs; the embedded Redis's password; private files; redis-cli."""
    assert fetch(f"{app.url}/health")[0] == 200
    assert fetch(f"{app.url}/api/jobs")[0] == 401
    assert fetch(f"{app.url}/api/workers", KEY)[0] == 403 and fetch(f"{app.url}/api/workers", ADMIN)[0] == 200
    assert fetch(f"{app.url}/api/jobs?token={KEY}")[0] == 200

    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=app.redis_port).ping()
    assert len(app.redis_password) >= 32
    code, out, err = cli("redis-cli", "ZREVRANGE", "jobs:pending", "0", "-1", "WITHSCORES")
    assert code == 0 and "NOAUTH" not in out + err and "Warning" not in err, out + err
    assert cli("redis-cli", "PING")[1] == "PONG\n"
    maxmemory = cli("redis-cli", "CONFIG", "GET", "maxmemory")[1].split()
    assert maxmemory[0] == "maxmemory" and int(maxmemory[1]) > 0
    assert cli("redis-cli", "CONFIG", "GET", "maxmemory-policy")[1].split() == ["maxmemory-policy", "noeviction"]

    run = app.run_dir
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    files = [run / "redis.password", run / "redis.conf", run / "settings.json", run / "appliance.json",
             *run.glob("conf.d/*.conf"), *run.glob("logs/*.log"), *(p for p in run.rglob("redis/**/*"))]
    assert any("appendonly" in p.name for p in files), files
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert KEY in (run / "settings.json").read_text()   # recorded for restarts, in a private file

    api_log = run / "logs" / "api.log"
    wait_for(lambda: "token=***" in api_log.read_text(), 10, "the access log line")
    logs = "".join(p.read_text(errors="replace") for p in run.glob("logs/*.log"))
    assert "token=***" in logs and "API keys required" in logs
    for secret in (KEY, ADMIN, app.redis_password):
        assert secret not in logs


def test_redis_cli_and_ctl_pass_every_argument_through() -> None:
    """`bin/appliance redis-cli --scan --pattern 'job:*'`: argparse would take `--scan` for an option of its own."""
    from appliance.cli import split_passthrough

    assert split_passthrough(["redis-cli", "--scan", "--pattern", "job:*"]) == (
        ["redis-cli"], ["--scan", "--pattern", "job:*"])
    assert split_passthrough(["redis-cli", "--raw", "GET", "x"]) == (["redis-cli"], ["--raw", "GET", "x"])
    assert split_passthrough(["redis-cli", "--", "--help"]) == (["redis-cli"], ["--help"])
    assert split_passthrough(["ctl", "tail", "-f", "api"]) == (["ctl"], ["tail", "-f", "api"])
    assert split_passthrough(["logs", "-n", "5"]) == (["logs", "-n", "5"], None)


def test_workers_keep_being_started_while_an_error_lasts() -> None:
    """A worker that ends on an error waits past startsecs before it exits (appliance/worker_process.py), and
    supervisord tries again: a bug that is fixed heals without anyone starting a FATAL worker by hand."""
    from appliance.runtime import WorkerProgram, workers_conf

    text = workers_conf([WorkerProgram("worker1", "worker1", {})], 45)
    assert "startretries=" in text and "stopwaitsecs=45" in text
