"""The resilience drill's disruptions, on a schedule, through supervisord's XML-RPC (RUN/supervisor.sock).

Over the drill: workers killed with SIGKILL (supervisord's autorestart brings each back; we wait for the new
pid), the whole `workers` group restarted the way `supervisorctl restart workers:*` does it (stop with
drain, then start), and one restart of the embedded Redis (down for REDIS_DOWN_S).
"""

from __future__ import annotations

import os
import random
import signal
import time
import xmlrpc.client
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent

from loadtest.private import supervisor_rpc

RESTART_WAIT_S = 30.0
REDIS_DOWN_S = 2.0       # how long Redis stays down: longer than the clients' retries hide


@dataclass
class ChaosLog:
    counts: Counter[str] = field(default_factory=Counter)
    events: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def note(self, action: str, **details: Any) -> None:
        self.counts[action] += 1
        self.events.append({"at": time.time(), "action": action, **details})


def plan(duration_s: float) -> list[tuple[float, str]]:
    """When (seconds after start) to do what: kills, group restarts, and one Redis restart mid-way."""
    steps = ["kill", "group_restart", "kill", "redis_restart", "kill", "group_restart", "kill"]
    gap = duration_s / (len(steps) + 1)
    return [(gap * (n + 1), action) for n, action in enumerate(steps)]


class Chaos:
    """Runs `plan(duration_s)` in a greenlet against the supervisord at `socket_path`."""

    def __init__(self, socket_path: Path, duration_s: float, say: Callable[[str], None],
                 redis_program: str | None = "redis"):
        self.socket_path = socket_path
        self.duration_s = duration_s
        self.say = say
        self.redis_program = redis_program
        self.log = ChaosLog()
        self.greenlet: gevent.Greenlet | None = None

    def rpc(self) -> Any:
        return supervisor_rpc(self.socket_path)

    def start(self) -> None:
        self.greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.join(RESTART_WAIT_S * 2)
            self.greenlet.kill(block=True, timeout=5)

    def _run(self) -> None:
        started = time.monotonic()
        for at, action in plan(self.duration_s):
            gevent.sleep(max(0.0, started + at - time.monotonic()))
            try:
                getattr(self, action)()
            except Exception as exc:  # a drill step that fails is reported, the drill goes on
                self.log.errors.append(f"{action}: {type(exc).__name__}: {exc}")
                self.say(f"chaos: {action} failed: {exc}")

    def _workers(self) -> list[dict[str, Any]]:
        return [i for i in self.rpc().getAllProcessInfo() if i["group"] == "workers"]

    def kill(self) -> None:
        running = [i for i in self._workers() if i["statename"] == "RUNNING" and i["pid"]]
        if not running:
            self.say("chaos: no running worker to kill")
            return
        victim = random.choice(running)
        name = f"workers:{victim['name']}"
        os.kill(int(victim["pid"]), signal.SIGKILL)
        self.log.note("kill", program=name, pid=victim["pid"])
        self.say(f"chaos: SIGKILL {name} (pid {victim['pid']})")
        deadline = time.monotonic() + RESTART_WAIT_S
        while time.monotonic() < deadline:
            gevent.sleep(0.2)
            info = self.rpc().getProcessInfo(name)
            if info["statename"] == "RUNNING" and info["pid"] and info["pid"] != victim["pid"]:
                self.log.note("restart", program=name, pid=info["pid"])
                self.say(f"chaos: {name} back as pid {info['pid']}")
                return
            if info["statename"] in ("FATAL", "EXITED", "STOPPED"):
                try:
                    self.rpc().startProcess(name, False)
                except xmlrpc.client.Fault as exc:  # it may have started meanwhile
                    self.say(f"chaos: start {name}: {exc.faultString}")
        self.log.errors.append(f"{name} did not come back within {RESTART_WAIT_S:.0f}s after SIGKILL")

    def group_restart(self) -> None:
        self.say("chaos: restarting the workers group (stop with drain, then start)")
        began = time.monotonic()
        rpc = self.rpc()
        rpc.stopProcessGroup("workers", True)
        rpc.startProcessGroup("workers", True)
        self.log.note("group_restart", seconds=round(time.monotonic() - began, 2))
        self.say(f"chaos: workers group restarted in {time.monotonic() - began:.1f}s")

    def redis_restart(self) -> None:
        if not self.redis_program:
            return
        rpc = self.rpc()
        info = rpc.getProcessInfo(self.redis_program)
        if info["statename"] != "RUNNING":
            self.say("chaos: Redis is not supervisord's (external Redis): no Redis restart")
            return
        self.say(f"chaos: restarting Redis ({REDIS_DOWN_S:g}s down)")
        began = time.monotonic()
        rpc.stopProcess(self.redis_program, True)
        gevent.sleep(REDIS_DOWN_S)
        rpc.startProcess(self.redis_program, True)
        self.log.note("redis_restart", seconds=round(time.monotonic() - began, 2))
        self.say(f"chaos: Redis restarted in {time.monotonic() - began:.1f}s")
