"""ComfyUI beside the workers: the managed `comfyui{n}` programs (COMFYUI_DIR), or the external ComfyUI each
worker talks to (WORKER_COMFYUI_URLS), and the address each worker program gets.

With COMFYUI_DIR, `bin/appliance` writes RUN/conf.d/comfyui.conf: program `comfyui{n}` (group `comfyui`) runs
ComfyUI's `main.py` on worker n's device (the same CUDA_VISIBLE_DEVICES; `--cpu` beside a CPU worker), listening
on 127.0.0.1:COMFYUI_BASE_PORT+n-1 with its own input, output and temp folders under RUN/comfyui{n}/, and
worker n gets that address as WORKER_COMFYUI_URL (and _HOST, _PORT). A worker offers `comfyui` only while its
ComfyUI answers (the connector's health check), so a ComfyUI still loading, or restarting, is given no job.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.runtime import WorkerProgram, command_line, environment_line, program_section
from appliance.settings import Env, SettingsError

DEFAULT_BASE_PORT = 8188
LISTEN = "127.0.0.1"
FOLDERS = ("input", "output", "temp")
# ComfyUI's options the appliance sets itself: COMFYUI_ARGS may not move a ComfyUI off its worker's address
RESERVED_ARGS = ("--listen", "--port", "--input-directory", "--output-directory", "--temp-directory")
PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Endpoint:
    """Where a worker reaches its ComfyUI: the base URL (no trailing slash), its host and port."""

    url: str
    host: str
    port: int

    @property
    def environment(self) -> dict[str, str]:
        """The connector's settings for this address (the URL wins; host and port for whatever reads them)."""
        return {"WORKER_COMFYUI_URL": self.url, "WORKER_COMFYUI_HOST": self.host,
                "WORKER_COMFYUI_PORT": str(self.port)}


def valid_host(host: str) -> bool:
    """A hostname (letters, digits, dots, hyphens, underscores) or an IP address: no spaces, no control
    characters, nothing http.client would refuse later (InvalidURL in every worker)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(re.fullmatch(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?", host)) and ".." not in host


def endpoint(name: str, value: str) -> Endpoint:
    """An http(s) URL of a ComfyUI (a path prefix allowed, for one behind a proxy); SettingsError naming `name`."""
    parts = urlsplit(value.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or parts.query or parts.fragment:
        raise SettingsError(f"{name}={value!r}: expected an http:// or https:// URL of a ComfyUI, e.g. "
                            "http://127.0.0.1:8188")
    if not valid_host(parts.hostname):
        raise SettingsError(f"{name}={value!r}: {parts.hostname!r} is not a hostname or IP address")
    port = port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if parts.username:
        raise SettingsError(f"{name}: put ComfyUI's user and password in WORKER_COMFYUI_USERNAME and "
                            "WORKER_COMFYUI_PASSWORD, not in the URL")
    return Endpoint(f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}", host, port)


@dataclass(frozen=True)
class ComfyUIHostSettings:
    """COMFYUI_DIR (a ComfyUI checkout: one managed ComfyUI per worker), COMFYUI_PYTHON, COMFYUI_BASE_PORT,
    COMFYUI_ARGS; or WORKER_COMFYUI_URLS (an external ComfyUI per worker, in worker order)."""

    directory: Path | None = None
    python: str = ""
    base_port: int = DEFAULT_BASE_PORT
    args: tuple[str, ...] = ()
    urls: tuple[Endpoint, ...] = ()

    @property
    def managed(self) -> bool:
        return self.directory is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ComfyUIHostSettings:
        e = Env(env)
        urls = tuple(endpoint("WORKER_COMFYUI_URLS", u) for u in e.list("WORKER_COMFYUI_URLS", ()))
        raw_dir = e.raw("COMFYUI_DIR")
        for name in ("COMFYUI_PYTHON", "COMFYUI_BASE_PORT", "COMFYUI_ARGS"):
            if raw_dir is None and e.raw(name) is not None:
                raise SettingsError(f"{name}: set COMFYUI_DIR too (a ComfyUI checkout) for the appliance to run "
                                    "ComfyUI; without it the workers use WORKER_COMFYUI_URLS or WORKER_COMFYUI_HOST")
        if raw_dir is None:
            return cls(urls=urls)
        if urls:
            raise SettingsError("WORKER_COMFYUI_URLS: the appliance runs its own ComfyUI per worker (COMFYUI_DIR is "
                                "set); set one of the two")
        directory = Path(raw_dir).expanduser().resolve()
        if not (directory / "main.py").is_file():
            raise SettingsError(f"COMFYUI_DIR={raw_dir!r}: expected a ComfyUI checkout (a folder holding main.py)")
        raw_args = e.str("COMFYUI_ARGS", "")
        try:
            args = tuple(shlex.split(raw_args))
        except ValueError as exc:
            raise SettingsError(f"COMFYUI_ARGS={raw_args!r}: {exc} (expected arguments as a shell writes them)") \
                from None
        for arg in args:
            if arg.split("=", 1)[0] in RESERVED_ARGS:
                raise SettingsError(f"COMFYUI_ARGS={raw_args!r}: {arg.split('=', 1)[0]} is set by the appliance "
                                    "(127.0.0.1, COMFYUI_BASE_PORT, folders in the run folder)")
        return cls(directory, _python(e, directory), e.int("COMFYUI_BASE_PORT", DEFAULT_BASE_PORT, 1, 65535), args)


def _python(e: Env, directory: Path) -> str:
    """COMFYUI_PYTHON (a path or a command on PATH); by default the checkout's own venv (`venv/`, `.venv/`), else
    python3."""
    given = e.raw("COMFYUI_PYTHON")
    candidates = [given] if given else [str(directory / d / "bin" / "python") for d in ("venv", ".venv")] + ["python3"]
    for candidate in candidates:
        path = Path(candidate).expanduser()
        # absolute, not resolved: a venv's python is a link, and its venv is found by the path it was run by
        found = str(path.absolute()) if "/" in candidate and path.is_file() else shutil.which(candidate)
        if found:
            return found
    if given:
        raise SettingsError(f"COMFYUI_PYTHON={given!r}: no such executable (expected the Python of ComfyUI's "
                            "environment, e.g. /opt/ComfyUI/venv/bin/python)")
    raise SettingsError(f"COMFYUI_PYTHON: no {directory}/venv/bin/python and no python3 on PATH; set it to the Python "
                        "that runs ComfyUI")


@dataclass(frozen=True)
class ComfyUIProgram:
    """One managed ComfyUI: its program name, the worker it serves, its port, and how supervisord runs it."""

    name: str
    worker: str
    port: int
    command: tuple[str, ...]
    environment: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://{LISTEN}:{self.port}"

    @property
    def device(self) -> str:
        return self.environment.get("CUDA_VISIBLE_DEVICES", "")


@dataclass(frozen=True)
class ComfyUIPlan:
    """The comfyui programs (none without COMFYUI_DIR) and the worker programs with their ComfyUI's address."""

    programs: list[ComfyUIProgram]
    workers: list[WorkerProgram]

    @property
    def note(self) -> str:
        if not self.programs:
            return ""
        first, last = self.programs[0].port, self.programs[-1].port
        return (f"one ComfyUI per worker (comfyui1..comfyui{len(self.programs)} on 127.0.0.1:{first}"
                f"{f'-{last}' if last != first else ''}); a worker offers comfyui once its ComfyUI answers "
                "(`bin/appliance status`)")


