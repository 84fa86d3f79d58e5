"""Typed, frozen settings parsed once from the environment at each entry point, and handed down.

No other module reads `os.environ` or keeps the environment: the entry points (the worker's
`appliance.worker_process`, the API's `appliance.api.wsgi`, the CLI) parse it into these objects and pass them
down. A bad value raises `SettingsError` whose message names the variable, the value and what was expected;
entry points print it as one line and exit 2.

Who parses what:

- `QueueSettings`: what every process that touches the queue needs (Redis, key prefix, stream lengths,
  retention, log level) and the retry curve (JOB_RETRY_BASE_MS, JOB_RETRY_MAX_MS): the API recovers expired
  leases too (appliance/api/janitor.py), and a recovered job waits its backoff on the same curve as any retry,
  so both the API and the workers parse it.
- `ApiSettings` (API_*, CORS_ORIGINS, API keys) holds a `QueueSettings`; it never reads a WORKER_* variable, so
  a bad worker setting cannot stop the API.
- `WorkerSettings` (WORKER_*, CUDA_VISIBLE_DEVICES, supervisord's variables) holds a `QueueSettings`, and the
  lease (WORKER_LEASE_MS), which only the process that holds jobs uses (each worker records its own lease on
  its record; recovery reads it from there, see `present` in appliance/lua/_lib.lua).
- Each connector's own settings (WORKER_<NAME>_*) are a frozen dataclass of the connector's module with a
  `from_env(env)` classmethod (`SimulationSettings`, `ComfyUISettings`), parsed by
  `appliance.connector.connector_settings` for the connectors named in WORKER_CONNECTORS, at the worker's entry
  point and in `bin/appliance start`'s check.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_LEASE_MS = 15000
LOOPBACK = "127.0.0.1"
API_KEY_MIN_CHARS = 16
SUBMIT_MEMORY_PERCENT = 90
_SECRET_NAMES = ("API_KEYS", "PASSWORD", "SECRET", "TOKEN")  # settings whose values are never shown
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(|b|k|kb|m|mb|g|gb)$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}
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

    def size(self, name: builtins.str, default: builtins.int) -> builtins.int:
        """Bytes, written as Redis takes them: `536870912`, `512mb`, `2gb` (kb/mb/gb are powers of 1024, k/m/g
        of 1000); 0 is allowed (no limit)."""
        value = self.raw(name)
        if value is None:
            return default
        match = _SIZE_RE.match(value.lower())
        if match is None:
            raise SettingsError(f"{name}={value!r}: expected bytes, e.g. 536870912, 512mb or 2gb")
        return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])

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
        if not _ID_RE.fullmatch(value):
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


_TOKEN_RE = re.compile(r"((?:^|[?&;])token=)[^&;\s\"']*", re.IGNORECASE)


def redact_token(text: str) -> str:
    """`text` (a request line, query or URL) with the value of any `token` query parameter replaced by `***`."""
    return _TOKEN_RE.sub(r"\1***", text)


def redact_setting(name: str, value: str) -> str:
    """A setting's value as it may be shown or logged: passwords in URLs and secret values replaced by `***`."""
    if name.endswith("_URL"):
        return redact_url(value)
    if any(part in name for part in _SECRET_NAMES) and not name.endswith("_FILE") and value:
        return "***"
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
    """What every process needs to talk to the queue in Redis, the retry curve included (the module's
    docstring says why)."""

    redis_url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    key_prefix: str = ""
    progress_maxlen: int = 1000
    events_maxlen: int = 10000
    completed_ttl_s: int = 86400
    failed_ttl_s: int = 7 * 86400
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
            retry_base_ms=e.int("JOB_RETRY_BASE_MS", 1000, 0, 3_600_000),
            retry_max_ms=e.int("JOB_RETRY_MAX_MS", 60000, 0, 86_400_000),
            log_level=e.choice("LOG_LEVEL", "info", LOG_LEVELS),
        )


@dataclass(frozen=True)
class ApiKey:
    """One API key: its name (recorded on the jobs it submits), the secret, and whether it may see everything."""

    name: str
    key: str = field(repr=False)
    admin: bool = False


