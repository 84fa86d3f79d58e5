"""Typed, frozen settings parsed once from the environment at each entry point.

No other module reads `os.environ`. A bad value raises `SettingsError` whose message names the variable,
the value and what was expected; entry points print it as one line and exit 2.
"""

from __future__ import annotations

import builtins
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # no ":": it separates key parts


class SettingsError(ValueError):
    """A setting has a value the appliance cannot use."""


class Env:
    """Reads typed values from an environment mapping, naming the variable in every error."""

    def __init__(self, env: Mapping[builtins.str, builtins.str]):
        self._env = env

    def raw(self, name: builtins.str) -> builtins.str | None:
        value = self._env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def str(self, name: builtins.str, default: builtins.str, *fallbacks: builtins.str) -> builtins.str:
        for key in (name, *fallbacks):
            value = self.raw(key)
            if value is not None:
                return value
        return default

    def int(self, name: builtins.str, default: builtins.int, lo: builtins.int, hi: builtins.int) -> builtins.int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise SettingsError(f"{name}={value!r}: expected an integer from {lo} to {hi}") from None
        if not lo <= number <= hi:
            raise SettingsError(f"{name}={value!r}: expected an integer from {lo} to {hi}")
        return number

    def float(self, name: builtins.str, default: builtins.float, lo: builtins.float,
              hi: builtins.float) -> builtins.float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(f"{name}={value!r}: expected a number from {lo:g} to {hi:g}") from None
        if not lo <= number <= hi:
            raise SettingsError(f"{name}={value!r}: expected a number from {lo:g} to {hi:g}")
        return number

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={value!r}: expected true or false")

    def list(self, name: builtins.str, default: tuple[builtins.str, ...]) -> tuple[builtins.str, ...]:
        value = self.raw(name)
        if value is None:
            return default
        items = tuple(item.strip() for item in value.split(",") if item.strip())
        if not items:
            raise SettingsError(f"{name}={value!r}: expected a comma-separated list")
        return items

    def choice(self, name: builtins.str, default: builtins.str, choices: tuple[builtins.str, ...]) -> builtins.str:
        value = self.raw(name)
        if value is None:
            return default
        if value.lower() not in choices:
            raise SettingsError(f"{name}={value!r}: expected one of {', '.join(choices)}")
        return value.lower()

    def ident(self, name: builtins.str, default: builtins.str) -> builtins.str:
        value = self.str(name, default)
        if not _ID_RE.match(value):
            raise SettingsError(
                f"{name}={value!r}: expected letters, digits, '_', '.' or '-' (at most 128)"
            )
        return value

    def key_prefix(self, name: builtins.str) -> builtins.str:
        value = self.str(name, "")
        if value and not _PREFIX_RE.match(value):
            raise SettingsError(f"{name}={value!r}: expected letters, digits, '_', '.', ':' or '-' (at most 64), "
                                "e.g. 'app1:'")
        return value

    def redis_url(self, name: builtins.str, *fallbacks: builtins.str) -> builtins.str:
        value = self.str(name, DEFAULT_REDIS_URL, *fallbacks)
        # name the variable the value came from (a worker may read REDIS_URL in place of HUB_REDIS_URL)
        name = next((key for key in (name, *fallbacks) if self.raw(key) is not None), name)
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise SettingsError(f"{name}={redact_url(value)!r}: expected a redis://, rediss:// or unix:// URL")
        if parts.scheme != "unix":
            try:
                _ = parts.port
            except ValueError:
                raise SettingsError(f"{name}={redact_url(value)!r}: the port is not a number") from None
        return value


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{netloc}", parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class QueueSettings:
    """What every process needs to talk to the queue in Redis."""

    redis_url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    key_prefix: str = ""
    progress_maxlen: int = 1000
    events_maxlen: int = 10000
    completed_ttl_s: int = 86400
    failed_ttl_s: int = 7 * 86400
    lease_ms: int = 15000
    retry_base_ms: int = 1000
    retry_max_ms: int = 60000
    log_level: str = "info"

    @property
    def redis_url_redacted(self) -> str:
        return redact_url(self.redis_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *redis_vars: str) -> QueueSettings:
        e = Env(env)
        names = redis_vars or ("REDIS_URL", "HUB_REDIS_URL")
        return cls(
            redis_url=e.redis_url(names[0], *names[1:]),
            key_prefix=e.key_prefix("APPLIANCE_KEY_PREFIX"),
            progress_maxlen=e.int("PROGRESS_STREAM_MAXLEN", 1000, 10, 1_000_000),
            events_maxlen=e.int("EVENTS_STREAM_MAXLEN", 10000, 100, 10_000_000),
            completed_ttl_s=e.int("JOB_COMPLETED_TTL_SECONDS", 86400, 1, 10 * 365 * 86400),
            failed_ttl_s=e.int("JOB_FAILED_TTL_SECONDS", 7 * 86400, 1, 10 * 365 * 86400),
            lease_ms=e.int("WORKER_LEASE_MS", 15000, 1000, 3_600_000),
            retry_base_ms=e.int("JOB_RETRY_BASE_MS", 1000, 0, 3_600_000),
            retry_max_ms=e.int("JOB_RETRY_MAX_MS", 60000, 0, 86_400_000),
            log_level=e.choice("LOG_LEVEL", "info", LOG_LEVELS),
        )


