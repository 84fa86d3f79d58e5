"""NVIDIA GPUs through NVML (`import pynvml`, from nvidia-ml-py): discovery at start, sampling for heartbeats.

NVML enumerates every GPU whatever CUDA_VISIBLE_DEVICES says, in PCI order, so workers are pinned by UUID.
NVML calls are blocking C calls: a worker samples its one GPU at most every couple of seconds, from its
heartbeat, never per request. Every call is wrapped: a field NVML does not support is null and listed under
`unsupported`; a GPU NVML cannot read at all is reported with `error`, never as zeros.

Hosts without GPUs (and the tests) can put an NVML stand-in module named `pynvml` ahead on PYTHONPATH
(tests/nvml_standin); callers may also pass a module explicitly.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)
GIB = 1024**3
MIN_INTERVAL_S = 2.0


def load_nvml() -> ModuleType | None:
    """The `pynvml` module, or None when nvidia-ml-py is not installed."""
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as found at start."""

    index: int
    uuid: str
    name: str = ""
    memory_total_gb: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class Discovery:
    """What NVML found: the GPUs, the driver version, or why there is no NVML (`error`)."""

    gpus: list[GpuInfo] = field(default_factory=list)
    driver: str = ""
    error: str = ""

    @property
    def usable(self) -> list[GpuInfo]:
        """GPUs NVML reads without error: each gets a worker."""
        return [g for g in self.gpus if g.uuid and not g.error]


def discover(nvml: ModuleType | None = None) -> Discovery:
    """List the GPUs NVML sees (a GPU whose UUID cannot be read is listed with its error)."""
    nvml = nvml or load_nvml()
    if nvml is None:
        return Discovery(error="nvidia-ml-py is not installed")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return Discovery(error=f"NVML unavailable: {exc}")
    try:
        driver = _call(nvml, nvml.nvmlSystemGetDriverVersion)
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = str(nvml.nvmlDeviceGetUUID(handle))
            except nvml.NVMLError as exc:
                gpus.append(GpuInfo(index, "", error=str(exc)))
                continue
            name = _call(nvml, nvml.nvmlDeviceGetName, handle)
            memory = _call(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
            total = round(memory.total / GIB, 2) if memory is not None else 0.0
            gpus.append(GpuInfo(index, uuid, str(name or ""), total,
                                "" if memory is not None else "memory not readable"))
        return Discovery(gpus, str(driver or ""))
    except nvml.NVMLError as exc:
        return Discovery(error=f"NVML failed: {exc}")
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def _call(nvml: ModuleType, fn: Any, *args: Any) -> Any:
    """fn(*args), or None if NVML raises."""
    try:
        return fn(*args)
    except nvml.NVMLError:
        return None


class GpuSampler:
    """Samples one GPU, chosen by UUID (or NVML index), at most every `min_interval_s` seconds."""

    def __init__(self, device: str, nvml: ModuleType | None = None, min_interval_s: float = MIN_INTERVAL_S):
        self.device = device
        self.min_interval_s = min_interval_s
        self._nvml = nvml
        self._ready = False
        self._handle: Any = None
        self._last: dict[str, Any] | None = None
        self._last_at = 0.0

    def sample(self) -> dict[str, Any]:
        """The GPU's figures (cached for `min_interval_s`), or {"device", "error"} when it cannot be read."""
        now = time.monotonic()
        if self._last is None or now - self._last_at >= self.min_interval_s:
            self._last = self._read()
            self._last_at = now
        return self._last

    def close(self) -> None:
        if self._ready and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
        self._ready = False
        self._handle = None

    def _open(self) -> str:
        """Initialise NVML and find the handle; returns an error message, or "" when ready."""
        nvml = self._nvml = self._nvml or load_nvml()
        if nvml is None:
            return "nvidia-ml-py is not installed"
        if not self._ready:
            try:
                nvml.nvmlInit()
            except nvml.NVMLError as exc:
                return f"NVML unavailable: {exc}"
            self._ready = True
        if self._handle is None:
            try:
                self._handle = self._find(nvml)
            except nvml.NVMLError as exc:
                return f"GPU {self.device} not readable: {exc}"
            if self._handle is None:
                return f"GPU {self.device} not found by NVML"
        return ""

    def _find(self, nvml: ModuleType) -> Any:
        if self.device.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(self.device))
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                if str(nvml.nvmlDeviceGetUUID(handle)) == self.device:
                    return handle
            except nvml.NVMLError:
                continue
        return None

    def _read(self) -> dict[str, Any]:
        error = self._open()
        if error:
            return {"device": self.device, "ok": False, "error": error}
        nvml, handle = self._nvml, self._handle
        assert nvml is not None
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            uuid = str(nvml.nvmlDeviceGetUUID(handle))
        except nvml.NVMLError as exc:
            self._handle = None  # look it up again next time (GPU lost, reset, ...)
            return {"device": self.device, "ok": False, "error": f"GPU {self.device} not readable: {exc}"}
        unsupported: list[str] = []

        def read(name: str, fn: Any, *args: Any) -> Any:
            try:
                return fn(handle, *args)
            except nvml.NVMLError:
                unsupported.append(name)
                return None

        util = read("utilization", nvml.nvmlDeviceGetUtilizationRates)
        temperature = read("temperature_c", nvml.nvmlDeviceGetTemperatureV, nvml.NVML_TEMPERATURE_GPU)
        power = read("power_w", nvml.nvmlDeviceGetPowerUsage)
        limit = read("power_limit_w", nvml.nvmlDeviceGetEnforcedPowerLimit)
        ecc = read("ecc_uncorrected_volatile", nvml.nvmlDeviceGetTotalEccErrors,
                   nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
        return {
            "device": self.device,
            "ok": True,
            "uuid": uuid,
            "name": str(read("name", nvml.nvmlDeviceGetName) or ""),
            "utilization_percent": None if util is None else int(util.gpu),
            "memory_utilization_percent": None if util is None else int(util.memory),
            "memory_used_gb": round(memory.used / GIB, 3),
            "memory_total_gb": round(memory.total / GIB, 3),
            "memory_free_gb": round(memory.free / GIB, 3),
            "temperature_c": temperature,
            "power_w": None if power is None else round(power / 1000, 1),
            "power_limit_w": None if limit is None else round(limit / 1000, 1),
            "ecc_uncorrected_volatile": ecc,
            "unsupported": unsupported,
        }
