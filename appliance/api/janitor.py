"""Background upkeep in each API process: jobs whose worker died are put back even when every live worker is
busy (workers also do this; whoever comes first does it, atomically), expired jobs leave the indexes,
requirement classes left idle and empty are forgotten, and the jobs of services no worker offers any more become
`unworkable` (and go back in line when one does)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from appliance.api.periodic import Periodic
from appliance.queue import Queue
from appliance.retry import is_outage

log = logging.getLogger(__name__)
PRUNE_SUBMITTED_TICKS = 150  # every 5 minutes at the default interval


class Janitor(Periodic):
    name = "lease recovery"

    def __init__(self, queue: Queue, interval_s: float = 2.0):
        super().__init__(interval_s)
        self.queue = queue

    def tick(self, n: int) -> None:
        # each chore on its own: one that fails (a job it cannot handle) must not keep the others from running
        self.chore("prune", self.queue.scripts.prune)  # expired jobs leave the indexes even if nobody lists
        self.chore("forget idle classes", self.queue.classes.forget_idle)
        self.chore("sweep services", self.queue.classes.sweep_services)
        if n % PRUNE_SUBMITTED_TICKS == 0:
            self.chore("prune submitted", self.queue.prune_submitted)  # API keys' listings lose expired jobs
        self.chore("recover leases", self.recover)

    def chore(self, what: str, run: Callable[[], object]) -> None:
        try:
            run()
        except redis.RedisError as exc:
            if is_outage(exc):
                raise                   # Redis is away: the whole tick is skipped (Periodic)
            self.note_error(exc)        # a script failing (a key of the wrong type): the other chores go on
            log.exception("janitor: %s failed; the other chores go on", what)
        except Exception as exc:
            self.note_error(exc)
            log.exception("janitor: %s failed; the other chores go on", what)

    def recover(self) -> None:
        recovery = self.queue.scripts.recover()
        if recovery.jobs or recovery.dead_workers:
            log.warning("recovered %d jobs with expired leases; workers gone: %s", recovery.jobs,
                        ",".join(recovery.dead_workers) or "none")
