"""GPUs through the NVML stand-in (tests/nvml_standin): discovery, sampling, one worker per GPU, heartbeats,
and GPU ownership in `bin/appliance status`. Two and four GPUs, a GPU that errors, and no driver."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
import redis

from appliance.api.monitor import monitor_worker
from appliance.gpu import GpuSampler, discover
from appliance.jobs import JobSpec
from appliance.queue import Queue
from appliance.runtime import worker_programs, workers_conf
from appliance.settings import WorkerSettings
from appliance.telemetry import HostSampler
from loadtest.private import PrivateAppliance
from procs import ROOT, appliance_cmd, wait_alive, wait_for, worker_process

STANDIN_DIR = ROOT / "tests" / "nvml_standin"


def gpu(n: int, **over: Any) -> dict[str, Any]:
    spec = {"uuid": f"GPU-0000000{n}-aaaa-bbbb-cccc-00000000000{n}", "name": "NVIDIA A100-SXM4-80GB",
            "memory_total_mib": 81920, "memory_used_mib": 2048 * (n + 1), "utilization": 10 * n,
            "memory_utilization": 5, "temperature_c": 40 + n, "power_mw": 100_000 + n * 1000,
            "power_limit_mw": 400_000, "ecc_uncorrected": 0}
    spec.update(over)
    return spec


TWO = {"driver": "550.54.15", "gpus": [gpu(0), gpu(1, name="NVIDIA L40S", memory_total_mib=46068)]}
FOUR = {"driver": "550.54.15", "gpus": [gpu(0), gpu(1, error="gpu_is_lost"), gpu(2, unsupported=["power"]),
                                        gpu(3, name="NVIDIA H100 80GB HBM3")]}
NO_DRIVER = {"no_driver": True}


@pytest.fixture()
def nvml(tmp_path: Path) -> Any:
    """The stand-in loaded under its own name; `nvml.use(spec)` writes the host it describes."""
    spec = importlib.util.spec_from_file_location(f"nvml_standin_{id(tmp_path)}", STANDIN_DIR / "pynvml.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "gpus.json"

    def use(host: dict[str, Any]) -> ModuleType:
        path.write_text(json.dumps(host))
        module.SPEC_PATH = str(path)
        return module

    module.use = use
    module.path = path
    return module


# -- discovery ----------------------------------------------------------------------------------------------
def test_discovers_two_gpus(nvml: Any) -> None:
    found = discover(nvml.use(TWO))
    assert found.error == "" and found.driver == "550.54.15"
    assert [(g.index, g.uuid, g.name, g.memory_total_gb) for g in found.usable] == [
        (0, TWO["gpus"][0]["uuid"], "NVIDIA A100-SXM4-80GB", 80.0),
        (1, TWO["gpus"][1]["uuid"], "NVIDIA L40S", 44.99)]


def test_four_gpus_one_erroring_is_listed_but_not_used(nvml: Any) -> None:
    found = discover(nvml.use(FOUR))
    assert len(found.gpus) == 4
    assert [g.index for g in found.usable] == [0, 2, 3]
    assert found.gpus[1].error


def test_no_driver(nvml: Any) -> None:
    found = discover(nvml.use(NO_DRIVER))
    assert found.gpus == [] and "NVML Shared Library Not Found" in found.error


# -- sampling -----------------------------------------------------------------------------------------------
def test_sample_reports_the_gpu_figures(nvml: Any) -> None:
    sampler = GpuSampler(TWO["gpus"][1]["uuid"], nvml.use(TWO), min_interval_s=0)
    figures = sampler.sample()
    assert figures["ok"] is True and figures["uuid"] == TWO["gpus"][1]["uuid"]
    assert figures["name"] == "NVIDIA L40S"
    assert figures["memory_total_gb"] == 44.988 and figures["memory_used_gb"] == 4.0
    assert figures["memory_free_gb"] == round(44.988 - 4.0, 3)
    assert (figures["utilization_percent"], figures["temperature_c"], figures["power_w"]) == (10, 41, 101.0)
    assert figures["power_limit_w"] == 400.0 and figures["ecc_uncorrected_volatile"] == 0
    assert figures["unsupported"] == []


def test_unsupported_fields_are_null_not_zero(nvml: Any) -> None:
    figures = GpuSampler(FOUR["gpus"][2]["uuid"], nvml.use(FOUR), min_interval_s=0).sample()
    assert figures["ok"] is True
    assert figures["power_w"] is None and figures["power_limit_w"] is None
    assert figures["unsupported"] == ["power_w", "power_limit_w"]


def test_erroring_gpu_is_reported_as_such(nvml: Any) -> None:
    figures = GpuSampler(FOUR["gpus"][1]["uuid"], nvml.use(FOUR), min_interval_s=0).sample()
    assert figures["ok"] is False
    assert "GPU is lost" in figures["error"]
    assert "memory_used_gb" not in figures and "utilization_percent" not in figures


def test_no_driver_and_unknown_gpu_are_reported(nvml: Any) -> None:
    assert "NVML Shared Library Not Found" in GpuSampler("GPU-x", nvml.use(NO_DRIVER)).sample()["error"]
    assert "not found" in GpuSampler("GPU-nope", nvml.use(TWO)).sample()["error"]


def test_sampling_is_rate_limited_and_follows_changes(nvml: Any) -> None:
    host = json.loads(json.dumps(TWO))
    sampler = GpuSampler(host["gpus"][0]["uuid"], nvml.use(host), min_interval_s=60)
    first = sampler.sample()
    host["gpus"][0]["memory_used_mib"] = 40960
    nvml.use(host)
    assert sampler.sample() is first  # not read again within the interval
    sampler.min_interval_s = 0
    assert sampler.sample()["memory_used_gb"] == 40.0


def test_host_sampler_adds_its_gpu(nvml: Any) -> None:
    def pinned(env: dict[str, str]) -> str:
        return WorkerSettings.from_env(env).gpu_device

    assert pinned({"CUDA_VISIBLE_DEVICES": "GPU-abc"}) == "GPU-abc"
    assert pinned({"CUDA_VISIBLE_DEVICES": ""}) == "" and pinned({}) == ""
    sampler = HostSampler(GpuSampler(TWO["gpus"][0]["uuid"], nvml.use(TWO)))
    figures = sampler.sample()
    assert sampler.latest is figures
    assert {"cpu_percent", "load_avg", "ram_used_gb", "ram_total_gb", "rss_mb"} <= set(figures)
    assert figures["gpu"]["uuid"] == TWO["gpus"][0]["uuid"]
    assert HostSampler().sample()["gpu"] is None


# -- one worker per GPU -------------------------------------------------------------------------------------
def test_one_worker_per_gpu_pinned_by_uuid(nvml: Any) -> None:
    plan = worker_programs({}, nvml.use(TWO))
    assert [p.name for p in plan.programs] == ["worker1", "worker2"]
    first, second = (p.environment for p in plan.programs)
    assert first["CUDA_VISIBLE_DEVICES"] == TWO["gpus"][0]["uuid"] == first["WORKER_GPU_UUID"]
    assert second["CUDA_VISIBLE_DEVICES"] == TWO["gpus"][1]["uuid"]
    assert (second["WORKER_GPU_MODEL"], second["WORKER_GPU_MEMORY_GB"], second["WORKER_GPU_INDEX"]) == (
        "NVIDIA L40S", "44.99", "1")
    assert first["WORKER_GPU_COUNT"] == "1" and first["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert TWO["gpus"][1]["uuid"] in plan.note
    conf = workers_conf(plan.programs, 45)
    assert f'CUDA_VISIBLE_DEVICES="{TWO["gpus"][0]["uuid"]}"' in conf


def test_four_gpus_one_erroring_gives_three_workers(nvml: Any) -> None:
    plan = worker_programs({}, nvml.use(FOUR))
    assert [p.environment["WORKER_GPU_INDEX"] for p in plan.programs] == ["0", "2", "3"]
    assert "not usable: GPU 1" in plan.note


def test_gpu_settings_override_and_limit(nvml: Any) -> None:
    plan = worker_programs({"WORKER_GPU_COUNT": "1", "WORKER_GPU_MODEL": "A100 (leased)"}, nvml.use(TWO))
    assert len(plan.programs) == 1
    assert plan.programs[0].environment["WORKER_GPU_MODEL"] == "A100 (leased)"
    cpu = worker_programs({"WORKER_GPU_COUNT": "0", "WORKER_COUNT": "3"}, nvml.use(TWO))
    assert [p.environment["CUDA_VISIBLE_DEVICES"] for p in cpu.programs] == ["", "", ""]
    assert "CPU workers" in cpu.note


def test_no_driver_falls_back_to_cpu_workers_and_says_so(nvml: Any) -> None:
    plan = worker_programs({"WORKER_COUNT": "2"}, nvml.use(NO_DRIVER))
    assert [p.worker_id for p in plan.programs] == ["worker1-direct", "worker2-direct"]
    assert all(p.environment["CUDA_VISIBLE_DEVICES"] == "" for p in plan.programs)
    assert "no NVIDIA GPU" in plan.note and "NVML Shared Library Not Found" in plan.note and "2 CPU" in plan.note


def test_gpus_described_by_hand_without_nvml(nvml: Any) -> None:
    plan = worker_programs({"WORKER_GPU_COUNT": "2", "WORKER_GPU_MODEL": "RTX 4090", "WORKER_GPU_MEMORY_GB": "24"},
                           nvml.use(NO_DRIVER))
    assert [p.environment["CUDA_VISIBLE_DEVICES"] for p in plan.programs] == ["0", "1"]
    assert plan.programs[1].environment["WORKER_GPU_MEMORY_GB"] == "24"
    assert "by hand" in plan.note


# -- a worker process on a GPU ------------------------------------------------------------------------------
def standin_env(env_base: dict[str, str], host: dict[str, Any], path: Path) -> dict[str, str]:
    path.write_text(json.dumps(host))
    return {**env_base, "APPLIANCE_NVML_STANDIN": str(path),
            "PYTHONPATH": f"{STANDIN_DIR}{os.pathsep}{env_base['PYTHONPATH']}"}


def test_gpu_worker_heartbeats_its_own_gpu_and_serves_gpu_jobs(env_base: dict[str, str], client: redis.Redis,
                                                              queue: Queue, tmp_path: Path) -> None:
    """A worker pinned to GPU 1 of two: its heartbeat shows GPU 1's NVML figures and it takes a job that
    needs 40 GB free on an A100, while a job for 100 GB is marked unworkable."""
    host = {"driver": "550.54.15", "gpus": [gpu(0, name="NVIDIA T4", memory_total_mib=15360), gpu(1)]}
    env = {**standin_env(env_base, host, tmp_path / "gpus.json"),
           "CUDA_VISIBLE_DEVICES": host["gpus"][1]["uuid"], "WORKER_CONNECTORS": "noop",
           "WORKER_HEARTBEAT_INTERVAL_MS": "200", "WORKER_POLL_INTERVAL_MS": "200"}
    k = queue.keys
    with worker_process(env, client, "gpu-worker") as proc:
        worker = next(w for w in queue.workers() if w["id"] == "gpu-worker")
        figures = worker["telemetry"]["gpu"]
        assert figures["uuid"] == host["gpus"][1]["uuid"] and figures["name"] == "NVIDIA A100-SXM4-80GB"
        assert figures["memory_used_gb"] == 4.0 and figures["temperature_c"] == 41
        assert monitor_worker(worker)["telemetry"]["gpu"] == figures  # the monitor snapshot shows them too
        hardware = worker["capabilities"]["hardware"]
        assert (hardware["gpu_model"], hardware["gpu_memory_gb"], hardware["gpu_count"]) == (
            "NVIDIA A100-SXM4-80GB", 80.0, 1)
        fits = queue.submit(JobSpec.parse({"service_required": "noop", "requirements": {
            "gpu_model": "A100", "gpu_memory_free_gb": 40}}))
        too_big = queue.submit(JobSpec.parse({"service_required": "noop", "requirements": {"gpu_memory_gb": 100}}))
        wait_alive(proc, lambda: client.hget(k.job(fits), "status") == "completed", 10, "the job that fits")
        assert client.hget(k.job(too_big), "status") == "unworkable"


@pytest.mark.slow
def test_status_shows_which_worker_owns_which_gpu(env_base: dict[str, str], tmp_path: Path) -> None:
    standin = standin_env(env_base, TWO, tmp_path / "gpus.json")
    app = PrivateAppliance(tmp_path / "run", quiet=True, env={
        "APPLIANCE_NVML_STANDIN": standin["APPLIANCE_NVML_STANDIN"], "PYTHONPATH": standin["PYTHONPATH"],
        "WORKER_CONNECTORS": "noop", "WORKER_HEARTBEAT_INTERVAL_MS": "300", "WORKER_DRAIN_SECONDS": "2"})
    env, run_dir = app.environment(), app.run_dir

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return appliance_cmd(env, *argv)

    def gpus_shown() -> dict[str, str] | None:
        """Each worker's status line, once both show their GPU's NVML figures (the first heartbeat has them)."""
        status = cli("status")
        lines = {line.split()[0]: line for line in status.stdout.splitlines() if "-direct" in line}
        return lines if all("GB)" in lines.get(f"worker{n}-direct", "") for n in (1, 2)) else None

    started = cli("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "NVML (driver 550.54.15) found 2 GPUs" in started.stdout
        lines = wait_for(gpus_shown, 15, "both workers' NVML figures in the status")
        assert TWO["gpus"][0]["uuid"] in lines["worker1-direct"], lines
        assert "0:NVIDIA A100-SXM4-80GB" in lines["worker1-direct"]
        assert f"1:NVIDIA L40S:{TWO['gpus'][1]['uuid']}" in lines["worker2-direct"], lines
        conf = (run_dir / "conf.d" / "workers.conf").read_text()
        assert f'CUDA_VISIBLE_DEVICES="{TWO["gpus"][1]["uuid"]}"' in conf
        client = redis.Redis.from_url(app.redis_url, decode_responses=True)   # with the embedded Redis's password
        caps = orjson.loads(client.hget("worker:worker2-direct", "capabilities"))
        client.close()
        assert caps["hardware"]["gpu_uuid"] == TWO["gpus"][1]["uuid"]
    finally:
        stopped = cli("stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
