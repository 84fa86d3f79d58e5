"""Host figures for worker heartbeats (psutil). GPU figures from NVML are added by the GPU layer."""

from __future__ import annotations

import os
from typing import Any

import psutil


class HostSampler:
    """Samples CPU, load, RAM and this process's RSS. The first CPU reading primes the counter."""

    def __init__(self) -> None:
        self._process = psutil.Process(os.getpid())
        psutil.cpu_percent(interval=None)

    def sample(self) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        load1, load5, load15 = psutil.getloadavg()
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "load_avg": [round(load1, 2), round(load5, 2), round(load15, 2)],
            "ram_used_gb": round((memory.total - memory.available) / 1024**3, 3),
            "ram_total_gb": round(memory.total / 1024**3, 3),
            "rss_mb": round(self._process.memory_info().rss / 1024**2, 1),
        }
