"""Domain errors shared by the queue, the worker and the API (the API maps them to HTTP in one place)."""

from __future__ import annotations


class ApplianceError(Exception):
    """Base class of the appliance's own errors."""


class ValidationError(ApplianceError):
    """Input that the appliance refuses; `field` names what was wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class JobNotFound(ApplianceError):
    def __init__(self, job_id: str):
        super().__init__(f"Job not found: {job_id}")
        self.job_id = job_id


class JobExists(ApplianceError):
    def __init__(self, job_id: str):
        super().__init__(f"A job with id {job_id} already exists")
        self.job_id = job_id


class JobFinished(ApplianceError):
    """The job already reached a terminal status."""

    def __init__(self, job_id: str, status: str):
        super().__init__(f"Job {job_id} already finished with status {status}")
        self.job_id = job_id
        self.status = status


class JobLost(ApplianceError):
    """The worker no longer holds the job (its lease ran out and the job moved on): the write is refused."""

    def __init__(self, job_id: str, worker_id: str):
        super().__init__(f"Worker {worker_id} no longer holds job {job_id}; its update was refused")
        self.job_id = job_id
        self.worker_id = worker_id


class Overloaded(ApplianceError):
    """A limit that frees up with time (a rate, a capacity) refuses the request: retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int, status: int = 503):
        super().__init__(message)
        self.message = message
        self.retry_after_s = max(1, retry_after_s)
        self.status = status


ECHO_CHARS = 64  # error messages quote at most this much of what a client sent


def shown(value: object, limit: int = ECHO_CHARS) -> str:
    """`value` as an error message may quote it: its repr, cut to `limit` characters with what was left out
    counted, so a hostile input is never echoed back whole."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"
