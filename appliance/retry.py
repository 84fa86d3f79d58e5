"""Retries, in one place: which Redis errors are outages, and how long a failed job waits for its next attempt.

Only outages are waited out: Redis cannot be reached or did not answer in time, is loading its data, is a
read-only replica or lost its primary, cannot persist (MISCONF), or is full (OOM). Any other error (a script that
fails, a key of the wrong type, a refused password) is a bug or a misconfiguration: callers let it end the process,
so that its supervisor restarts it and the log says why.

A job whose attempt failed (its connector failed, it timed out, or its worker was lost) waits along one curve,
computed by the scripts (`backoff_ms` in appliance/lua/_lib.lua): between half and all of
min(JOB_RETRY_MAX_MS, JOB_RETRY_BASE_MS * 2**retries), where `retries` counts the retries it already had.
`Backoff` hands the scripts those parameters and the jitter, a random fraction drawn here so that the scripts
themselves stay deterministic (Redis 6.2 replicates scripts whole).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from redis.exceptions import AuthenticationError, OutOfMemoryError, ReadOnlyError, ResponseError, TryAgainError

# Error codes that mean "Redis cannot take this now". Inside a script Redis 7 keeps the code; Redis 6.2 wraps it
# ("Error running script (call to f_…): @user_script:12: -OOM command not allowed …").
OUTAGE_CODES = ("LOADING", "READONLY", "MASTERDOWN", "MISCONF", "OOM", "TRYAGAIN")
WAIT_FIRST_S = 0.1
# A worker told to stop drains for WORKER_DRAIN_SECONDS, and holds the outcomes that wait for Redis until this
# much later (less the time it keeps to exit): supervisord's stopwaitsecs for workers is drain + STOP_MARGIN_S,
# so a worker delivers what it can and exits before supervisord would SIGKILL it.
STOP_MARGIN_S = 15
# A worker that ends on an error that is not an outage waits this long before it exits, so that supervisord
# counts it as started (startsecs) and keeps starting it again, a few seconds apart, until the cause is fixed.
ERROR_PAUSE_S = 5.0


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` is Redis being away or full (wait and try again) rather than a bug (let it end the process)."""
    if isinstance(exc, AuthenticationError):   # a ConnectionError to redis-py, but a wrong setting, not an outage
        return False
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, ReadOnlyError, OutOfMemoryError,
                        TryAgainError)):     # BusyLoadingError (LOADING) is a ConnectionError
        return True
    if not isinstance(exc, ResponseError):
        return False
    text = str(exc)
    return text.split(" ", 1)[0] in OUTAGE_CODES or any(f"-{code} " in text for code in OUTAGE_CODES)


def outage_waits(cap_s: float) -> Iterator[float]:
    """Seconds to wait before each new try while Redis is away: from WAIT_FIRST_S, doubling up to `cap_s`."""
    wait = min(WAIT_FIRST_S, cap_s)
    while True:
        yield wait
        wait = min(wait * 2, cap_s)


@dataclass(frozen=True)
class Backoff:
    """The parameters of the retry curve (JOB_RETRY_BASE_MS, JOB_RETRY_MAX_MS) as the scripts take them."""

    base_ms: int
    max_ms: int

    @classmethod
    def fixed(cls, delay_ms: int) -> Backoff:
        """A curve that is `delay_ms` for every retry (with `jitter=1.0`): for tools and tests that need an exact
        due time."""
        return cls(max(0, delay_ms), max(0, delay_ms))

    def script_args(self, jitter: float | None = None) -> list[int | float]:
        """ARGV for the scripts: base (ms), max (ms), and the jitter, a fraction in [0, 1] (random by default)."""
        return [self.base_ms, self.max_ms, random.random() if jitter is None else jitter]
