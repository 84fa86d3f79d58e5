"""Case 4 of the benchmark: SSE and WebSocket progress fan-out, through the `fanout` drill.

Runs `python -m loadtest.runner fanout` (locust patches its own process, not the benchmark's) with its own
private appliance, and reads the delivery latency and counts from the drill's summary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtest.private import HOME


def run(work: Path, subscribers: int, duration_s: float = 30) -> dict[str, Any]:
    summary_path = work / "fanout-summary.json"
    cmd = [sys.executable, "-m", "loadtest.runner", "fanout", "--users", str(subscribers + 1), "--spawn-rate",
           str(max(50, subscribers // 5)), "--duration", str(duration_s), "--run-dir", str(work / "fanout"),
           "--json", str(summary_path)]
    proc = subprocess.run(cmd, cwd=HOME, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=duration_s + 240)
    if not summary_path.exists():
        return {"skipped": f"the fanout drill failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"}
    summary = json.loads(summary_path.read_text())
    out: dict[str, Any] = {"audit_ok": summary["audit"]["ok"], "duration_s": duration_s,
                           "errors": summary["errors"]}
    for kind in ("SSE", "WS"):
        delivered = summary["latency_ms"].get(f"progress delivery {kind}")
        connect = summary["latency_ms"].get(f"{kind} connect")
        if delivered:
            out[kind.lower()] = {"subscribers": subscribers // 2, "latency_ms": delivered,
                                 "delivered": delivered["count"], "connect_ms": connect}
    return out
