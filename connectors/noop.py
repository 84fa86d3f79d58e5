"""The `noop` service: finishes at once with an echo of the payload (benchmarks, smoke checks)."""

from __future__ import annotations

from typing import Any

from appliance.connector import Connector, JobContext


class NoopConnector(Connector):
    name = "noop"

    def run(self, job: JobContext) -> Any:
        return {"ok": True, "job_payload": job.payload}
