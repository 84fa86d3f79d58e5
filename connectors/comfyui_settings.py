"""The ComfyUI connector's settings (WORKER_COMFYUI_*), parsed once at the worker's entry point
(`appliance.connector.connector_settings`) and in `bin/appliance start`'s check, then handed to
`ComfyUIConnector`.

WORKER_COMFYUI_URL (http[s]://HOST:PORT[/prefix]; bin/appliance sets it per worker), else WORKER_COMFYUI_HOST
(localhost) and _PORT (8188); _USERNAME/_PASSWORD (HTTP basic auth); _TIMEOUT_SECONDS (each HTTP call, 60),
_CONNECT_TIMEOUT_SECONDS (10), _WORKFLOW_TIMEOUT_SECONDS (600), _HEALTH_INTERVAL_SECONDS (10), _MAX_OUTPUT_MB
(100, all files of one job). WORKER_ID names the connector's client id in ComfyUI.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field

from appliance.comfyui_host import endpoint, valid_host
from appliance.settings import Env, SettingsError


@dataclass(frozen=True)
class ComfyUISettings:
    """Where the worker's ComfyUI is and how the connector talks to it."""

    url: str = "http://localhost:8188"   # base URL, no trailing slash
    host: str = "localhost"              # the URL's host (a loopback one is recorded with the worker's hostname)
    username: str = ""
    password: str = field(default="", repr=False)
    timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    workflow_timeout_s: float = 600.0
    health_interval_s: float = 10.0
    max_output_mb: float = 100.0
    worker_id: str = "worker"

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http") + "/ws"

    @property
    def auth_header(self) -> str:
        """The Authorization header's value for HTTP basic auth, or "" without a user."""
        if not self.username:
            return ""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    @property
    def max_output_bytes(self) -> int:
        return int(self.max_output_mb * 1024**2)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ComfyUISettings:
        e = Env(env)
        host, port = e.str("WORKER_COMFYUI_HOST", "localhost"), e.int("WORKER_COMFYUI_PORT", 8188, 1, 65535)
        # WORKER_COMFYUI_URL (set per worker by bin/appliance: its own ComfyUI) wins over host and port
        url = e.raw("WORKER_COMFYUI_URL")
        if not url and not valid_host(host.strip("[]")):
            raise SettingsError(f"WORKER_COMFYUI_HOST={host!r}: expected a hostname or IP address, e.g. 127.0.0.1")
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        where = endpoint("WORKER_COMFYUI_URL", url) if url else endpoint("WORKER_COMFYUI_HOST", f"http://{netloc}")
        return cls(
            url=where.url,
            host=where.host,
            username=e.str("WORKER_COMFYUI_USERNAME", ""),
            password=e.str("WORKER_COMFYUI_PASSWORD", ""),
            timeout_s=e.float("WORKER_COMFYUI_TIMEOUT_SECONDS", 60, 0.1, 3600),
            connect_timeout_s=e.float("WORKER_COMFYUI_CONNECT_TIMEOUT_SECONDS", 10, 0.1, 600),
            workflow_timeout_s=e.float("WORKER_COMFYUI_WORKFLOW_TIMEOUT_SECONDS", 600, 0.1, 7 * 86400),
            health_interval_s=e.float("WORKER_COMFYUI_HEALTH_INTERVAL_SECONDS", 10, 0.05, 3600),
            max_output_mb=e.float("WORKER_COMFYUI_MAX_OUTPUT_MB", 100, 0, 100_000),
            worker_id=e.str("WORKER_ID", "worker"),
        )
