"""The small interface every connector implements, and what a running job offers it.

Connectors live in the top-level `connectors` package and are found by name through the
`appliance.connectors` entry-point group (setup.cfg), never by a dotted path taken from the queue. A connector
offers the service of its own name, and the API checks a job's payload at submit with the `check_payload` of
the connector named like the job's service; so a connector module must import cheaply (nothing heavy at import
time: the API loads it).
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar

import gevent.event

from appliance.errors import ValidationError
from appliance.settings import SettingsError

log = logging.getLogger(__name__)


class ConnectorError(Exception):
    """A job failed inside a connector. `retryable=False` ends it at once (e.g. invalid input)."""

    def __init__(self, message: str, *, retryable: bool = True, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.details = details or {}


class ServiceUnavailable(ConnectorError):
    """The backing service cannot be reached (connection refused, its socket gone with no way back): not the
    job's fault. The worker hands the job back without counting a retry, and the connector reports itself
    unhealthy until its health check passes again."""


class JobContext:
    """One attempt at one job, as a connector sees it."""

    def __init__(self, fields: dict[str, str], payload: dict[str, Any], requirements: dict[str, Any],
                 report: Callable[[int, str, int | str, int | str], None],
                 annotate: Callable[[dict[str, str], str], None] | None = None):
        self.fields = fields
        self.id = fields["id"]
        self.attempt = fields["attempt"]
        self.service = fields["service_required"]
        self.payload = payload
        self.requirements = requirements
        self.stop_reason = ""
        self.stopped = gevent.event.Event()
        self._report = report
        self._annotate = annotate

    def annotate(self, fields: dict[str, str], event: str = "") -> None:
        """Record fields of this attempt on the job (named `<service>_...`, e.g. `comfyui_prompt_id`), and with
        `event`, emit that event on the job's stream. Refused once the attempt no longer holds the job; never
        raises (a failed write is logged by the worker)."""
        if self._annotate is not None:
            self._annotate(fields, event)

    def progress(self, percent: float, message: str = "", step: int | str = "", total: int | str = "") -> None:
        """Report progress (0-100). Never raises: a failed write is logged by the worker."""
        self._report(max(0, min(100, round(percent))), message, step, total)

    def stop(self, reason: str) -> None:
        """Ask the attempt to stop (cancel, timeout, lost lease, shutdown); the first reason wins."""
        if not self.stop_reason:
            self.stop_reason = reason
        self.stopped.set()

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake early and raise `JobStopped` if the job is told to stop."""
        if self.stopped.wait(seconds):
            raise JobStopped(self.stop_reason)


class JobStopped(Exception):
    """Raised inside a connector when the job was told to stop."""


class Connector(ABC):
    """Runs jobs of some services. Subclasses parse their own WORKER_<NAME>_* settings in __init__."""

    name: ClassVar[str]

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    @classmethod
    def check_payload(cls, payload: dict[str, Any]) -> None:
        """Refuse, at submit, a payload this connector could not run (the API calls it without an instance).

        Raises:
            ValidationError: naming the field as `payload.<key>` and what is expected.
        """

    @classmethod
    def payload_schema(cls) -> dict[str, Any]:
        """The JSON Schema of the payload `check_payload` accepts, for the API's OpenAPI document (keep them
        together: tests/test_openapi.py checks each bound it declares against the API)."""
        return {"type": "object"}

    @property
    def services(self) -> tuple[str, ...]:
        return (self.name,)

    def start(self) -> None:
        """Connect to the backing service, if any. Raise to refuse loading."""

    def stop(self) -> None:
        """Release what `start` took."""

    def healthy(self) -> bool:
        return True

    def health_error(self) -> str:
        """Why `healthy()` is False (its latest health check's error), shown on the jobs that wait for it."""
        return ""

    def models(self) -> list[str]:
        return []

    def health_info(self) -> dict[str, Any]:
        """The backing service's state for the worker's record (`services_health`): at least `ok` and `error`."""
        return {"ok": self.healthy(), "error": self.health_error()}

    @abstractmethod
    def run(self, job: JobContext) -> Any:
        """Run one job and return its result (JSON-serialisable). Raise ConnectorError on failure."""

    def cancel(self, job: JobContext) -> None:
        """Stop a running job in the backing service (called on cancel and timeout, before a hard stop)."""


def connector_entry_points(names: tuple[str, ...]) -> dict[str, EntryPoint]:
    """The installed connectors named in WORKER_CONNECTORS, not loaded; an unknown name is a settings error."""
    available = {ep.name: ep for ep in entry_points(group="appliance.connectors")}
    for name in names:
        if name not in available:
            known = ", ".join(sorted(available)) or "none installed"
            raise SettingsError(f"WORKER_CONNECTORS: unknown connector {name!r} (available: {known})")
    return {name: available[name] for name in names}


def load_connectors(names: tuple[str, ...], env: Mapping[str, str]) -> dict[str, Connector]:
    """Instantiate the connectors named in WORKER_CONNECTORS; an unknown name is a settings error."""
    return {name: ep.load()(env) for name, ep in connector_entry_points(names).items()}


@functools.cache
def _payload_check(service: str) -> Callable[[dict[str, Any]], None] | None:
    """The check_payload of the installed connector named `service` (loaded once per process), if any."""
    found = entry_points(group="appliance.connectors", name=service)
    if not found:
        return None
    cls = next(iter(found)).load()
    return cls.check_payload if isinstance(cls, type) and issubclass(cls, Connector) else None


def check_payload(service: str, payload: dict[str, Any]) -> None:
    """Check a job's payload for its service's connector; a service no installed connector is named after (one
    served by another appliance's workers, say) is not checked here.

    Raises:
        ValidationError: naming `payload.<key>`.
    """
    check = _payload_check(service)
    if check is not None:
        check(payload)


def payload_number(payload: dict[str, Any], name: str, what: str, *, integer: bool = False,
                   lo: float = 0, lo_open: bool = True, hi: float | None = None) -> float | None:
    """`payload[name]` as a number checked against its bounds, or None when absent (for check_payload).

    Raises:
        ValidationError: naming `payload.<name>`, with `what` saying what is expected.
    """
    value = payload.get(name)
    if value is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok and integer and isinstance(value, float):
        ok = value.is_integer()
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
    if not ok:
        raise ValidationError(f"payload.{name}", f"expected {what}, got {value!r}")
    return float(value)
