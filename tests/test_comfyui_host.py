"""One managed ComfyUI per GPU (`comfyui{n}`, COMFYUI_DIR) or an external one per worker (WORKER_COMFYUI_URLS):
the settings checks, the generated programs, and a whole appliance on two stand-in GPUs whose ComfyUI is a
launcher running the ComfyUI double. Also the CLI's readiness count and its "settings changed" line."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.request
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
import redis
from supervisor.xmlrpc import SupervisorTransport

from appliance.cli import readiness
from appliance.comfyui_host import ComfyUIHostSettings, conf, describe, endpoint, plan, with_comfyui_connector
from appliance.jobs import JobSpec
from appliance.keys import Keys
from appliance.programs import configured_programs, resolve
from appliance.queue import Queue
from appliance.redis_conn import connect
from appliance.runtime import WorkerProgram, changed_settings, cpu_worker_programs
from appliance.settings import QueueSettings, SettingsError
from conftest import ROOT
from connectors.comfyui_settings import ComfyUISettings
from loadtest.private import PrivateAppliance, free_port
from procs import wait_for

STANDIN_DIR = ROOT / "tests" / "nvml_standin"
# two GPUs for the NVML stand-in (tests/nvml_standin/pynvml.py describes the fields)
TWO = {"driver": "550.54.15", "gpus": [
    {"uuid": f"GPU-c0ffee0{n}-1111-2222-3333-44444444444{n}", "name": name, "memory_total_mib": mib,
     "temperature_c": 40, "power_mw": 100_000, "power_limit_mw": 400_000}
    for n, name, mib in ((0, "NVIDIA A100-SXM4-80GB", 81920), (1, "NVIDIA L40S", 46068))]}
GPU_WORKERS = [WorkerProgram(f"worker{n}", f"worker{n}-direct",
                             {"WORKER_ID": f"worker{n}-direct", "CUDA_VISIBLE_DEVICES": TWO["gpus"][n - 1]["uuid"],
                              "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}) for n in (1, 2)]

# ComfyUI as the test sees it: main.py takes ComfyUI's options (unknown ones are an error, so the appliance's
# command line is checked), records its argv and device in its output folder, waits while a `hold` file
# beside it exists (a ComfyUI still loading), then serves the double on --port.
LAUNCHER = '''\
import argparse, json, os, sys, threading, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from comfyui_double import ComfyDouble

parser = argparse.ArgumentParser()
for name in ("--listen", "--port", "--input-directory", "--output-directory", "--temp-directory"):
    parser.add_argument(name, required=True)
parser.add_argument("--cpu", action="store_true")
parser.add_argument("--preview-method")
parser.add_argument("--extra-model-paths-config")
args = parser.parse_args()
assert args.listen == "127.0.0.1", args.listen
for folder in (args.input_directory, args.output_directory, args.temp_directory):
    assert Path(folder).is_dir(), folder
record = {{"argv": sys.argv[1:], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}}
(Path(args.output_directory) / "launcher.json").write_text(json.dumps(record))
while Path(__file__).with_name("hold").exists():
    time.sleep(0.05)
double = ComfyDouble(port=int(args.port)).start()
print("ComfyUI double listening at", double.url, flush=True)
threading.Event().wait()
'''


def launcher(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.py").write_text(LAUNCHER.format(tests=str(ROOT / "tests")))
    return folder


# -- settings ------------------------------------------------------------------------------------------------
def test_settings_of_a_managed_comfyui(tmp_path: Path) -> None:
    comfy = launcher(tmp_path / "ComfyUI")
    settings = ComfyUIHostSettings.from_env({"COMFYUI_DIR": str(comfy), "COMFYUI_ARGS": "--preview-method auto "
                                             "--extra-model-paths-config '/x/a b.yaml'"})
    assert settings.managed and settings.directory == comfy and settings.base_port == 8188
    assert settings.args == ("--preview-method", "auto", "--extra-model-paths-config", "/x/a b.yaml")
    assert settings.python.endswith("python3") and os.access(settings.python, os.X_OK)
    (comfy / "venv" / "bin").mkdir(parents=True)   # the checkout's own environment is the default
    (comfy / "venv" / "bin" / "python").symlink_to(sys.executable)
    assert ComfyUIHostSettings.from_env({"COMFYUI_DIR": str(comfy)}).python == str(comfy / "venv" / "bin" / "python")
    assert not ComfyUIHostSettings.from_env({}).managed


@pytest.mark.parametrize(("env", "named", "says"), [
    ({"COMFYUI_DIR": "/no/such/ComfyUI"}, "COMFYUI_DIR", "main.py"),
    ({"COMFYUI_DIR": "{empty}"}, "COMFYUI_DIR", "main.py"),
    ({"COMFYUI_BASE_PORT": "0"}, "COMFYUI_BASE_PORT", "from 1 to 65535"),
    ({"COMFYUI_BASE_PORT": "8188x"}, "COMFYUI_BASE_PORT", "integer"),
    ({"COMFYUI_BASE_PORT": "65536"}, "COMFYUI_BASE_PORT", "from 1 to 65535"),
    ({"COMFYUI_ARGS": "--listen 0.0.0.0"}, "COMFYUI_ARGS", "--listen is set by the appliance"),
    ({"COMFYUI_ARGS": "--port=9000"}, "COMFYUI_ARGS", "--port is set by the appliance"),
    ({"COMFYUI_ARGS": "--preview-method 'auto"}, "COMFYUI_ARGS", "quotation"),
    ({"COMFYUI_PYTHON": "/no/such/python"}, "COMFYUI_PYTHON", "no such executable"),
    ({"WORKER_COMFYUI_URLS": "http://127.0.0.1:8188"}, "WORKER_COMFYUI_URLS", "set one of the two"),
    ({"COMFYUI_DIR": "", "COMFYUI_ARGS": "--cpu"}, "COMFYUI_ARGS", "set COMFYUI_DIR too"),
    ({"COMFYUI_DIR": "", "WORKER_COMFYUI_URLS": "ftp://host:21"}, "WORKER_COMFYUI_URLS", "http://"),
    ({"COMFYUI_DIR": "", "WORKER_COMFYUI_URLS": "http://host:99999"}, "WORKER_COMFYUI_URLS", "http://"),
])
def test_bad_comfyui_settings_name_the_variable(tmp_path: Path, env: dict[str, str], named: str, says: str) -> None:
    (tmp_path / "empty").mkdir()
    given = {"COMFYUI_DIR": str(launcher(tmp_path / "ComfyUI")),
             **{k: v.format(empty=tmp_path / "empty") for k, v in env.items()}}
    with pytest.raises(SettingsError) as caught:
        ComfyUIHostSettings.from_env(given)
    assert str(caught.value).startswith(named) and says in str(caught.value), caught.value


def test_endpoints_of_external_comfyui() -> None:
    assert endpoint("X", "http://10.0.0.5:8188/").environment == {
        "WORKER_COMFYUI_URL": "http://10.0.0.5:8188", "WORKER_COMFYUI_HOST": "10.0.0.5", "WORKER_COMFYUI_PORT": "8188"}
    assert endpoint("X", "https://comfy.example/gpu1").url == "https://comfy.example:443/gpu1"
    assert endpoint("X", "http://[::1]:8190").url == "http://[::1]:8190"
    with pytest.raises(SettingsError, match="WORKER_COMFYUI_USERNAME"):
        endpoint("X", "http://user:pw@host:8188")


def test_a_bad_comfyui_host_names_the_variable() -> None:
    """A host http.client would refuse later (InvalidURL, a crash-looping worker) is refused when parsed."""
    for host in ("bad host", "a\tb", "-x", "x..y", "h\x00"):
        with pytest.raises(SettingsError, match="^WORKER_COMFYUI_HOST="):
            ComfyUISettings.from_env({"WORKER_COMFYUI_HOST": host})
    for host in ("localhost", "comfy-1.lan", "10.0.0.5", "::1"):
        assert ComfyUISettings.from_env({"WORKER_COMFYUI_HOST": host}).host == host
    with pytest.raises(SettingsError, match="^X=.*not a hostname"):
        endpoint("X", "http://bad host:8188")


def test_readiness_checks_fatal_before_ready() -> None:
    """A FATAL ComfyUI (its port taken) is not "nothing starting": `restart` must fail naming it."""
    fatal = [{"name": "api", "statename": "RUNNING"}, {"name": "comfyui2", "statename": "FATAL"}]
    assert readiness(200, 2, 2, fatal) == ("fatal", ["comfyui2"])
    assert readiness(200, 2, 2, [{"name": "comfyui1", "statename": "BACKOFF"}]) == ("waiting", ["comfyui1"])
    assert readiness(200, 2, 2, [{"name": "comfyui1", "statename": "RUNNING"}]) == ("ready", [])


def test_comfyui_joins_the_connectors_and_services() -> None:
    assert with_comfyui_connector({})["WORKER_CONNECTORS"] == "simulation,comfyui"
    assert "WORKER_SERVICES" not in with_comfyui_connector({})  # services default to the connectors
    both = with_comfyui_connector({"WORKER_CONNECTORS": "noop", "WORKER_SERVICES": "noop"})
    assert (both["WORKER_CONNECTORS"], both["WORKER_SERVICES"]) == ("noop,comfyui", "noop,comfyui")
    assert with_comfyui_connector({"WORKER_CONNECTORS": "comfyui"})["WORKER_CONNECTORS"] == "comfyui"


# -- programs ------------------------------------------------------------------------------------------------
def test_one_comfyui_per_gpu_worker_on_its_gpu_and_port(tmp_path: Path) -> None:
    comfy = launcher(tmp_path / "ComfyUI")
    settings = ComfyUIHostSettings.from_env({"COMFYUI_DIR": str(comfy), "COMFYUI_BASE_PORT": "9100",
                                             "COMFYUI_PYTHON": sys.executable, "COMFYUI_ARGS": "--preview-method auto"})
    run = tmp_path / "run"
    planned = plan(settings, GPU_WORKERS, run)
    assert [(p.name, p.worker, p.port, p.device) for p in planned.programs] == [
        ("comfyui1", "worker1", 9100, TWO["gpus"][0]["uuid"]), ("comfyui2", "worker2", 9101, TWO["gpus"][1]["uuid"])]
    assert planned.programs[1].command == (sys.executable, str(comfy / "main.py"), "--listen", "127.0.0.1", "--port",
                                           "9101", "--input-directory", str(run / "comfyui2" / "input"),
                                           "--output-directory", str(run / "comfyui2" / "output"),
                                           "--temp-directory", str(run / "comfyui2" / "temp"),
                                           "--preview-method", "auto")
    assert planned.programs[0].environment == {"CUDA_VISIBLE_DEVICES": TWO["gpus"][0]["uuid"],
                                               "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    worker2 = planned.workers[1].environment   # worker n talks to comfyui n only
    assert (worker2["WORKER_COMFYUI_URL"], worker2["WORKER_COMFYUI_HOST"], worker2["WORKER_COMFYUI_PORT"]) == (
        "http://127.0.0.1:9101", "127.0.0.1", "9101")
    assert worker2["CUDA_VISIBLE_DEVICES"] == TWO["gpus"][1]["uuid"]

    text = conf(planned.programs, comfy)
    programs = configured_programs([text])
    assert [p.spec for p in programs] == ["comfyui:comfyui1", "comfyui:comfyui2"]
    assert [p.spec for p in resolve(programs, ["comfyui1"])[0]] == ["comfyui:comfyui1"]
    assert [p.spec for p in resolve(programs, ["comfyui"])[0]] == ["comfyui:comfyui1", "comfyui:comfyui2"]
    assert [p.spec for p in resolve(programs, ["comfyui:"])[0]] == ["comfyui:comfyui1", "comfyui:comfyui2"]
    section = text.split("[program:comfyui2]")[1].split("\n\n")[0]
    command = next(line for line in section.splitlines() if line.startswith("command="))
    assert tuple(shlex.split(command.removeprefix("command="))) == planned.programs[1].command
    for line in ("priority=25", "stopasgroup=true", "killasgroup=true", "autorestart=true",
                 "stdout_logfile=%(ENV_APPLIANCE_RUN_DIR)s/logs/comfyui2.log",
                 f'environment=CUDA_VISIBLE_DEVICES="{TWO["gpus"][1]["uuid"]}",CUDA_DEVICE_ORDER="PCI_BUS_ID"'):
        assert any(row.startswith(line) for row in section.splitlines()), line
    assert "[group:comfyui]\nprograms=comfyui1,comfyui2\npriority=25" in text


def test_cpu_workers_get_a_cpu_comfyui_each(tmp_path: Path) -> None:
    settings = ComfyUIHostSettings.from_env({"COMFYUI_DIR": str(launcher(tmp_path / "ComfyUI"))})
    planned = plan(settings, cpu_worker_programs({"WORKER_COUNT": "3"}), tmp_path)
    assert [p.port for p in planned.programs] == [8188, 8189, 8190]
    assert all(p.command[-1] == "--cpu" and p.environment == {"CUDA_VISIBLE_DEVICES": ""} for p in planned.programs)


def test_program_and_port_checks(tmp_path: Path) -> None:
    comfy = str(launcher(tmp_path / "ComfyUI"))
    with pytest.raises(SettingsError, match=r"^COMFYUI_BASE_PORT=65535: 2 ComfyUI need ports up to 65536"):
        plan(ComfyUIHostSettings.from_env({"COMFYUI_DIR": comfy, "COMFYUI_BASE_PORT": "65535"}), GPU_WORKERS, tmp_path)
    urls = ComfyUIHostSettings.from_env({"WORKER_COMFYUI_URLS": "http://a:8188,http://b:8188,http://c:8188"})
    with pytest.raises(SettingsError, match=r"^WORKER_COMFYUI_URLS: 3 URLs for 2 workers"):
        plan(urls, GPU_WORKERS, tmp_path)
    external = plan(ComfyUIHostSettings.from_env({"WORKER_COMFYUI_URLS": "http://a:8188, http://b:8189"}),
                    GPU_WORKERS, tmp_path)
    assert external.programs == [] and conf(external.programs, None).count("[program:") == 0
    assert [w.environment["WORKER_COMFYUI_URL"] for w in external.workers] == ["http://a:8188", "http://b:8189"]
    assert plan(ComfyUIHostSettings(), GPU_WORKERS, tmp_path).workers == GPU_WORKERS   # one shared ComfyUI


def test_bin_appliance_refuses_a_bad_comfyui_setting_before_starting(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "API_", "REDIS", "HUB_", "COMFYUI_"))}
    base.update(APPLIANCE_RUN_DIR=str(run), APPLIANCE_ENV_FILE=str(tmp_path / "none.env"), WORKER_GPU_COUNT="0",
                REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", API_PORT=str(free_port()), PYTHONPATH=str(ROOT))
    for extra, named in (({"COMFYUI_DIR": str(tmp_path)}, "COMFYUI_DIR"),
                         ({"WORKER_COUNT": "2", "WORKER_COMFYUI_URLS": "http://a:1"}, "WORKER_COMFYUI_URLS"),
                         ({"WORKER_CONNECTORS": "simulation,comfyui", "WORKER_COMFYUI_HOST": "bad host"},
                          "WORKER_COMFYUI_HOST")):
        done = subprocess.run([sys.executable, "-m", "appliance.cli", "start"], env={**base, **extra}, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr.count("\n")) == (2, 1), done.stdout + done.stderr
        assert done.stderr.startswith(f"appliance: bad setting: {named}"), done.stderr
        assert not run.exists()   # checked before anything is written or started


# -- the CLI's bookkeeping -------------------------------------------------------------------------------------
def test_settings_changed_names_only_the_users_settings() -> None:
    old = {"WORKER_COUNT": "2", "API_PORT": "3001", "COMFYUI_ARGS": "--cpu"}
    new = {"WORKER_COUNT": "3", "API_PORT": "3001", "COMFYUI_ARGS": "", "PATH": "/bin"}
    assert changed_settings(old, new) == ["COMFYUI_ARGS", "WORKER_COUNT"]
    assert changed_settings(old, dict(old)) == []


def test_readiness_counts_live_workers_of_the_current_programs(client: redis.Redis) -> None:
    """Registrations a removed worker left behind (it could not deregister while Redis was down), or whose
    heartbeat lapsed, do not make `start` think the current workers are up."""
    from appliance.cli import live_registrations

    k = Keys("")
    client.sadd(k.workers_active, "worker1-direct", "worker2-direct", "worker3-direct", "worker4-direct")
    for worker_id in ("worker1-direct", "worker3-direct", "worker4-direct"):
        client.set(k.worker_heartbeat(worker_id), "1", ex=30)
    ids = ["worker1-direct", "worker2-direct"]     # WORKER_COUNT went from 4 to 2
    assert live_registrations(client, k, ids) == 1     # worker2 has not beaten yet; 3 and 4 are stale
    client.set(k.worker_heartbeat("worker2-direct"), "1", ex=30)
    assert live_registrations(client, k, ids) == 2


# -- a whole appliance on two stand-in GPUs ---------------------------------------------------------------------
def comfyui_job(gpu_model: str, seed: int) -> JobSpec:
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "seed": seed}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"job{seed}"}}}
    return JobSpec.parse({"service_required": "comfyui", "payload": {"workflow": graph},
                          "requirements": {"gpu_model": gpu_model}})


def history(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/history", timeout=5) as reply:
        return dict(json.loads(reply.read()))


def free_ports(count: int) -> int:
    """A base port with `count` free ports from it."""
    while True:
        base = free_port()
        if base + count <= 65535 and all(_free(base + i) for i in range(1, count)):
            return base


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.slow
def test_each_gpu_worker_drives_its_own_managed_comfyui(tmp_path: Path) -> None:
    comfy = launcher(tmp_path / "ComfyUI")
    gpus = tmp_path / "gpus.json"
    gpus.write_text(json.dumps(TWO))
    base = free_ports(2)
    urls = [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
    extra = {"APPLIANCE_NVML_STANDIN": str(gpus), "PYTHONPATH": f"{STANDIN_DIR}{os.pathsep}{ROOT}",
             "COMFYUI_DIR": str(comfy), "COMFYUI_PYTHON": sys.executable, "COMFYUI_BASE_PORT": str(base),
             "COMFYUI_ARGS": "--preview-method auto --extra-model-paths-config '/x/a b.yaml'",
             "WORKER_COMFYUI_HEALTH_INTERVAL_SECONDS": "0.3", "WORKER_HEARTBEAT_INTERVAL_MS": "300",
             "WORKER_POLL_INTERVAL_MS": "200", "WORKER_DRAIN_SECONDS": "2"}
    with PrivateAppliance(tmp_path / "run", env=extra, quiet=True) as app:
        env = app.environment()

        def cli(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(ROOT / "bin" / "appliance"), *argv], env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=120)

        client = connect(app.redis_url)
        transport = SupervisorTransport(None, None, f"unix://{app.socket}")
        try:
            check_comfyui_per_gpu(app, comfy, urls, client, cli,
                                  xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor)
        finally:
            transport.close()
            client.close()
            client.connection_pool.disconnect()


def check_comfyui_per_gpu(app: PrivateAppliance, comfy: Path, urls: list[str], client: redis.Redis, cli: Any,
                          rpc: Any) -> None:
    run, queue = app.run_dir, Queue(client, QueueSettings(redis_url=app.redis_url))

    def offering(worker: str) -> bool:
        return any(w["id"] == worker and "comfyui" in (w.get("services") or []) for w in queue.workers())

    # comfyui n runs on GPU n's UUID, on base + n - 1, with its own folders and COMFYUI_ARGS
    for n, url in ((1, urls[0]), (2, urls[1])):
        record = wait_for(lambda n=n: _read(run / f"comfyui{n}" / "output" / "launcher.json"), 20, "a launch")
        assert record["cuda"] == TWO["gpus"][n - 1]["uuid"], record
        argv = record["argv"]
        assert argv[argv.index("--port") + 1] == url.rsplit(":", 1)[1] and "--cpu" not in argv, argv
        assert argv[argv.index("--temp-directory") + 1] == str(run / f"comfyui{n}" / "temp"), argv
        assert argv[-2:] == ["--extra-model-paths-config", "/x/a b.yaml"], argv
    workers_conf = (run / "conf.d" / "workers.conf").read_text()
    assert f'WORKER_COMFYUI_URL="{urls[1]}"' in workers_conf.split("[program:worker2]")[1]
    assert 'WORKER_CONNECTORS="simulation,comfyui"' in workers_conf

    # each worker's comfyui job lands on its own ComfyUI, and only there
    wait_for(lambda: offering("worker1-direct") and offering("worker2-direct"), 30, "both offer comfyui")
    jobs = {1: queue.submit(comfyui_job("A100", 1)), 2: queue.submit(comfyui_job("L40S", 2))}
    for n, job_id in jobs.items():
        wait_for(lambda j=job_id: client.hget(queue.keys.job(j), "status") == "completed", 30, f"job {n}")
    for n, job_id in jobs.items():
        job = client.hgetall(queue.keys.job(job_id))
        assert (job["worker_id"], job["comfyui_url"]) == (f"worker{n}-direct", urls[n - 1]), job
        assert list(history(urls[n - 1])) == [job["comfyui_prompt_id"]]   # nothing from the other worker

    status = cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    for n in (1, 2):
        assert any(line.startswith(f"comfyui:comfyui{n}") and "RUNNING" in line
                   for line in status.stdout.splitlines()), status.stdout
        assert f"comfyui{n}" in status.stdout and f"{urls[n - 1]} for worker{n} on " \
               f"{TWO['gpus'][n - 1]['uuid']}: answers" in status.stdout, status.stdout
    logs = cli("logs", "comfyui1", "--no-follow")
    assert logs.returncode == 0 and f"ComfyUI double listening at {urls[0]}" in logs.stdout, logs.stdout

    # restart comfyui1: a new process, the others untouched
    pids = {spec: rpc.getProcessInfo(spec)["pid"] for spec in ("comfyui:comfyui1", "comfyui:comfyui2",
                                                                "workers:worker1")}
    restarted = cli("restart", "comfyui1")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert rpc.getProcessInfo("comfyui:comfyui1")["pid"] != pids["comfyui:comfyui1"]
    assert all(rpc.getProcessInfo(s)["pid"] == pids[s] for s in ("comfyui:comfyui2", "workers:worker1"))

    # comfyui1 killed (and slow to come back): worker1 stops offering comfyui until it answers again
    wait_for(lambda: offering("worker1-direct"), 30, "worker1 to offer comfyui after the restart")
    (comfy / "hold").touch()
    assert cli("ctl", "signal", "KILL", "comfyui:comfyui1").returncode == 0
    wait_for(lambda: not offering("worker1-direct"), 30, "worker1 to stop offering comfyui")
    assert offering("worker2-direct")
    held = queue.submit(comfyui_job("A100", 3))
    (comfy / "hold").unlink()
    wait_for(lambda: offering("worker1-direct"), 30, "worker1 to offer comfyui again")
    wait_for(lambda: client.hget(queue.keys.job(held), "status") == "completed", 30, "the held job")
    job = client.hgetall(queue.keys.job(held))
    assert job["worker_id"] == "worker1-direct" and list(history(urls[0])) == [job["comfyui_prompt_id"]]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError):
        return None


def test_status_lines_tell_a_stopped_or_failed_comfyui_from_a_loading_one() -> None:
    """`status` shows supervisord's state for a ComfyUI that is not running, and "loading" only in a running
    one's first minute."""
    from comfyui_double import ComfyDouble

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    double = ComfyDouble().start()
    try:
        entries = [{"program": "comfyui1", "worker": "worker1-direct", "url": double.url, "device": "GPU-1"},
                   {"program": "comfyui2", "worker": "worker2-direct", "url": down, "device": "GPU-2"}]
        fatal, young, old = describe(entries, {"comfyui1": ("RUNNING", "pid 7, uptime 0:05:00"),
                                               "comfyui2": ("FATAL", "Exited too quickly")}), \
            describe(entries[1:], {"comfyui2": ("RUNNING", "pid 8, uptime 0:00:12")}), \
            describe(entries[1:], {"comfyui2": ("RUNNING", "pid 8, uptime 0:03:12")})
    finally:
        double.stop()
    assert "comfyui1" in fatal[0] and "answers (ComfyUI" in fatal[0]
    assert fatal[1].endswith("not running (FATAL): see `bin/appliance logs comfyui2`")
    assert "not answering (" in young[0] and "loading, or see `bin/appliance logs comfyui2`" in young[0]
    assert "not answering (" in old[0] and "loading" not in old[0]
