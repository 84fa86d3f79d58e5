"""Background recovery in each API process: jobs whose worker died are put back even when every live
worker is busy (workers also do this; whoever comes first does it, atomically)."""

from __future__ import annotations

import logging

import gevent
import redis

from appliance.queue import Queue

log = logging.getLogger(__name__)


class Janitor:
    def __init__(self, queue: Queue, interval_s: float = 2.0):
        self.queue = queue
        self.interval_s = interval_s
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._loop)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None

    def _loop(self) -> None:
        while True:
            gevent.sleep(self.interval_s)
            try:
                recovery = self.queue.scripts.recover()
            except redis.RedisError as exc:
                log.debug("recovery skipped, Redis unavailable: %s", exc)
                continue
            if recovery.jobs or recovery.dead_workers:
                log.warning("recovered %d jobs with expired leases; workers gone: %s", recovery.jobs,
                            ",".join(recovery.dead_workers) or "none")