def parse_api_keys(env: Mapping[str, str]) -> tuple[ApiKey, ...]:
    """The keys of API_KEYS (`name:key[:admin],...`) and API_KEYS_FILE (`name key [admin]` lines, `#` comments).

    Errors name the variable (or file and line) and the key's name, never the key itself."""
    e = Env(env)
    keys: list[ApiKey] = []
    listed = e.raw("API_KEYS")
    if listed is not None:
        for number, item in enumerate((part.strip() for part in listed.split(",")), 1):
            if not item:
                continue
            parts = item.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "admin"):
                raise SettingsError(f"API_KEYS: entry {number} is not name:key or name:key:admin")
            keys.append(_api_key(f"API_KEYS entry {number}", parts[0], parts[1], len(parts) == 3))
    path = e.raw("API_KEYS_FILE")
    if path is not None:
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as keys_file:
                text = keys_file.read()
        except OSError as exc:
            raise SettingsError(f"API_KEYS_FILE={path!r}: cannot read it ({exc.strerror})") from None
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) not in (2, 3) or (len(words) == 3 and words[2] != "admin"):
                raise SettingsError(f"API_KEYS_FILE={path!r}: line {number} is not `name key` or `name key admin`")
            keys.append(_api_key(f"API_KEYS_FILE={path!r} line {number}", words[0], words[1], len(words) == 3))
    names = [k.name for k in keys]
    for name in names:
        if names.count(name) > 1:
            raise SettingsError(f"API_KEYS: the name {name!r} is given to two keys; names identify keys")
    secrets = [k.key for k in keys]
    for key in keys:
        if secrets.count(key.key) > 1:
            raise SettingsError(f"API_KEYS: the key of {key.name!r} is also another name's key")
    return tuple(keys)


def _api_key(where: str, name: str, key: str, admin: bool) -> ApiKey:
    if not _ID_RE.match(name):
        raise SettingsError(f"{where}: the name {name!r} should be letters, digits, '_', '.' or '-'")
    if len(key) < API_KEY_MIN_CHARS or not key.isprintable() or any(c.isspace() for c in key):
        raise SettingsError(f"{where}: the key of {name!r} should be at least {API_KEY_MIN_CHARS} printable "
                            "characters without spaces (e.g. `python3 -c 'import secrets; "
                            "print(secrets.token_urlsafe(32))'`)")
    return ApiKey(name, key, admin)