def plan(settings: ComfyUIHostSettings, workers: list[WorkerProgram], run_dir: Path) -> ComfyUIPlan:
    """comfyui{n} beside worker n, on its device, or worker n pointed at WORKER_COMFYUI_URLS' n-th URL.

    Raises SettingsError when WORKER_COMFYUI_URLS does not name one URL per worker, or the ports run past 65535.
    """
    if settings.urls:
        if len(settings.urls) != len(workers):
            raise SettingsError(f"WORKER_COMFYUI_URLS: {len(settings.urls)} URLs for {len(workers)} workers; "
                                "expected one per worker, in order (worker1's first)")
        return ComfyUIPlan([], [replace(w, environment={**w.environment, **url.environment})
                                for w, url in zip(workers, settings.urls, strict=True)])
    if settings.directory is None:
        return ComfyUIPlan([], workers)
    if settings.base_port + len(workers) - 1 > 65535:
        raise SettingsError(f"COMFYUI_BASE_PORT={settings.base_port}: {len(workers)} ComfyUI need ports up to "
                            f"{settings.base_port + len(workers) - 1}; expected at most {65536 - len(workers)}")
    programs, pointed = [], []
    for n, worker in enumerate(workers, 1):
        port = settings.base_port + n - 1
        folder = run_dir / f"comfyui{n}"
        device = worker.environment.get("CUDA_VISIBLE_DEVICES", "")
        environment = {"CUDA_VISIBLE_DEVICES": device}
        if "CUDA_DEVICE_ORDER" in worker.environment:
            environment["CUDA_DEVICE_ORDER"] = worker.environment["CUDA_DEVICE_ORDER"]
        command = [settings.python, str(settings.directory / "main.py"), "--listen", LISTEN, "--port", str(port),
                   *(a for f in FOLDERS for a in (f"--{f}-directory", str(folder / f)))]
        if not device and "--cpu" not in settings.args:  # beside a CPU worker: no GPU for this ComfyUI either
            command.append("--cpu")
        program = ComfyUIProgram(f"comfyui{n}", worker.name, port, (*command, *settings.args), environment)
        programs.append(program)
        address = Endpoint(program.url, LISTEN, port)
        pointed.append(replace(worker, environment={**worker.environment, **address.environment}))
    return ComfyUIPlan(programs, pointed)


