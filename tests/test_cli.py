"""`bin/appliance` on a running appliance: restart applies changed settings, status names what is not running,
start brings up a half-up appliance, program names are the same everywhere; and the API's log lines."""

from __future__ import annotations

import re
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
import redis
from supervisor.xmlrpc import SupervisorTransport

from appliance.programs import Program, program_names, resolve
from appliance.runtime import environment_line
from appliance.settings import SettingsError
from live_api import running_api
from loadtest.private import PrivateAppliance
from test_e2e import appliance_cmd

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


def test_api_lines_carry_time_level_program_and_access_log(env_base: dict[str, str]) -> None:
    with running_api(env_base, LOG_LEVEL="info", API_ACCESS_LOG="1") as api:
        assert api.get_json("/health")[0] == 200
        deadline = time.monotonic() + 10
        while '"GET /health HTTP/1.1" 200' not in api.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = api.log_text().splitlines()
    booting = [line for line in lines if "Booting worker" in line]
    assert booting and all(LINE.match(line) for line in booting), lines
    assert LINE.match(booting[0]).group(2).startswith("api "), booting  # type: ignore[union-attr]
    access = [line for line in lines if '"GET /health HTTP/1.1" 200' in line]
    assert access and LINE.match(access[0]) and " INFO " in access[0], lines
    with running_api(env_base, LOG_LEVEL="info") as api:  # off by default
        assert api.get_json("/health")[0] == 200
        assert "GET /health" not in api.log_text()


@pytest.mark.slow
def test_restart_status_start_and_names_on_a_running_appliance(tmp_path: Path) -> None:
    settings = {"WORKER_SERVICES": "simulation", "WORKER_DRAIN_SECONDS": "2", "LOG_LEVEL": "info"}
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

    assert cli("status")[0] == 0
    assert cli("start")[:2] == (0, f"appliance: already running (run folder {app.run_dir}); see "
                                   "`bin/appliance status`\n")

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
    conf.write_text(conf.read_text().replace("environment=", 'environment=WORKER_MAX_CONCURRENT_JOBS="0",'))
    assert cli("ctl", "update", "workers")[0] == 0
    deadline = time.monotonic() + 60
    while state("workers:worker1") != "FATAL":
        assert time.monotonic() < deadline, state("workers:worker1")
        time.sleep(0.2)
    code, out, _ = cli("status")
    assert code == 1 and "not running: workers:worker1 (FATAL)" in out, out
    code, out, err = cli("start")
    assert code == 0 and "applying the new settings to workers" in out, out + err
    assert "WORKER_MAX_CONCURRENT_JOBS" not in conf.read_text()
    assert state("workers:worker1") == "RUNNING" and cli("status")[0] == 0
