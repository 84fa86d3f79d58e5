"""Background upkeep in each API process: jobs whose worker died are put back even when every live worker is
busy (workers also do this; whoever comes first does it, atomically), expired jobs leave the indexes,
requirement classes left idle and empty are forgotten, and the jobs of services no worker offers any more become
`unworkable` (and go back in line when one does)."""

from __future__ import annotations

import logging

from appliance.api.periodic import Periodic
from appliance.queue import Queue

log = logging.getLogger(__name__)


class Janitor(Periodic):
    name = "lease recovery"

    def __init__(self, queue: Queue, interval_s: float = 2.0):
        super().__init__(interval_s)
        self.queue = queue

    def tick(self, n: int) -> None:
        self.queue.scripts.prune()  # finished jobs whose retention ran out leave the indexes even if nobody lists
        self.queue.classes.forget_idle()
        self.queue.classes.sweep_services()
        recovery = self.queue.scripts.recover()
        if recovery.jobs or recovery.dead_workers:
            log.warning("recovered %d jobs with expired leases; workers gone: %s", recovery.jobs,
                        ",".join(recovery.dead_workers) or "none")
