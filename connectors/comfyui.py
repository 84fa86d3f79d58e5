"""The ComfyUI connector: runs a job's API-format workflow on the worker's ComfyUI and follows it to the end.

Protocol facts: ../shared/reference/comfyui-protocol.md. The socket is opened with `?clientId=<ours>` before
`POST /prompt` with the same `client_id` and a `prompt_id` we choose, and only that prompt's events count.
`progress` and `executing` become job progress naming the node; `execution_success` completes (outputs read
from `/history/{prompt_id}`, files fetched through `/view` and stored so clients download them from the
appliance's API); `execution_error` fails with the node, exception type and message; a 400 from `/prompt`
fails at once (not retryable) with ComfyUI's `node_errors`. Cancel or timeout interrupts our prompt
(`/interrupt`) or deletes it from ComfyUI's queue if it has not started. Binary preview frames are ignored. If
the socket drops mid-job, it reconnects and makes up what it missed from `/history`. Health (`/system_stats`,
checked in the background) decides whether the worker offers the `comfyui` service.

Settings: WORKER_COMFYUI_HOST (localhost), _PORT (8188), _USERNAME/_PASSWORD (HTTP basic auth),
_TIMEOUT_SECONDS (each HTTP call, 60), _CONNECT_TIMEOUT_SECONDS (10), _WORKFLOW_TIMEOUT_SECONDS (600),
_HEALTH_INTERVAL_SECONDS (10), _MAX_OUTPUT_MB (100, all files of one job).
Payload: `workflow` (or `prompt`): the API-format graph {node id: {class_type, inputs}}.
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from typing import Any

import gevent
import orjson
import websocket

from appliance.connector import Connector, ConnectorError, JobContext, JobStopped
from appliance.keys import Keys
from appliance.outputs import OutputFile, OutputStore, output_url, safe_name
from appliance.redis_conn import connect
from appliance.settings import Env, QueueSettings
from connectors.comfyui_follow import Follow, close_socket, loads_object

log = logging.getLogger(__name__)


class Http:
    """Small JSON-over-HTTP client for ComfyUI with optional basic auth."""

    def __init__(self, base: str, auth_header: str, timeout_s: float):
        self.base, self.auth_header, self.timeout_s = base, auth_header, timeout_s

    def call(self, method: str, path: str, body: Any = None,
             timeout_s: float | None = None) -> tuple[int, bytes]:
        """(status, body); raises OSError when ComfyUI cannot be reached."""
        data = orjson.dumps(body) if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.auth_header:
            request.add_header("Authorization", self.auth_header)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, method: str, path: str, body: Any = None) -> Any:
        status, raw = self.call(method, path, body)
        if status != 200:
            raise OSError(f"ComfyUI {method} {path} answered {status}: {raw[:200]!r}")
        return orjson.loads(raw) if raw else {}


class ComfyUIConnector(Connector):
    name = "comfyui"

    def __init__(self, env: Mapping[str, str]):
        super().__init__(env)
        e = Env(env)
        host, port = e.str("WORKER_COMFYUI_HOST", "localhost"), e.int("WORKER_COMFYUI_PORT", 8188, 1, 65535)
        user, password = e.str("WORKER_COMFYUI_USERNAME", ""), e.str("WORKER_COMFYUI_PASSWORD", "")
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() if user else ""
        self.timeout_s = e.float("WORKER_COMFYUI_TIMEOUT_SECONDS", 60, 0.1, 3600)
        self.connect_timeout_s = e.float("WORKER_COMFYUI_CONNECT_TIMEOUT_SECONDS", 10, 0.1, 600)
        self.workflow_timeout_s = e.float("WORKER_COMFYUI_WORKFLOW_TIMEOUT_SECONDS", 600, 0.1, 7 * 86400)
        self.health_interval_s = e.float("WORKER_COMFYUI_HEALTH_INTERVAL_SECONDS", 10, 0.05, 3600)
        self.max_output_bytes = int(e.float("WORKER_COMFYUI_MAX_OUTPUT_MB", 100, 0, 100_000) * 1024**2)
        self.http = Http(f"http://{host}:{port}", auth, self.timeout_s)
        self.ws_url = f"ws://{host}:{port}/ws"
        self.client_id = f"appliance-{e.str('WORKER_ID', 'worker')}-{uuid.uuid4().hex[:8]}"
        queue = QueueSettings.from_env(env, "HUB_REDIS_URL", "REDIS_URL")
        self.outputs = OutputStore(connect(queue.redis_url, max_connections=4), Keys(queue.key_prefix),
                                   queue.completed_ttl_s)
        self.prompts: dict[str, str] = {}  # job id → its prompt id in ComfyUI
        self._healthy = False
        self._health_error = "not checked yet"
        self._models: list[str] = []
        self._health_loop: gevent.Greenlet | None = None

    # -- health and models -------------------------------------------------------------------------------
    def start(self) -> None:
        self.check_health()
        self._health_loop = gevent.spawn(self._watch_health)

    def stop(self) -> None:
        if self._health_loop is not None:
            self._health_loop.kill(block=False)

    def healthy(self) -> bool:
        return self._healthy

    def health_error(self) -> str:
        return self._health_error

    def models(self) -> list[str]:
        return list(self._models)

    def check_health(self) -> bool:
        """GET /system_stats; on the first success (and while none are known) read the checkpoints."""
        try:
            stats = self.http.json("GET", "/system_stats")
            ok = isinstance(stats, dict) and "system" in stats
            self._health_error = "" if ok else f"ComfyUI at {self.http.base}: /system_stats answered {stats!r:.200}"
        except (OSError, ValueError) as exc:
            ok = False
            self._health_error = f"ComfyUI at {self.http.base} does not answer: {exc}"
            if self._healthy:
                log.warning("ComfyUI at %s is down (%s): not offering comfyui", self.http.base, exc)
        if ok and not self._healthy:
            log.info("ComfyUI at %s is up (version %s): offering comfyui", self.http.base,
                     stats.get("system", {}).get("comfyui_version"))
        self._healthy = ok
        if ok and not self._models:
            try:
                info = self.http.json("GET", "/object_info/CheckpointLoaderSimple")
                names = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
                self._models = [str(n) for n in names] if isinstance(names, list) else []
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                pass
        return ok

    def _watch_health(self) -> None:
        while True:
            gevent.sleep(self.health_interval_s)
            self.check_health()

    # -- a job ---------------------------------------------------------------------------------------------
    def run(self, job: JobContext) -> Any:
        workflow = job.payload.get("workflow") or job.payload.get("prompt")
        if not isinstance(workflow, dict) or not workflow:
            raise ConnectorError("payload.workflow: expected a ComfyUI API-format workflow (node id → "
                                 "{class_type, inputs})", retryable=False)
        prompt_id = str(uuid.uuid4())
        self.prompts[job.id] = prompt_id
        started = time.monotonic()
        follow = Follow(self, job, workflow, prompt_id, self._open_socket())
        try:
            self._post(job, workflow, prompt_id)
            terminal = follow.until_done(started + self.workflow_timeout_s)
        finally:
            self.prompts.pop(job.id, None)
            close_socket(follow.ws)
        kind, data = terminal
        if kind == "execution_error":
            raise ConnectorError(
                f"ComfyUI node {data.get('node_id')} ({data.get('node_type')}) raised "
                f"{data.get('exception_type')}: {str(data.get('exception_message', '')).strip()}",
                retryable="OutOfMemory" in str(data.get("exception_type", "")),
                details={k: data.get(k) for k in ("node_id", "node_type", "exception_type",
                                                  "exception_message", "traceback", "executed")})
        if kind == "execution_interrupted":
            if job.stop_reason:
                raise JobStopped(job.stop_reason)
            raise ConnectorError(f"ComfyUI interrupted the prompt at node {data.get('node_id')} "
                                 "(someone else interrupted it)")
        return self._result(job, prompt_id, follow, round((time.monotonic() - started) * 1000))

    def _open_socket(self) -> websocket.WebSocket:
        headers = [f"Authorization: {self.http.auth_header}"] if self.http.auth_header else None
        try:
            ws = websocket.create_connection(f"{self.ws_url}?clientId={self.client_id}",
                                             timeout=self.connect_timeout_s, header=headers)
        except (OSError, websocket.WebSocketException) as exc:
            raise ConnectorError(f"cannot open ComfyUI's WebSocket at {self.ws_url}: {exc}") from None
        ws.settimeout(0.5)
        return ws

    def _post(self, job: JobContext, workflow: dict[str, Any], prompt_id: str) -> None:
        body = {"prompt": workflow, "client_id": self.client_id, "prompt_id": prompt_id,
                "extra_data": {"client_id": self.client_id, "appliance_job_id": job.id}}
        try:
            status, raw = self.http.call("POST", "/prompt", body)
        except OSError as exc:
            raise ConnectorError(f"cannot reach ComfyUI at {self.http.base}: {exc}") from None
        if status == 400:
            reply = loads_object(raw)
            error = reply.get("error") or {}
            node_errors = reply.get("node_errors") or {}
            detail = "; ".join(f"node {n} ({e.get('class_type')}): " + ", ".join(
                f"{x.get('message')} ({x.get('details')})" for x in e.get("errors", []))
                for n, e in node_errors.items())
            message = f"ComfyUI refused the workflow: {error.get('message', raw[:200])}"
            message += f" {error.get('details')}".rstrip() if error.get("details") else ""
            raise ConnectorError(message + (f" [{detail}]" if detail else ""), retryable=False,
                                 details={"error": error, "node_errors": node_errors})
        if status != 200:
            raise ConnectorError(f"ComfyUI POST /prompt answered {status}: {raw[:200]!r}")
        job.progress(0, "Queued in ComfyUI", "queued", len(workflow))

    def cancel(self, job: JobContext) -> None:
        """Interrupt our prompt if it runs, or delete it from ComfyUI's queue if it waits."""
        prompt_id = self.prompts.get(job.id)
        if prompt_id:
            self.stop_prompt(prompt_id)

    def stop_prompt(self, prompt_id: str) -> str:
        """Returns "interrupted", "deleted" or "" (ComfyUI no longer has it)."""
        try:
            queue = self.http.json("GET", "/queue")
            if any(item[1] == prompt_id for item in queue.get("queue_running", [])):
                self.http.call("POST", "/interrupt", {"prompt_id": prompt_id})
                return "interrupted"
            if any(item[1] == prompt_id for item in queue.get("queue_pending", [])):
                self.http.call("POST", "/queue", {"delete": [prompt_id]})
                return "deleted"
        except (OSError, ValueError) as exc:
            log.warning("could not stop ComfyUI prompt %s: %s", prompt_id, exc)
        return ""

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        entry = self.http.json("GET", f"/history/{prompt_id}").get(prompt_id)
        return entry if isinstance(entry, dict) else None

    def _result(self, job: JobContext, prompt_id: str, follow: Follow, elapsed_ms: int) -> dict[str, Any]:
        entry = follow.history_entry or self._history_after_success(prompt_id)
        outputs = (entry or {}).get("outputs") or {}
        files: list[OutputFile] = []
        listed: list[dict[str, Any]] = []
        total = 0
        for node_id, output in outputs.items():
            for kind, items in (output or {}).items():
                for item in items if isinstance(items, list) else []:
                    if not isinstance(item, dict) or "filename" not in item:
                        continue
                    data, content_type = self._view(item)
                    total += len(data)
                    if total > self.max_output_bytes:
                        raise ConnectorError(f"outputs larger than WORKER_COMFYUI_MAX_OUTPUT_MB "
                                             f"({self.max_output_bytes // 1024**2} MB)", retryable=False)
                    name = _unique(safe_name(f"{node_id}_{item['filename']}"), {f.name for f in files})
                    files.append(OutputFile(name, content_type, data, node_id))
                    listed.append({"name": name, "node": node_id, "kind": kind, "filename": item["filename"],
                                   "subfolder": item.get("subfolder", ""), "type": item.get("type", "output"),
                                   "content_type": content_type, "size": len(data),
                                   "url": output_url(job.id, name)})
        self.outputs.put(job.id, files)
        job.progress(100, "ComfyUI workflow finished", len(follow.done), len(follow.workflow))
        status = ((entry or {}).get("status") or {}).get("status_str", "success")
        return {"prompt_id": prompt_id, "status": status,
                "outputs": outputs, "files": listed, "cached_nodes": follow.cached,
                "execution_time_ms": elapsed_ms}

    def _history_after_success(self, prompt_id: str) -> dict[str, Any] | None:
        """ComfyUI writes history just after it sends execution_success: wait for it briefly."""
        deadline = time.monotonic() + min(self.timeout_s, 10)
        while True:
            try:
                entry = self.history(prompt_id)
            except (OSError, ValueError) as exc:
                raise ConnectorError(f"cannot read ComfyUI history: {exc}") from None
            if entry is not None or time.monotonic() > deadline:
                return entry
            gevent.sleep(0.05)

    def _view(self, item: dict[str, Any]) -> tuple[bytes, str]:
        query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                        "type": item.get("type", "output")})
        try:
            status, data = self.http.call("GET", f"/view?{query}")
        except OSError as exc:
            raise ConnectorError(f"cannot fetch output {item['filename']} from ComfyUI: {exc}") from None
        if status != 200:
            raise ConnectorError(f"ComfyUI /view of {item['filename']} answered {status}")
        return data, mimetypes.guess_type(item["filename"])[0] or "application/octet-stream"


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{n}_{name}"
    return candidate
