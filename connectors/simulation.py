"""The simulation connector: pretends to run a GPU job in steps, reporting progress at each one.

Settings (the original's, in `SimulationSettings`): WORKER_SIMULATION_PROCESSING_TIME (seconds, default 5),
WORKER_SIMULATION_STEPS (default 10), WORKER_SIMULATION_FAILURE_RATE (0..1, default 0); for resilience drills,
WORKER_SIMULATION_ALLOW_KILL (default false).
Per-job overrides in the payload, checked at submit (`check_payload`): `duration` (ms, as the guide's curl
sends) or `simulation_time` (seconds, as the monitor sends), each above 0 and at most a day; `steps` (1 to
10000: each is a progress event); `fail` (true: every attempt fails; false; an integer n >= 0: the first n
attempts fail);
`fail_retryable` (false: the failure is final); `kill_worker` (true: each attempt SIGKILLs its worker process
after its first progress step, as a job that crashes its worker would; only on workers with
WORKER_SIMULATION_ALLOW_KILL, elsewhere the job fails at once).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from appliance.connector import Connector, ConnectorError, JobContext, payload_number
from appliance.errors import ValidationError
from appliance.settings import Env

MODELS = ["simulation-model-v1", "simulation-model-v2", "test-model"]
MAX_DURATION_S, MAX_STEPS = 86400, 10_000   # steps: each is a progress event for every follower


@dataclass(frozen=True)
class SimulationSettings:
    """WORKER_SIMULATION_*: a job's default run time and steps, a random failure rate, and kill drills."""

    processing_time_s: float = 5.0
    steps: int = 10
    failure_rate: float = 0.0
    allow_kill: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SimulationSettings:
        e = Env(env)
        return cls(
            processing_time_s=e.float("WORKER_SIMULATION_PROCESSING_TIME", 5.0, 0, 86400),
            steps=e.int("WORKER_SIMULATION_STEPS", 10, 0, MAX_STEPS),
            failure_rate=e.float("WORKER_SIMULATION_FAILURE_RATE", 0.0, 0, 1),
            allow_kill=e.bool("WORKER_SIMULATION_ALLOW_KILL", False),
        )


class SimulationConnector(Connector):
    name = "simulation"
    settings_type = SimulationSettings

    def __init__(self, settings: SimulationSettings):
        self.settings = settings

    @classmethod
    def check_payload(cls, payload: dict[str, Any]) -> None:
        payload_number(payload, "duration", f"milliseconds above 0, at most {MAX_DURATION_S * 1000}",
                       hi=MAX_DURATION_S * 1000)
        payload_number(payload, "simulation_time", f"seconds above 0, at most {MAX_DURATION_S}", hi=MAX_DURATION_S)
        payload_number(payload, "steps", f"an integer from 1 to {MAX_STEPS}", integer=True, hi=MAX_STEPS)
        if not isinstance(payload.get("fail"), bool):
            payload_number(payload, "fail", "true, false, or how many attempts fail (an integer from 0)",
                           integer=True, lo_open=False)
        for name in ("fail_retryable", "kill_worker"):
            value = payload.get(name)
            if value is not None and not isinstance(value, bool):
                raise ValidationError(f"payload.{name}", f"expected true or false, got {value!r}")

    @classmethod
    def payload_schema(cls) -> dict[str, Any]:
        def number(what: str, **bounds: Any) -> dict[str, Any]:
            return {"type": ["number", "null"], "exclusiveMinimum": 0, **bounds, "description": what}

        return {"type": "object", "properties": {
            "duration": number("run time in milliseconds (as the guide's curl)", maximum=MAX_DURATION_S * 1000),
            "simulation_time": number("run time in seconds (as the monitor sends)", maximum=MAX_DURATION_S),
            "steps": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_STEPS,
                      "description": "progress steps"},
            "fail": {"anyOf": [{"type": ["boolean", "null"]}, {"type": "integer", "minimum": 0}],
                     "description": "true: every attempt fails; n: the first n attempts fail"},
            "fail_retryable": {"type": ["boolean", "null"], "description": "false: the failure is final"},
            "kill_worker": {"type": ["boolean", "null"],
                            "description": "true: each attempt kills its worker (WORKER_SIMULATION_ALLOW_KILL)"},
        }}

    def models(self) -> list[str]:
        return list(MODELS)

    def _plan(self, payload: dict[str, Any]) -> tuple[float, int]:
        duration_s = self.settings.processing_time_s
        if _number(payload.get("duration")) is not None:
            duration_s = float(payload["duration"]) / 1000
        elif _number(payload.get("simulation_time")) is not None:
            duration_s = float(payload["simulation_time"])
        steps = self.settings.steps
        if _number(payload.get("steps")) is not None:
            steps = int(payload["steps"])
        return max(0.0, min(duration_s, float(MAX_DURATION_S))), max(0, min(steps, MAX_STEPS))

    def run(self, job: JobContext) -> Any:
        duration_s, steps = self._plan(job.payload)
        self._maybe_fail(job)
        started = time.monotonic()
        job.progress(0, "Starting simulation", 0, steps)
        if job.payload.get("kill_worker") is True:
            if not self.settings.allow_kill:
                raise ConnectorError("payload.kill_worker: this worker does not allow it "
                                     "(WORKER_SIMULATION_ALLOW_KILL)", retryable=False)
            os.kill(os.getpid(), signal.SIGKILL)
        for step in range(1, steps + 1):
            job.sleep(duration_s / steps)
            job.progress(step * 100 / steps, f"Processing step {step}/{steps}", step, steps)
        if steps == 0 and duration_s:
            job.sleep(duration_s)
        elapsed_ms = round((time.monotonic() - started) * 1000)
        return {
            "message": "Simulation completed",
            "steps_completed": steps,
            "processing_time_ms": elapsed_ms,
            "job_payload": job.payload,
            "simulation_id": f"sim_{int(time.time() * 1000)}",
            "results": {"iterations": steps, "final_value": round(random.uniform(0, 100), 3),
                        "convergence": True},
            "service_metadata": {"model_used": "simulation-model-v1",
                                 "processing_stats": {"total_steps": steps,
                                                      "step_duration_ms": round(duration_s * 1000 / max(steps, 1))}},
        }

    def _maybe_fail(self, job: JobContext) -> None:
        fail = job.payload.get("fail")
        retryable = job.payload.get("fail_retryable", True) is not False
        attempt = int(job.attempt)
        fail_at = _number(fail)
        if fail is True or (fail_at is not None and attempt <= int(fail_at)):
            raise ConnectorError(f"Simulated failure on attempt {attempt}", retryable=retryable)
        if self.settings.failure_rate and random.random() < self.settings.failure_rate:
            raise ConnectorError("Simulated random failure (WORKER_SIMULATION_FAILURE_RATE)")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
