"""Settings: every bad WORKER_*/API_* value stops the process with one line naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from appliance.connector import load_connectors
from appliance.settings import ApiSettings, QueueSettings, SettingsError, WorkerSettings
from conftest import ROOT

BAD_WORKER = [
    ("WORKER_ID", "has space"),
    ("WORKER_ID", "x:jobs"),
    ("WORKER_ID", "-leading-dash"),
    ("WORKER_ID", "x" * 200),
    ("WORKER_SERVICES", " , "),
    ("WORKER_SERVICES", "simulation,bad name"),
    ("WORKER_CONNECTORS", ","),
    ("WORKER_POLL_INTERVAL_MS", "fast"),
    ("WORKER_POLL_INTERVAL_MS", "0"),
    ("WORKER_POLL_INTERVAL_MS", "1.5"),
    ("WORKER_HEARTBEAT_INTERVAL_MS", "-5"),
    ("WORKER_HEARTBEAT_INTERVAL_MS", "10"),
    ("WORKER_MAX_CONCURRENT_JOBS", "0"),
    ("WORKER_MAX_CONCURRENT_JOBS", "many"),
    ("WORKER_CUSTOM_CAPABILITIES", "notjson"),
    ("WORKER_CUSTOM_CAPABILITIES", "[1, 2]"),
    ("WORKER_CUSTOMER_ISOLATION", "maybe"),
    ("WORKER_MAX_CONCURRENT_JOBS", "1001"),
    ("WORKER_JOB_TIMEOUT_MINUTES", "soon"),
    ("WORKER_JOB_TIMEOUT_MINUTES", "0"),
    ("WORKER_DRAIN_SECONDS", "-1"),
    ("WORKER_GPU_COUNT", "two"),
    ("WORKER_GPU_COUNT", "65"),
    ("WORKER_GPU_MEMORY_GB", "lots"),
    ("WORKER_GPU_MEMORY_GB", "-1"),
    ("WORKER_CPU_CORES", "-2"),
    ("WORKER_RAM_GB", "16GB"),
    ("WORKER_LEASE_MS", "10"),
    ("HUB_REDIS_URL", "http://127.0.0.1:7000"),
    ("HUB_REDIS_URL", "redis://127.0.0.1:notaport/0"),
    ("LOG_LEVEL", "loud"),
    ("APPLIANCE_KEY_PREFIX", "has space"),
]

BAD_API = [
    ("API_PORT", "0"),
    ("API_PORT", "65536"),
    ("API_PORT", "http"),
    ("API_PROCESSES", "0"),
    ("API_PROCESSES", "four"),
    ("API_WORKER_CONNECTIONS", "1"),
    ("API_MAX_BODY_BYTES", "10MB"),
    ("API_MAX_BODY_BYTES", "1"),
    ("API_GRACEFUL_TIMEOUT_SECONDS", "0"),
    ("CORS_ORIGINS", " , "),
    ("REDIS_URL", "ftp://example.com"),
    ("REDIS_URL", "redis://127.0.0.1:port/0"),
    ("JOB_COMPLETED_TTL_SECONDS", "0"),
    ("JOB_FAILED_TTL_SECONDS", "forever"),
    ("PROGRESS_STREAM_MAXLEN", "1"),
    ("LOG_LEVEL", "verbose"),
]


@pytest.mark.parametrize(("name", "value"), BAD_WORKER, ids=[f"{n}={v[:20]}" for n, v in BAD_WORKER])
def test_bad_worker_setting_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        WorkerSettings.from_env({name: value})
    assert name in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("name", "value"), BAD_API, ids=[f"{n}={v[:20]}" for n, v in BAD_API])
def test_bad_api_setting_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        ApiSettings.from_env({name: value})
    assert name in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("env", "named"), [
    ({"REDIS_URL": "http://nope"}, "REDIS_URL"),         # a worker falls back to REDIS_URL: name that one
    ({"HUB_REDIS_URL": "http://nope"}, "HUB_REDIS_URL"),
    ({"HUB_REDIS_URL": "http://nope", "REDIS_URL": "redis://127.0.0.1:1/0"}, "HUB_REDIS_URL"),
])
def test_bad_redis_url_names_the_variable_it_came_from(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as caught:
        WorkerSettings.from_env(env)
    assert str(caught.value).startswith(named + "=")


def test_api_falls_back_to_hub_redis_url_and_names_it() -> None:
    with pytest.raises(SettingsError) as caught:
        ApiSettings.from_env({"HUB_REDIS_URL": "http://nope"})
    assert str(caught.value).startswith("HUB_REDIS_URL=")


def test_password_is_redacted_in_errors_and_repr() -> None:
    with pytest.raises(SettingsError) as caught:
        ApiSettings.from_env({"REDIS_URL": "http://user:s3cret@host:1/0"})
    assert "s3cret" not in str(caught.value)
    settings = QueueSettings.from_env({"REDIS_URL": "redis://:s3cret@127.0.0.1:6390/0"})
    assert "s3cret" not in repr(settings) and "s3cret" not in settings.redis_url_redacted


@pytest.mark.parametrize(("name", "value"), [
    ("WORKER_CONNECTORS", "no-such-connector"),
    ("WORKER_SIMULATION_PROCESSING_TIME", "slow"),
    ("WORKER_SIMULATION_STEPS", "-1"),
    ("WORKER_SIMULATION_FAILURE_RATE", "2"),
])
def test_bad_connector_settings_name_the_variable(name: str, value: str) -> None:
    env = {name: value}
    with pytest.raises(SettingsError) as caught:
        settings = WorkerSettings.from_env(env)
        load_connectors(settings.connectors, settings.env)
    assert name in str(caught.value)


def test_good_settings_parse() -> None:
    worker = WorkerSettings.from_env({
        "WORKER_ID": "worker1-direct", "WORKER_SERVICES": "simulation, noop", "WORKER_CONNECTORS": "simulation,noop",
        "WORKER_POLL_INTERVAL_MS": "250", "WORKER_MAX_CONCURRENT_JOBS": "4", "WORKER_GPU_COUNT": "1",
        "WORKER_GPU_MEMORY_GB": "24", "REDIS_URL": "redis://127.0.0.1:7000/1", "LOG_LEVEL": "DEBUG"})
    assert worker.worker_id == "worker1-direct" and worker.services == ("simulation", "noop")
    assert worker.poll_interval_ms == 250 and worker.max_concurrent_jobs == 4
    assert worker.hardware.gpu_count == 1 and worker.hardware.gpu_memory_gb == 24.0
    assert worker.queue.redis_url == "redis://127.0.0.1:7000/1" and worker.queue.log_level == "debug"
    api = ApiSettings.from_env({"API_PORT": "3005", "CORS_ORIGINS": "http://a, http://b"})
    assert api.port == 3005 and api.cors_origins == ("http://a", "http://b")
    defaults = ApiSettings.from_env({})
    default_url = urlsplit(defaults.queue.redis_url)  # the guide's Redis, used when nothing else is configured
    assert defaults.port == 3001 and (default_url.hostname, default_url.port, default_url.path) == (
        "127.0.0.1", 6379, "/0")


# -- entry points ------------------------------------------------------------------------------------------------
def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("name", "value"), [
    ("WORKER_MAX_CONCURRENT_JOBS", "zero"),
    ("WORKER_CONNECTORS", "no-such-connector"),
    ("HUB_REDIS_URL", "http://127.0.0.1:1"),
    ("WORKER_CUSTOM_CAPABILITIES", "notjson"),
])
def test_worker_process_exits_2_with_one_line(env_base: dict[str, str], name: str, value: str) -> None:
    proc = _run([sys.executable, "-m", "appliance.worker_process"], {**env_base, name: value})
    assert proc.returncode == 2, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert name in lines[0]


def test_api_process_exits_2_with_one_line(env_base: dict[str, str]) -> None:
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    proc = _run([gunicorn, "--config", str(ROOT / "etc" / "gunicorn.conf.py"), "appliance.api.wsgi:app"],
                {**env_base, "API_PORT": "99999"})
    assert proc.returncode == 2, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "API_PORT" in lines[0]
