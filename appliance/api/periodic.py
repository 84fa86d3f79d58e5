"""A background task of an API process: `tick()` every `interval_s` in one greenlet, surviving Redis outages."""

from __future__ import annotations

import logging

import gevent
import redis

from appliance.api.tasks import TaskState
from appliance.retry import is_outage

log = logging.getLogger(__name__)


class Periodic(TaskState):
    """Subclasses implement `tick(n)`; a Redis outage (appliance.retry.is_outage) skips that tick quietly, any
    other error is logged and noted (the task's health), and the next tick comes as usual."""

    name = "periodic task"

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        if self._greenlet is None:
            self.spawn(self._loop)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None

    def tick(self, n: int) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        n = 0
        while True:
            gevent.sleep(self.interval_s)
            n += 1
            try:
                self.tick(n)
            except redis.RedisError as exc:
                if is_outage(exc):
                    log.debug("%s skipped, Redis unavailable: %s", self.name, exc)
                else:  # a script failing, a key of the wrong type: not an outage, so it is seen
                    self.note_error(exc)
                    log.exception("%s failed", self.name)
            except Exception as exc:
                self.note_error(exc)
                log.exception("%s failed", self.name)