@dataclass(frozen=True)
class ApiSettings:
    """Settings of the HTTP/WebSocket API process."""

    queue: QueueSettings
    port: int = 3001
    bind: str = "0.0.0.0"
    processes: int = 1
    worker_connections: int = 10000
    cors_origins: tuple[str, ...] = ("*",)
    max_body_bytes: int = 10 * 1024 * 1024
    graceful_timeout_s: int = 10
    sse_keepalive_s: float = 15.0
    client_queue_size: int = 1000
    ws_max_message_bytes: int = 1024 * 1024
    ws_ping_interval_s: float = 25.0
    access_log: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApiSettings:
        env = os.environ if env is None else env
        e = Env(env)
        return cls(
            queue=QueueSettings.from_env(env, "REDIS_URL", "HUB_REDIS_URL"),
            port=e.int("API_PORT", 3001, 1, 65535),
            bind=e.str("API_BIND", "0.0.0.0"),
            processes=e.int("API_PROCESSES", 1, 1, 64),
            worker_connections=e.int("API_WORKER_CONNECTIONS", 10000, 10, 1_000_000),
            cors_origins=e.list("CORS_ORIGINS", ("*",)),
            max_body_bytes=e.int("API_MAX_BODY_BYTES", 10 * 1024 * 1024, 1024, 1024**3),
            graceful_timeout_s=e.int("API_GRACEFUL_TIMEOUT_SECONDS", 10, 1, 3600),
            sse_keepalive_s=e.float("API_SSE_KEEPALIVE_SECONDS", 15.0, 0.1, 15.0),
            client_queue_size=e.int("API_CLIENT_QUEUE_SIZE", 1000, 1, 1_000_000),
            ws_max_message_bytes=e.int("API_WS_MAX_MESSAGE_BYTES", 1024 * 1024, 1024, 1024**3),
            ws_ping_interval_s=e.float("API_WS_PING_SECONDS", 25.0, 0.5, 3600),
            access_log=e.bool("API_ACCESS_LOG", False),
        )


@dataclass(frozen=True)
class Hardware:
    """What a worker declares about its hardware (from WORKER_* settings; NVML fills it in later)."""

    gpu_count: int = 0
    gpu_memory_gb: float = 0.0
    gpu_model: str = ""
    cpu_cores: int = 0
    ram_gb: float = 0.0


@dataclass(frozen=True)
class WorkerSettings:
    """Settings of one worker process."""

    queue: QueueSettings
    worker_id: str
    services: tuple[str, ...]
    connectors: tuple[str, ...]
    poll_interval_ms: int = 1000
    heartbeat_interval_ms: int = 10000
    max_concurrent_jobs: int = 1
    job_timeout_minutes: float = 30.0
    drain_seconds: int = 30
    hardware: Hardware = Hardware()
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def heartbeat_ttl_s(self) -> int:
        """A heartbeat key outlives two missed beats, as in the original (30 s beat, 60 s TTL)."""
        return max(3, -(-2 * self.heartbeat_interval_ms // 1000))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = dict(os.environ if env is None else env)
        e = Env(env)
        connectors = e.list("WORKER_CONNECTORS", ("simulation",))
        services = e.list("WORKER_SERVICES", connectors)
        for service in services:
            if not _ID_RE.match(service):
                raise SettingsError(f"WORKER_SERVICES: {service!r} is not a valid service name")
        cores = os.cpu_count() or 1
        return cls(
            queue=QueueSettings.from_env(env, "HUB_REDIS_URL", "REDIS_URL"),
            worker_id=e.ident("WORKER_ID", f"{socket.gethostname()}-{os.getpid()}"),
            services=services,
            connectors=connectors,
            poll_interval_ms=e.int("WORKER_POLL_INTERVAL_MS", 1000, 10, 60_000),
            heartbeat_interval_ms=e.int("WORKER_HEARTBEAT_INTERVAL_MS", 10000, 100, 600_000),
            max_concurrent_jobs=e.int("WORKER_MAX_CONCURRENT_JOBS", 1, 1, 1000),
            job_timeout_minutes=e.float("WORKER_JOB_TIMEOUT_MINUTES", 30.0, 0.001, 7 * 24 * 60),
            drain_seconds=e.int("WORKER_DRAIN_SECONDS", 30, 0, 86400),
            hardware=Hardware(
                gpu_count=e.int("WORKER_GPU_COUNT", 0, 0, 64),
                gpu_memory_gb=e.float("WORKER_GPU_MEMORY_GB", 0.0, 0, 100_000),
                gpu_model=e.str("WORKER_GPU_MODEL", ""),
                cpu_cores=e.int("WORKER_CPU_CORES", cores, 0, 100_000),
                ram_gb=e.float("WORKER_RAM_GB", 0.0, 0, 1_000_000),
            ),
            env=env,
        )
