"""Figures for worker heartbeats: the host's from psutil, and its own GPU's from NVML (appliance.gpu)."""

from __future__ import annotations

import os
from typing import Any

import psutil

from appliance.gpu import GpuSampler


class HostSampler:
    """Samples CPU, load, RAM, this process's RSS and, with a `gpu` sampler, its GPU.

    The first CPU reading primes the counter. `latest` keeps the last sample (a new dict each time), which
    the worker uses to judge live requirements such as free GPU memory.
    """

    def __init__(self, gpu: GpuSampler | None = None) -> None:
        self._process = psutil.Process(os.getpid())
        self.gpu = gpu
        self.latest: dict[str, Any] | None = None
        psutil.cpu_percent(interval=None)

    @classmethod
    def for_worker(cls, gpu_device: str) -> HostSampler:
        """A sampler for a worker process: with its GPU when it is pinned to one (`WorkerSettings.gpu_device`)."""
        return cls(GpuSampler(gpu_device) if gpu_device else None)

    @staticmethod
    def ram_total_gb() -> float:
        return round(float(psutil.virtual_memory().total) / 1024**3, 1)

    def sample(self) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        load1, load5, load15 = psutil.getloadavg()
        figures: dict[str, Any] = {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "load_avg": [round(load1, 2), round(load5, 2), round(load15, 2)],
            "ram_used_gb": round((memory.total - memory.available) / 1024**3, 3),
            "ram_total_gb": round(memory.total / 1024**3, 3),
            "rss_mb": round(self._process.memory_info().rss / 1024**2, 1),
            "gpu": self.gpu.sample() if self.gpu is not None else None,
        }
        self.latest = figures
        return figures