@dataclass(frozen=True)
class ApiSettings:
    """Settings of the HTTP/WebSocket API process."""

    queue: QueueSettings
    port: int = 3001
    bind: str = LOOPBACK             # without keys; 0.0.0.0 with them (API_BIND decides either way)
    processes: int = 1
    worker_connections: int = 10000
    cors_origins: tuple[str, ...] = ()   # besides loopback origins (without keys) and the API's own origin
    max_body_bytes: int = 10 * 1024 * 1024
    graceful_timeout_s: int = 10
    sse_keepalive_s: float = 15.0
    client_queue_size: int = 1000
    # hostile-input limits (README, Configuration): each answered with a 4xx, a 503 with Retry-After or a close code
    client_queue_bytes: int = 2 * 1024 * 1024
    max_json_depth: int = 64
    max_payload_bytes: int = 4 * 1024 * 1024
    max_requirements_bytes: int = 64 * 1024
    max_subscriptions: int = 1000
    max_sse_connections: int = 5000
    max_ws_connections: int = 5000
    submits_per_second: float = 100.0
    max_classes_per_service: int = 100
    body_timeout_s: float = 30.0
    ws_max_message_bytes: int = 1024 * 1024
    ws_ping_interval_s: float = 25.0
    access_log: bool = False
    api_keys: tuple[ApiKey, ...] = ()
    submit_memory_percent: int = SUBMIT_MEMORY_PERCENT

    @property
    def open_access(self) -> bool:
        """No keys: anyone who reaches the port may do anything (hence loopback by default)."""
        return not self.api_keys

    def access_note(self) -> str:
        """One line for the API's start (its log and `bin/appliance start`): who may use the API."""
        where = f"{self.bind}:{self.port}"
        if self.api_keys:
            admins = sum(1 for k in self.api_keys if k.admin)
            origins = ", ".join(self.cors_origins) or "none but its own"
            return (f"API keys required on {where}: {len(self.api_keys)} keys ({admins} admin); browser origins "
                    f"allowed: {origins} (CORS_ORIGINS)")
        if self.bind in ("127.0.0.1", "::1", "localhost"):
            return (f"no API keys (API_KEYS, API_KEYS_FILE): the API listens on loopback only ({where}); anyone "
                    "on this host may use it (API_BIND), and web pages of loopback origins"
                    + (f" and {', '.join(self.cors_origins)} (CORS_ORIGINS)" if self.cors_origins else ""))
        return (f"no API keys (API_KEYS, API_KEYS_FILE) and API_BIND={self.bind}: anyone who reaches {where} may "
                "read, submit and cancel every job; set API_KEYS")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApiSettings:
        env = os.environ if env is None else env
        e = Env(env)
        keys = parse_api_keys(env)
        return cls(
            queue=QueueSettings.from_env(env, "REDIS_URL", "HUB_REDIS_URL"),
            port=e.int("API_PORT", 3001, 1, 65535),
            bind=e.str("API_BIND", "0.0.0.0" if keys else LOOPBACK),
            processes=e.int("API_PROCESSES", 1, 1, 64),
            worker_connections=e.int("API_WORKER_CONNECTIONS", 10000, 10, 1_000_000),
            # browsers of other origins are refused unless named (without keys, loopback origins are allowed
            # too); "*" only when set so, and credentials never go with it
            cors_origins=e.list("CORS_ORIGINS", ()),
            max_body_bytes=e.int("API_MAX_BODY_BYTES", 10 * 1024 * 1024, 1024, 1024**3),
            graceful_timeout_s=e.int("API_GRACEFUL_TIMEOUT_SECONDS", 10, 1, 3600),
            sse_keepalive_s=e.float("API_SSE_KEEPALIVE_SECONDS", 15.0, 0.1, 15.0),
            client_queue_size=e.int("API_CLIENT_QUEUE_SIZE", 1000, 1, 1_000_000),
            client_queue_bytes=e.int("API_CLIENT_QUEUE_BYTES", 2 * 1024 * 1024, 4096, 1024**3),
            max_json_depth=e.int("API_MAX_JSON_DEPTH", 64, 2, 200),
            max_payload_bytes=e.int("API_MAX_PAYLOAD_BYTES", 4 * 1024 * 1024, 2, 1024**3),
            max_requirements_bytes=e.int("API_MAX_REQUIREMENTS_BYTES", 64 * 1024, 64, 16 * 1024 * 1024),
            max_subscriptions=e.int("API_MAX_SUBSCRIPTIONS", 1000, 1, 1_000_000),
            max_sse_connections=e.int("API_MAX_SSE_CONNECTIONS", 5000, 1, 1_000_000),
            max_ws_connections=e.int("API_MAX_WS_CONNECTIONS", 5000, 1, 1_000_000),
            submits_per_second=e.float("API_SUBMITS_PER_SECOND", 100.0, 0, 1_000_000),
            max_classes_per_service=e.int("API_MAX_CLASSES_PER_SERVICE", 100, 1, 100_000),
            body_timeout_s=e.float("API_BODY_TIMEOUT_SECONDS", 30.0, 0.1, 3600),
            ws_max_message_bytes=e.int("API_WS_MAX_MESSAGE_BYTES", 1024 * 1024, 1024, 1024**3),
            ws_ping_interval_s=e.float("API_WS_PING_SECONDS", 25.0, 0.5, 3600),
            access_log=e.bool("API_ACCESS_LOG", False),
            api_keys=keys,
            submit_memory_percent=e.int("API_SUBMIT_MEMORY_PERCENT", SUBMIT_MEMORY_PERCENT, 1, 100),
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
class WorkerProfile:
    """What a worker declares beyond hardware: customer access and custom capabilities (appliance/matching.py
    matches job requirements against them).

    Settings: WORKER_CUSTOMER_ISOLATION (or CUSTOMER_ISOLATION; strict|loose, default loose),
    WORKER_ALLOWED_CUSTOMERS and WORKER_DENIED_CUSTOMERS (comma lists), WORKER_CUSTOM_CAPABILITIES (a JSON
    object, matched by `custom.<path>` requirements), WORKER_GPU_INDEX (set per GPU worker by bin/appliance).
    """

    isolation: str = "loose"
    allowed_customers: tuple[str, ...] = ()
    denied_customers: tuple[str, ...] = ()
    custom: dict[str, Any] = field(default_factory=dict)
    gpu_index: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerProfile:
        e = Env(env)
        isolation = e.choice("WORKER_CUSTOMER_ISOLATION", e.choice("CUSTOMER_ISOLATION", "loose",
                                                                   ("strict", "loose")), ("strict", "loose"))
        raw = e.raw("WORKER_CUSTOM_CAPABILITIES")
        custom: Any = {}
        if raw is not None:
            try:
                custom = json.loads(raw)
            except ValueError:
                custom = None
            if not isinstance(custom, dict):
                raise SettingsError(f"WORKER_CUSTOM_CAPABILITIES={raw!r}: expected a JSON object, "
                                    "e.g. {\"region\": \"eu\"}")
        return cls(isolation, e.list("WORKER_ALLOWED_CUSTOMERS", ()), e.list("WORKER_DENIED_CUSTOMERS", ()),
                   custom, e.str("WORKER_GPU_INDEX", ""))

    def customer_access(self) -> dict[str, Any]:
        return {"isolation": self.isolation, "allowed_customers": list(self.allowed_customers),
                "denied_customers": list(self.denied_customers)}


@dataclass(frozen=True)
class WorkerSettings:
    """Settings of one worker process, all parsed by `from_env` (a bad value stops the worker before it starts,
    and `bin/appliance start` before anything starts)."""

    queue: QueueSettings
    worker_id: str
    services: tuple[str, ...]
    connectors: tuple[str, ...]
    poll_interval_ms: int = 1000
    heartbeat_interval_ms: int = 10000
    max_concurrent_jobs: int = 1
    job_timeout_minutes: float = 30.0
    drain_seconds: int = 30
    progress_max_per_second: float = 10.0   # progress writes per job (the latest step always goes out)
    hardware: Hardware = Hardware()
    profile: WorkerProfile = WorkerProfile()
    supervisor_url: str = ""          # SUPERVISOR_SERVER_URL, set by supervisord for the programs it runs
    supervisor_process: str = ""      # SUPERVISOR_GROUP_NAME:SUPERVISOR_PROCESS_NAME, this process there
    lease_ms: int = DEFAULT_LEASE_MS  # WORKER_LEASE_MS: the lease of each job this worker holds
    gpu_device: str = ""              # the GPU it is pinned to: the one device of CUDA_VISIBLE_DEVICES, or ""

    @property
    def heartbeat_ttl_s(self) -> int:
        """A heartbeat key outlives two missed beats, as in the original (30 s beat, 60 s TTL)."""
        return max(3, -(-2 * self.heartbeat_interval_ms // 1000))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
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
            progress_max_per_second=e.float("WORKER_PROGRESS_MAX_PER_SECOND", 10.0, 0.1, 1000),
            hardware=Hardware(
                gpu_count=e.int("WORKER_GPU_COUNT", 0, 0, 64),
                gpu_memory_gb=e.float("WORKER_GPU_MEMORY_GB", 0.0, 0, 100_000),
                gpu_model=e.str("WORKER_GPU_MODEL", ""),
                cpu_cores=e.int("WORKER_CPU_CORES", cores, 0, 100_000),
                ram_gb=e.float("WORKER_RAM_GB", 0.0, 0, 1_000_000),
            ),
            profile=WorkerProfile.from_env(env),
            supervisor_url=e.str("SUPERVISOR_SERVER_URL", ""),
            supervisor_process=_supervisor_process(e),
            lease_ms=e.int("WORKER_LEASE_MS", DEFAULT_LEASE_MS, 1000, 3_600_000),
            gpu_device=_pinned_gpu(e),
        )


def _pinned_gpu(e: Env) -> str:
    """The GPU a worker is pinned to: the one device in its CUDA_VISIBLE_DEVICES (a UUID or index), or ""."""
    devices = [d.strip() for d in e.str("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return devices[0] if devices and devices[0] != "-1" else ""


def _supervisor_process(e: Env) -> str:
    """supervisord's name of this process (`group:name`), from the variables it sets for its programs."""
    name = e.str("SUPERVISOR_PROCESS_NAME", "")
    group = e.str("SUPERVISOR_GROUP_NAME", name)
    return f"{group}:{name}" if name else ""