def check_ports(programs: list[ComfyUIProgram], taken: Mapping[int, str], fresh: bool) -> None:
    """SettingsError (naming COMFYUI_BASE_PORT) when a ComfyUI port is one the appliance uses for something else
    (`taken`: port → what), or, on a fresh start (`fresh`), when something already listens there."""
    for program in programs:
        if program.port in taken:
            raise SettingsError(f"COMFYUI_BASE_PORT: {program.name} would listen on port {program.port}, which "
                                f"{taken[program.port]} uses; pick another base port")
        if fresh and _listening(program.port):
            raise SettingsError(f"COMFYUI_BASE_PORT: port {program.port} ({program.name}'s) is in use on {LISTEN} "
                                f"(another ComfyUI?); stop it or pick another base port")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LISTEN, port)) == 0


def make_folders(run_dir: Path, programs: list[ComfyUIProgram]) -> None:
    """Each ComfyUI's input, output and temp folders (this user's only, like the rest of the run folder)."""
    for program in programs:
        for name in FOLDERS:
            folder = run_dir / program.name / name
            folder.mkdir(parents=True, exist_ok=True)
            folder.parent.chmod(0o700)
            folder.chmod(0o700)


def with_comfyui_connector(env: Mapping[str, str]) -> dict[str, str]:
    """COMFYUI_DIR adds comfyui to WORKER_CONNECTORS (default `simulation`) and, when it is set, to
    WORKER_SERVICES: a managed ComfyUI is there to be used."""
    e, out = Env(env), dict(env)
    for name, default in (("WORKER_CONNECTORS", ("simulation",)), ("WORKER_SERVICES", None)):
        if default is None and e.raw(name) is None:
            continue
        values = e.list(name, default or ())
        if "comfyui" not in values:
            out[name] = ",".join((*values, "comfyui"))
    return out


def conf(programs: list[ComfyUIProgram], directory: Path | None) -> str:
    """The supervisord sections of the comfyui programs and their group (started before the workers, which
    wait for nothing: they offer comfyui once it answers; stopped after them, so running jobs can finish)."""
    lines = ["; written by bin/appliance at start and restart: one ComfyUI per worker (do not edit; set COMFYUI_* "
             "and run `bin/appliance restart comfyui`)"]
    for program in programs:
        lines += program_section(program.name, [
            "command=" + command_line(program.command),
            f"directory={str(directory).replace('%', '%%')}",
            environment_line(program.environment),
            "autorestart=true",
            "priority=25                      ; after redis and the api, before the workers",
            "startsecs=5                      ; up 5 s: started (the worker waits for it to answer)",
            "startretries=3                   ; then FATAL: a ComfyUI that cannot start shows in `status`",
            "stopsignal=TERM",
            "stopwaitsecs=15",
            "stopasgroup=true",
            "killasgroup=true",
        ])
    if programs:
        lines += ["", "[group:comfyui]", "programs=" + ",".join(p.name for p in programs),
                  "priority=25                      ; stopped after the workers (30), started before them"]
    return "\n".join(lines) + "\n"


def recorded(programs: list[ComfyUIProgram]) -> list[dict[str, Any]]:
    """What `status` needs of each ComfyUI (kept in RUN/appliance.json)."""
    return [{"program": p.name, "worker": p.worker, "url": p.url, "device": p.device} for p in programs]


def describe(entries: list[dict[str, Any]], states: dict[str, tuple[str, str]] | None = None) -> list[str]:
    """One line per managed ComfyUI for `status`: its address, worker and device, and whether it answers now.

    `states` maps each program's name to supervisord's state and description ("pid 7, uptime 0:00:35"): a
    program that is not RUNNING is reported as such, and one that does not answer is "loading" only in its first
    minute."""
    lines = []
    for entry in entries:
        url, program = str(entry.get("url")), str(entry.get("program"))
        state_name, description = (states or {}).get(program, ("RUNNING", ""))
        logs = f"see `bin/appliance logs {program}`"
        if state_name != "RUNNING":
            state = f"not running ({state_name}): {logs}"
        else:
            try:
                with urllib.request.urlopen(f"{url}/system_stats", timeout=PROBE_TIMEOUT_S) as reply:
                    system = json.loads(reply.read()).get("system") or {}
                state = f"answers (ComfyUI {system.get('comfyui_version') or '?'})"
            except (OSError, ValueError, AttributeError) as exc:
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                uptime = re.search(r"uptime (\d+):(\d\d):(\d\d)$", description)
                young = uptime is not None and int(uptime[1]) == 0 and int(uptime[2]) == 0
                state = f"not answering ({reason}): " + (f"loading, or {logs}" if young else logs)
        device = entry.get("device") or "CPU (--cpu)"
        lines.append(f"  {program:<10} {url} for {entry.get('worker')} on {device}: {state}")
    return lines
