"""CI smoke of every drill: a few seconds each against one private appliance; a failed audit fails the test.

Each drill runs as `python -m loadtest.runner` (locust monkey-patches its process), pointed at the shared
appliance with --host/--redis-url and, for resilience, its supervisord socket.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.private import HOME, PrivateAppliance

pytestmark = pytest.mark.slow  # every test shares one appliance, started by `bin/appliance start`

SMOKE = {  # scenario: extra runner arguments (seconds of load, users, drain bound)
    "basic": ["--duration", "4", "--users", "3"],
    "priority": ["--duration", "4", "--users", "2"],
    "scale": ["--duration", "4", "--users", "10", "--spawn-rate", "10"],
    "resilience": ["--duration", "8", "--users", "5", "--drain", "40"],
    "fanout": ["--duration", "5", "--users", "30", "--spawn-rate", "30"],
}


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateAppliance]:
    env = {"WORKER_MAX_CONCURRENT_JOBS": "4", "WORKER_LEASE_MS": "5000", "WORKER_HEARTBEAT_INTERVAL_MS": "1000",
           "WORKER_DRAIN_SECONDS": "5", "EVENTS_STREAM_MAXLEN": "500000"}
    app = PrivateAppliance(tmp_path_factory.mktemp("smoke") / "run", workers=3, env=env, quiet=True)
    app.start()
    try:
        yield app
    finally:
        app.stop()


@pytest.mark.parametrize("scenario", list(SMOKE))
def test_drill_passes_its_audit(scenario: str, appliance: PrivateAppliance, tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "loadtest.runner", scenario, "--host", appliance.url, "--redis-url",
           appliance.redis_url, "--supervisor-dir", str(appliance.run_dir), "--run-dir", str(tmp_path / "out"),
           "--json", str(summary_path), *SMOKE[scenario]]
    proc = subprocess.run(cmd, cwd=HOME, capture_output=True, text=True, timeout=150)
    output = proc.stdout + proc.stderr[-4000:]
    assert proc.returncode == 0, output
    assert "AUDIT PASSED" in proc.stdout, output
    summary = json.loads(summary_path.read_text())
    audit = summary["audit"]
    assert audit["accepted"] > 0 and audit["accepted"] == audit["finished"], output
    assert (audit["lost"], audit["finished_twice"], audit["stuck"]) == (0, 0, 0), output
    if scenario == "resilience":
        counts = summary["chaos"]["counts"]
        assert counts.get("kill", 0) >= 1 and counts.get("redis_restart", 0) == 1, output
    if scenario == "fanout":
        delivered = [summary["latency_ms"].get(f"progress delivery {kind}") for kind in ("SSE", "WS")]
        assert all(d and d["count"] > 0 for d in delivered), output
