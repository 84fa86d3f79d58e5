"""The small interface every connector implements, and what a running job offers it.

Connectors live in the top-level `connectors` package and are found by name through the
`appliance.connectors` entry-point group (setup.cfg), never by a dotted path taken from the queue. A connector
offers the service of its own name, and the API checks a job's payload at submit with the `check_payload` of
the connector named like the job's service; so a connector module must import cheaply (nothing heavy at import
time: the API loads it).

A connector's own settings (WORKER_<NAME>_*) are a frozen dataclass with a `from_env(env)` classmethod, named by
its `settings_type`; `connector_settings` parses them at the worker's entry point (and in `bin/appliance
start`'s check) and `load_connectors` hands each connector its parsed object. A connector never reads the
environment and opens no Redis connection of its own: it stores what a job produced through its `JobContext`.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar

import gevent.event

from appliance.errors import ValidationError
from appliance.outputs import OutputFile, OutputStore, output_url, preview_url, safe_name
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
                 annotate: Callable[[dict[str, str], str], None] | None = None,
                 outputs: OutputStore | None = None):
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
        self._outputs = outputs

    def annotate(self, fields: dict[str, str], event: str = "") -> None:
        """Record fields of this attempt on the job (named `<service>_...`, e.g. `comfyui_prompt_id`), and with
        `event`, emit that event on the job's stream. Refused once the attempt no longer holds the job; never
        raises (a failed write is logged by the worker)."""
        if self._annotate is not None:
            self._annotate(fields, event)

    def store_output(self, name: str, data: bytes, content_type: str, node: str = "") -> str:
        """Store a file this job produced, for clients to download from the API; returns its URL path
        (`/api/jobs/{id}/outputs/{name}`). Kept for JOB_COMPLETED_TTL_SECONDS from now; a file of the same name
        is replaced. Raises ValueError for a name that is not `safe_name(name)`, and redis.RedisError when
        Redis fails (the attempt then fails like any connector error)."""
        if name != safe_name(name):
            raise ValueError(f"output name {name!r} is not URL-safe: use appliance.outputs.safe_name")
        self._store().put(self.id, [OutputFile(name, content_type, data, node)])
        return output_url(self.id, name)

    def store_preview(self, data: bytes, content_type: str, node: str = "") -> str:
        """Store the job's latest preview image, replacing the one before; returns its URL path
        (`/api/jobs/{id}/preview`). Raises redis.RedisError when Redis fails."""
        self._store().put_preview(self.id, data, content_type, node)
        return preview_url(self.id)

    def _store(self) -> OutputStore:
        if self._outputs is None:
            raise RuntimeError("this job context has no output store (the worker gives one to every attempt)")
        return self._outputs

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


@dataclass(frozen=True)
class NoSettings:
    """The settings of a connector that has none."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NoSettings:
        return cls()


class Connector(ABC):
    """Runs jobs of some services. A subclass with settings of its own names their dataclass in `settings_type`
    and takes an instance of it in `__init__`."""

    name: ClassVar[str]
    settings_type: ClassVar[type[Any]] = NoSettings  # a frozen dataclass with a `from_env(env)` classmethod

    def __init__(self, settings: NoSettings | None = None) -> None:
        """`settings`: this connector's `settings_type`, parsed at the worker's entry point."""

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


def connector_settings(names: tuple[str, ...], env: Mapping[str, str]) -> dict[str, Any]:
    """The settings of each connector named in WORKER_CONNECTORS (its `settings_type.from_env`), parsed once at
    the worker's entry point and in `bin/appliance start`'s check.

    Raises:
        SettingsError: an unknown connector, or a bad WORKER_<NAME>_* value (naming the variable).
    """
    return {name: _connector_class(name, ep).settings_type.from_env(env)
            for name, ep in connector_entry_points(names).items()}


def load_connectors(settings: Mapping[str, Any]) -> dict[str, Connector]:
    """Instantiate each named connector with its settings (from `connector_settings`)."""
    points = connector_entry_points(tuple(settings))
    return {name: _connector_class(name, points[name])(each) for name, each in settings.items()}


def _connector_class(name: str, ep: EntryPoint) -> type[Connector]:
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Connector)):
        raise SettingsError(f"WORKER_CONNECTORS: {name!r} ({ep.value}) is not a Connector")
    return cls


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
