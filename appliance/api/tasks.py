"""The background tasks of an API process (the stream reader, the janitor, the statistics ticker, the
connection counts), their health, and the watchdog that restarts a process with a dead one.

Each task survives an error in one message or job: it logs it, notes it (`last_error`) and goes on. A task whose
greenlet still ends (a bug nothing caught) leaves the process half-alive: live progress stops while HTTP still
answers. `/health` then answers 503 naming it, and the watchdog logs it and stops the process gracefully
(SIGTERM to itself: gunicorn's worker closes its connections and exits, and the arbiter starts a fresh one).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

import gevent

from appliance import clock

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0


class TaskState:
    """What a background task reports: its name, whether its greenlet runs, and its latest error."""

    name = "background task"

    _greenlet: gevent.Greenlet | None = None
    last_error: str | None = None
    last_error_at: str | None = None
    errors = 0

    def note_error(self, exc: BaseException) -> None:
        """Record an error the task survived (it is logged by the caller)."""
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
        self.last_error_at = clock.iso(clock.now_ms())

    def spawn(self, run: Callable[[], Any]) -> gevent.Greenlet:
        """Run the task's loop in its greenlet; an exception that ends it is noted as its last error."""
        greenlet = gevent.spawn(run)
        greenlet.link_exception(lambda done: self.note_error(done.exception or RuntimeError("died")))
        self._greenlet = greenlet
        return greenlet

    @property
    def started(self) -> bool:
        return self._greenlet is not None

    def alive(self) -> bool:
        return self._greenlet is not None and not self._greenlet.dead

    def health(self) -> dict[str, Any]:
        report: dict[str, Any] = {"name": self.name, "alive": self.alive(), "errors": self.errors}
        if self.last_error is not None:  # empty fields are left out, as everywhere on the wire
            report.update(last_error=self.last_error, last_error_at=self.last_error_at)
        return report


def stop_process(reason: str) -> None:
    """The default action on a dead task: a graceful stop of this process, for its supervisor to replace."""
    log.error("api: stopping this process so that it is replaced: %s", reason)
    os.kill(os.getpid(), signal.SIGTERM)


class Tasks:
    """The background tasks of one API process."""

    def __init__(self) -> None:
        self.tasks: list[TaskState] = []
        self._watcher: gevent.Greenlet | None = None

    def add(self, task: TaskState) -> None:
        self.tasks.append(task)

    def dead(self) -> list[TaskState]:
        """Tasks that were started and whose greenlet has ended (a stopped task is not started)."""
        return [task for task in self.tasks if task.started and not task.alive()]

    def report(self) -> list[dict[str, Any]]:
        return [task.health() for task in self.tasks]

    def watch(self, on_dead: Callable[[str], None] = stop_process, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Check the tasks every `interval_s`; the first time one is dead, call `on_dead` with why (once)."""
        if self._watcher is None:
            self._watcher = gevent.spawn(self._watch, on_dead, interval_s)

    def unwatch(self) -> None:
        if self._watcher is not None:
            self._watcher.kill(block=False)
            self._watcher = None

    def _watch(self, on_dead: Callable[[str], None], interval_s: float) -> None:
        while True:
            gevent.sleep(interval_s)
            dead = self.dead()
            if dead:
                reason = "; ".join(f"background task {task.name!r} died ({task.last_error or 'no error noted'})"
                                   for task in dead)
                log.error("api: %s", reason)
                try:
                    on_dead(reason)
                except Exception:
                    log.exception("api: acting on a dead background task failed")
                return
