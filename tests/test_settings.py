"""Settings: every bad WORKER_*/API_* value stops the process with one line naming the variable; the
environment is parsed once, at the entry points, and only settings objects are handed down."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from appliance.connector import Connector, NoSettings, connector_entry_points, connector_settings, load_connectors
from appliance.settings import ApiSettings, QueueSettings, SettingsError, WorkerSettings
from conftest import ROOT
from connectors.comfyui import ComfyUIConnector
from connectors.comfyui_settings import ComfyUISettings
from connectors.simulation import SimulationConnector, SimulationSettings
from procs import appliance_cmd

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
    ("WORKER_SIMULATION_ALLOW_KILL", "maybe"),
    ("WORKER_COMFYUI_PORT", "http"),
    ("WORKER_COMFYUI_PORT", "65536"),
    ("WORKER_COMFYUI_TIMEOUT_SECONDS", "0"),
    ("WORKER_COMFYUI_URL", "ftp://127.0.0.1:8188"),
])
def test_bad_connector_settings_name_the_variable(name: str, value: str) -> None:
    env = {"WORKER_CONNECTORS": "simulation,comfyui,noop", name: value}
    with pytest.raises(SettingsError) as caught:
        settings = WorkerSettings.from_env(env)
        connector_settings(settings.connectors, env)
    assert name in str(caught.value) and "\n" not in str(caught.value)


def test_connector_settings_are_parsed_once_and_handed_to_each_connector() -> None:
    env = {"WORKER_CONNECTORS": "simulation,comfyui,noop", "WORKER_SIMULATION_STEPS": "3",
           "WORKER_SIMULATION_ALLOW_KILL": "1", "WORKER_COMFYUI_HOST": "10.0.0.5", "WORKER_COMFYUI_PORT": "8190",
           "WORKER_COMFYUI_USERNAME": "u", "WORKER_COMFYUI_PASSWORD": "s3cret", "WORKER_ID": "w7"}
    parsed = connector_settings(WorkerSettings.from_env(env).connectors, env)
    assert parsed == {"simulation": SimulationSettings(processing_time_s=5.0, steps=3, allow_kill=True),
                      "comfyui": ComfyUISettings(url="http://10.0.0.5:8190", host="10.0.0.5", username="u",
                                                 password="s3cret", worker_id="w7"),
                      "noop": NoSettings()}
    assert "s3cret" not in repr(parsed)
    connectors = load_connectors(parsed)
    assert isinstance(connectors["simulation"], SimulationConnector)
    assert connectors["simulation"].settings is parsed["simulation"]
    comfy = connectors["comfyui"]
    assert isinstance(comfy, ComfyUIConnector)
    assert (comfy.http.base, comfy.ws_url, comfy.local) == ("http://10.0.0.5:8190", "ws://10.0.0.5:8190/ws", False)
    assert comfy.client_id.startswith("appliance-w7-")
    url = ComfyUISettings.from_env({"WORKER_COMFYUI_URL": "https://gpu0.example:9000/comfy/",
                                    "WORKER_COMFYUI_PORT": "1"})
    assert (url.url, url.ws_url, url.host) == ("https://gpu0.example:9000/comfy", "wss://gpu0.example:9000/comfy/ws",
                                               "gpu0.example")


def test_each_connector_takes_its_settings_object_not_the_environment() -> None:
    for name, point in connector_entry_points(("simulation", "noop", "comfyui")).items():
        cls = point.load()
        assert issubclass(cls, Connector) and dataclasses.is_dataclass(cls.settings_type), name
        assert cls.settings_type.__dataclass_params__.frozen, name  # type: ignore[attr-defined]
        [param] = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert param.annotation in (cls.settings_type.__name__, f"{cls.settings_type.__name__} | None"), name


def test_a_bad_worker_setting_does_not_stop_the_api() -> None:
    """The API parses no WORKER_* variable: a bad one is the workers' to refuse."""
    bad = {name: value for name, value in BAD_WORKER if name.startswith("WORKER_")}
    api = ApiSettings.from_env(bad)
    assert api.port == 3001
    assert {f.name for f in dataclasses.fields(QueueSettings)}.isdisjoint({"lease_ms", "env"})
    assert "env" not in {f.name for f in dataclasses.fields(WorkerSettings)}
    worker = WorkerSettings.from_env({"WORKER_LEASE_MS": "5000", "CUDA_VISIBLE_DEVICES": "GPU-abc,GPU-def"})
    assert (worker.lease_ms, worker.gpu_device) == (5000, "GPU-abc")
    assert WorkerSettings.from_env({"CUDA_VISIBLE_DEVICES": "-1"}).gpu_device == ""


# Modules that read the process environment: the entry points (the worker's, the CLI's) and the settings module.
ENVIRONMENT_READERS = {"appliance/settings.py", "appliance/worker_process.py", "appliance/cli.py"}
# The CLI's own modules, which parse the environment the CLI hands them (programs, Redis, ComfyUI hosts).
CLI_MODULES = {"appliance/cli.py", "appliance/configure.py", "appliance/runtime.py", "appliance/comfyui_host.py"}


def test_nothing_after_the_entry_points_reads_the_environment() -> None:
    """`os.environ`/`os.getenv` only in the entry points and settings.py; `Env(...)` (the parser) only in
    settings.py, the CLI's modules and `from_env` classmethods (a connector's settings dataclass): no worker, API
    or connector code reads a variable at run time."""
    offences = []
    for path in sorted([*(ROOT / "appliance").rglob("*.py"), *(ROOT / "connectors").rglob("*.py")]):
        name = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(), name)
        for function, node in _walk(tree, ""):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                    and node.attr in ("environ", "environb", "getenv", "putenv") \
                    and name not in ENVIRONMENT_READERS:
                offences.append(f"{name}:{node.lineno} os.{node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Env" \
                    and name not in CLI_MODULES | {"appliance/settings.py"} and function != "from_env":
                offences.append(f"{name}:{node.lineno} Env(...) in {function or 'module level'}")
    assert offences == []


def _walk(node: ast.AST, function: str) -> list[tuple[str, ast.AST]]:
    """Every node under `node` with the name of the function it is in."""
    found = []
    for child in ast.iter_child_nodes(node):
        inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
        found.append((inner, child))
        found.extend(_walk(child, inner))
    return found


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
    ("WORKER_COMFYUI_PORT", "http"),
])
def test_worker_process_exits_2_with_one_line(env_base: dict[str, str], name: str, value: str) -> None:
    env = {**env_base, "WORKER_CONNECTORS": "simulation,comfyui", name: value}
    proc = _run([sys.executable, "-m", "appliance.worker_process"], env)
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


def test_appliance_start_refuses_a_bad_connector_setting_before_starting_anything(env_base: dict[str, str],
                                                                                 tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**env_base, "APPLIANCE_RUN_DIR": str(run_dir), "APPLIANCE_ENV_FILE": str(tmp_path / "none.env"),
           "WORKER_CONNECTORS": "simulation,comfyui", "WORKER_COMFYUI_PORT": "99999"}
    proc = appliance_cmd(env, "start", timeout_s=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "WORKER_COMFYUI_PORT" in lines[0], proc.stderr
    assert not (run_dir / "supervisord.pid").exists() and not list(run_dir.glob("*.conf"))
