"""What a drill's users share with its runner: the target, the ledger of accepted jobs, live job ids.

The runner puts one `Drill` on the locust Environment (`environment.drill`); users record every job the API
accepted (201 with a job id) in its ledger, which the audit then checks against Redis.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Accepted:
    job_id: str
    submitted_at: float  # epoch seconds, just before the request was sent
    priority: int


@dataclass
class Drill:
    """One drill run: target URL, ledger, and jobs that subscribers may follow (fanout)."""

    scenario: str
    host: str
    job_ms: tuple[int, int] = (100, 500)   # simulated job duration range (ms)
    steps: int = 4
    ledger: list[Accepted] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    live_jobs: deque[str] = field(default_factory=lambda: deque(maxlen=64))
    sequence: int = 0

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.host)
        return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def ws_url(self) -> str:
        host, port = self.host_port
        return f"ws://{host}:{port}/"

    def next_number(self) -> int:
        self.sequence += 1
        return self.sequence

    def job_body(self, priority: int | None = None, **payload: Any) -> dict[str, Any]:
        """A simulation job as the guide's curl sends it, with a short duration so drills drain."""
        lo, hi = self.job_ms
        body_payload = {"job": self.next_number(), "duration": random.randint(lo, hi), "steps": self.steps}
        body_payload.update(payload)
        return {"service_required": "simulation", "priority": 50 if priority is None else priority,
                "payload": body_payload}

    def accept(self, job_id: str, submitted_at: float, priority: int) -> None:
        self.ledger.append(Accepted(job_id, submitted_at, priority))

    def job_ids(self) -> list[str]:
        return [a.job_id for a in self.ledger]


def now_ms() -> float:
    return time.time() * 1000
