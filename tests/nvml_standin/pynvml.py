"""An NVML stand-in for hosts without NVIDIA GPUs: the subset of nvidia-ml-py's `pynvml` the appliance calls.

Put this folder first on PYTHONPATH (so `import pynvml` finds it) and name a JSON file describing the GPUs in
APPLIANCE_NVML_STANDIN; the file is read again on every call, so a test can change figures live:

    {"driver": "550.54.15",
     "gpus": [{"uuid": "GPU-…", "name": "NVIDIA A100-SXM4-80GB", "memory_total_mib": 81920,
               "memory_used_mib": 1024, "utilization": 37, "memory_utilization": 12, "temperature_c": 51,
               "power_mw": 123000, "power_limit_mw": 400000, "ecc_uncorrected": 0,
               "unsupported": ["power"],           # these calls raise NVMLError_NotSupported
               "error": "gpu_is_lost"}]}          # every call on this GPU raises (after its handle)

`{"no_driver": true}` (or the variable unset) makes nvmlInit raise NVMLError_LibraryNotFound, as on a
host without the driver. In-process tests may load this file under another name and set `SPEC_PATH`.
Error classes mirror pynvml's: NVMLError(value) maps to NVMLError_<Name> subclasses with `.value`.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

SPEC_PATH: str | None = os.environ.get("APPLIANCE_NVML_STANDIN")

NVML_TEMPERATURE_GPU = 0
NVML_VOLATILE_ECC = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
_NAMES = {1: "Uninitialized", 3: "Not Supported", 6: "Not Found", 9: "Driver Not Loaded",
          12: "NVML Shared Library Not Found", 15: "GPU is lost", 999: "Unknown Error"}
_BY_KEY = {"gpu_is_lost": 15, "unknown": 999, "not_supported": 3, "driver_not_loaded": 9}


class NVMLError(Exception):
    _valClassMapping: dict[int, type] = {}
    value: int

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value: int) -> None:
        super().__init__(value)

    def __str__(self) -> str:
        return _NAMES.get(self.value, f"NVML Error with code {self.value}")


def _subclass(name: str, value: int) -> type:
    cls = type(name, (NVMLError,), {})
    NVMLError._valClassMapping[value] = cls
    return cls


NVMLError_Uninitialized = _subclass("NVMLError_Uninitialized", 1)
NVMLError_NotSupported = _subclass("NVMLError_NotSupported", 3)
NVMLError_NotFound = _subclass("NVMLError_NotFound", 6)
NVMLError_DriverNotLoaded = _subclass("NVMLError_DriverNotLoaded", 9)
NVMLError_LibraryNotFound = _subclass("NVMLError_LibraryNotFound", 12)
NVMLError_GpuIsLost = _subclass("NVMLError_GpuIsLost", 15)
NVMLError_Unknown = _subclass("NVMLError_Unknown", 999)

_initialized = 0


def _spec() -> dict[str, Any]:
    if not SPEC_PATH:
        return {"no_driver": True}
    with open(SPEC_PATH) as handle:
        return dict(json.load(handle))


def _gpus() -> list[dict[str, Any]]:
    if not _initialized:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return list(_spec().get("gpus", []))


def _gpu(handle: Any, call: str) -> dict[str, Any]:
    gpus = _gpus()
    if not isinstance(handle, int) or not 0 <= handle < len(gpus):
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    gpu = gpus[handle]
    if gpu.get("error"):
        raise NVMLError(_BY_KEY.get(gpu["error"], NVML_ERROR_UNKNOWN))
    if call in gpu.get("unsupported", []):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return gpu


def nvmlInit() -> None:
    global _initialized
    spec = _spec()
    if spec.get("no_driver"):
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    if spec.get("driver_not_loaded"):
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
    _initialized += 1


def nvmlShutdown() -> None:
    global _initialized
    if not _initialized:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    _initialized -= 1


def nvmlSystemGetDriverVersion() -> str:
    _gpus()
    return str(_spec().get("driver", "550.54.15"))


def nvmlDeviceGetCount() -> int:
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if not 0 <= index < len(_gpus()):
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return index


def nvmlDeviceGetUUID(handle: int) -> str:
    gpu = _gpus()[handle] if isinstance(handle, int) and 0 <= handle < len(_gpus()) else None
    if gpu is None:
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    if gpu.get("error") and gpu.get("uuid_unreadable"):
        raise NVMLError(_BY_KEY.get(gpu["error"], NVML_ERROR_UNKNOWN))
    return str(gpu["uuid"])


def nvmlDeviceGetName(handle: int) -> str:
    return str(_gpu(handle, "name")["name"])


def nvmlDeviceGetMemoryInfo(handle: int, version: Any = None) -> SimpleNamespace:
    gpu = _gpu(handle, "memory")
    total = int(gpu["memory_total_mib"]) * 1024**2
    used = int(gpu.get("memory_used_mib", 0)) * 1024**2
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    gpu = _gpu(handle, "utilization")
    return SimpleNamespace(gpu=int(gpu.get("utilization", 0)), memory=int(gpu.get("memory_utilization", 0)))


def nvmlDeviceGetTemperatureV(handle: int, sensor: int, version: Any = None) -> int:
    return int(_gpu(handle, "temperature")["temperature_c"])


def nvmlDeviceGetPowerUsage(handle: int) -> int:
    return int(_gpu(handle, "power")["power_mw"])


def nvmlDeviceGetEnforcedPowerLimit(handle: int) -> int:
    return int(_gpu(handle, "power")["power_limit_mw"])


def nvmlDeviceGetTotalEccErrors(handle: int, error_type: int, counter_type: int) -> int:
    return int(_gpu(handle, "ecc").get("ecc_uncorrected", 0))
