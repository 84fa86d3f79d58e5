"""The ComfyUI connector: runs a job's API-format workflow on the worker's ComfyUI and follows it to the end.

Protocol: ComfyUI's HTTP and WebSocket API (tests/comfyui_double.py plays it). The payload is checked at submit
(connectors/comfyui_payload.py). A run: an earlier attempt's prompt still in this ComfyUI (the job's
`comfyui_prompt_id`, from a worker that died) is interrupted or dequeued first; the payload's `images` are
uploaded (`/upload/image`) and the workflow's references to them pointed at the upload; the new prompt's id
and ComfyUI's address are recorded on the job; the socket is opened with `?clientId=<ours>` before
`POST /prompt` with the same `client_id` and a `prompt_id` we choose, and only that prompt's events count
(connectors/comfyui_follow.py: progress weighted by steps, previews, a dropped socket).
`execution_success` completes (outputs read from `/history/{prompt_id}`, files fetched through `/view` and
stored so clients download them from the appliance's API); `execution_error` fails with the node, exception
type, message and traceback as the job's `error_details`; a graph ComfyUI refuses (400 with `node_errors`, or
a 4xx/500) fails at once. Cancel or timeout interrupts our prompt (`/interrupt`) or deletes it from ComfyUI's
queue if it has not started, and returns at once.

ComfyUI down (connection refused, or its socket gone with no way back) is not the job's failure: the connector
marks itself unhealthy at once and raises ServiceUnavailable, which the worker turns into a hand-back (no
retry counted). Health (`/system_stats`, `/prompt` for the queue length, checked in the background, more
often while down) decides whether the worker offers the `comfyui` service and is shown in the worker's record
(`health_info`); the models come from `/models` and `/models/{folder}`.

Settings: `ComfyUISettings` (connectors/comfyui_settings.py), parsed at the worker's entry point. Output files and
previews are stored through the job's context (`JobContext.store_output`, `store_preview`).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
import gevent.event
import websocket

from appliance import clock
from appliance.connector import Connector, ConnectorError, JobContext, JobStopped, ServiceUnavailable
from appliance.errors import ValidationError
from appliance.outputs import safe_name
from connectors import comfyui_payload
from connectors.comfyui_follow import Follow, close_socket, loads_object
from connectors.comfyui_http import Http, refused
from connectors.comfyui_outputs import collect_result
from connectors.comfyui_settings import ComfyUISettings

log = logging.getLogger(__name__)
T = TypeVar("T")
STOP_TIMEOUT_S = 1.0          # each HTTP call that stops a prompt (cancel stays under a second or two)
HEALTH_TIMEOUT_S = 5.0        # each HTTP call of a health check
DOWN_RECHECK_S = 1.0          # while ComfyUI is down, how often health is checked again
MODELS_REFRESH_S = 300.0      # how often the model lists are read again while ComfyUI is up
SKIPPED_MODEL_FOLDERS = {"custom_nodes", "configs"}


class ComfyUIConnector(Connector):
    name = "comfyui"

    settings_type = ComfyUISettings

    def __init__(self, settings: ComfyUISettings):
        self.settings = settings
        self.timeout_s = settings.timeout_s
        self.connect_timeout_s = settings.connect_timeout_s
        self.workflow_timeout_s = settings.workflow_timeout_s
        self.health_interval_s = settings.health_interval_s
        self.max_output_bytes = settings.max_output_bytes
        self.http = Http(settings.url, settings.auth_header, self.timeout_s)
        self.ws_url = settings.ws_url
        # a loopback address names a different ComfyUI on each host: the job records the host too
        self.hostname = socket.gethostname()
        self.local = settings.host == "localhost" or _loopback(settings.host)
        self.client_id = f"appliance-{settings.worker_id}-{uuid.uuid4().hex[:8]}"
        self.prompts: dict[str, str] = {}  # job id → its prompt id in ComfyUI
        self._stopping: set[str] = set()  # prompt ids being stopped (once, by whoever asks first)
        self._healthy = False
        self._health_error = "not checked yet"
        self._version = ""
        self._queue_remaining: int | None = None
        self._checked_ms = 0
        self._models: list[str] = []
        self._models_at = 0.0
        self._recheck = gevent.event.Event()
        self._health_loop: gevent.Greenlet | None = None

    @classmethod
    def check_payload(cls, payload: dict[str, Any]) -> None:
        comfyui_payload.check(payload)

    @classmethod
    def payload_schema(cls) -> dict[str, Any]:
        return comfyui_payload.schema()

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

    def health_info(self) -> dict[str, Any]:
        return {"url": self.http.base, "ok": self._healthy, "error": self._health_error,
                "version": self._version, "queue_remaining": self._queue_remaining,
                "checked_at": clock.iso(self._checked_ms) if self._checked_ms else None,
                "models": len(self._models)}

    def mark_down(self, why: str) -> None:
        """ComfyUI is unreachable (seen by a job, not the health check): stop offering comfyui at once."""
        if self._healthy:
            log.warning("ComfyUI at %s is down (%s): not offering comfyui", self.http.base, why)
        self._healthy = False
        self._health_error = f"ComfyUI at {self.http.base} does not answer: {why}"
        self._checked_ms = clock.now_ms()
        self._recheck.set()

    def check_health(self) -> bool:
        """GET /system_stats (version) and /prompt (queue length); the models when it comes up, and every
        MODELS_REFRESH_S."""
        was = self._healthy
        try:
            stats = self.http.json("GET", "/system_stats", timeout_s=min(self.timeout_s, HEALTH_TIMEOUT_S))
            ok = isinstance(stats, dict) and isinstance(stats.get("system"), dict)
            if ok:
                self._version = str(stats["system"].get("comfyui_version") or "")
                self._health_error = ""
                queue = self.http.json("GET", "/prompt", timeout_s=min(self.timeout_s, HEALTH_TIMEOUT_S))
                remaining = (queue.get("exec_info") or {}).get("queue_remaining") if isinstance(queue, dict) else None
                self._queue_remaining = remaining if isinstance(remaining, int) else None
            else:
                self._health_error = f"ComfyUI at {self.http.base}: /system_stats answered {stats!r:.200}"
        except (OSError, ValueError) as exc:
            ok = False
            self._health_error = f"ComfyUI at {self.http.base} does not answer: {exc}"
            if was or not self._checked_ms:  # going down, or down from the start: say so once
                log.warning("ComfyUI at %s does not answer (%s): not offering comfyui until it does",
                            self.http.base, exc)
        self._checked_ms = clock.now_ms()
        if ok and not was:
            log.info("ComfyUI at %s is up (version %s): offering comfyui", self.http.base, self._version)
        if ok and (not was or time.monotonic() - self._models_at > MODELS_REFRESH_S):
            self._read_models()
        self._healthy = ok
        return ok

    def _read_models(self) -> None:
        """The model files ComfyUI has, from every model folder (`GET /models`, `/models/{folder}`); a ComfyUI
        without those routes: its checkpoints, from /object_info. Names are as ComfyUI lists them (a file in
        a subfolder as "sub/name")."""
        timeout_s = min(self.timeout_s, HEALTH_TIMEOUT_S)
        try:
            names: list[str] = []
            status, raw = self.http.call("GET", "/models", timeout_s=timeout_s)
            if status == 200:
                for folder in loads_list(raw):
                    if isinstance(folder, str) and folder not in SKIPPED_MODEL_FOLDERS:
                        files = self.http.json("GET", f"/models/{urllib.parse.quote(folder)}", timeout_s=timeout_s)
                        names += [str(n) for n in files if isinstance(n, str)] if isinstance(files, list) else []
            else:
                info = self.http.json("GET", "/object_info/CheckpointLoaderSimple", timeout_s=timeout_s)
                listed = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
                names = [str(n) for n in listed] if isinstance(listed, list) else []
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            log.warning("could not read ComfyUI's models at %s: %s", self.http.base, exc)
            return
        self._models = sorted(set(names))
        self._models_at = time.monotonic()

    def _watch_health(self) -> None:
        while True:
            self._recheck.wait(self.health_interval_s if self._healthy else min(self.health_interval_s,
                                                                                  DOWN_RECHECK_S))
            self._recheck.clear()
            self.check_health()

    # -- a job ---------------------------------------------------------------------------------------------
    def run(self, job: JobContext) -> Any:
        field = comfyui_payload.graph_field(job.payload)
        try:
            comfyui_payload.check(job.payload)
            images = comfyui_payload.images_of(job.payload)
        except ValidationError as exc:  # checked at submit; a job queued before that check existed
            raise ConnectorError(str(exc), retryable=False) from None
        workflow: dict[str, Any] = job.payload[field]
        started = time.monotonic()
        self._stop_earlier_prompt(job)
        if images:
            workflow = self._upload_images(job, images, workflow)
        prompt_id = str(uuid.uuid4())
        job.annotate({"comfyui_prompt_id": prompt_id, "comfyui_url": self.http.base,
                      "comfyui_host": self.hostname})
        self.prompts[job.id] = prompt_id
        follow = Follow(self, job, workflow, prompt_id, self.watching(job, self._open_socket))
        try:
            self.watching(job, lambda: self._post(job, workflow, prompt_id))
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
                details={"prompt_id": prompt_id, **{k: data.get(k) for k in (
                    "node_id", "node_type", "exception_type", "exception_message", "traceback", "executed")}})
        if kind == "execution_interrupted":
            if job.stop_reason:
                raise JobStopped(job.stop_reason)
            raise ConnectorError(f"ComfyUI interrupted the prompt at node {data.get('node_id')} "
                                 "(someone else interrupted it)")
        return self.watching(job, lambda: collect_result(self, job, prompt_id, follow,
                                                         int((time.monotonic() - started) * 1000)))

    def watching(self, job: JobContext, fn: Callable[[], T]) -> T:
        """Run a blocking call, but give up at once with JobStopped when the job is told to stop."""
        if job.stopped.is_set():
            raise JobStopped(job.stop_reason)
        def quietly() -> tuple[bool, Any]:
            # the call's exception comes back as a value: raised inside the greenlet, gevent's hub would print
            # a traceback ("<Greenlet …> failed with …") for an error the worker handles in one line
            try:
                return True, fn()
            except Exception as exc:
                return False, exc

        call = gevent.spawn(quietly)
        gevent.wait([call, job.stopped], count=1)
        if not call.ready():
            call.kill(block=False)
            raise JobStopped(job.stop_reason)
        ok, value = call.get()
        if not ok:
            raise value
        result: T = value
        return result

    def unavailable(self, what: str, exc: BaseException) -> ServiceUnavailable:
        """ComfyUI cannot be reached: marked down now, and the job handed back by the worker."""
        self.mark_down(f"{what}: {exc}")
        return ServiceUnavailable(f"ComfyUI at {self.http.base} is unreachable ({what}: {exc}); the job goes "
                                  "back in line")

    def _stop_earlier_prompt(self, job: JobContext) -> None:
        """An earlier attempt's prompt (its worker died) still queued or running in this ComfyUI is stopped
        first, so that it neither holds the GPU nor runs ahead of this attempt."""
        earlier = job.fields.get("comfyui_prompt_id", "")
        if not earlier or job.fields.get("comfyui_url") != self.http.base:
            return
        if self.local and job.fields.get("comfyui_host") != self.hostname:
            return
        what = self.stop_prompt(earlier)
        if what:
            log.warning("job %s: the prompt %s of an earlier attempt was still in ComfyUI: %s", job.id, earlier,
                        what)

    def _upload_images(self, job: JobContext, images: dict[str, bytes],
                       workflow: dict[str, Any]) -> dict[str, Any]:
        """Upload the payload's images into a folder of the job's own (jobs never see each other's files) and
        point the workflow's inputs that name one of them (LoadImage's `image`) at the upload."""
        subfolder = f"appliance-{safe_name(job.id)}"
        uploaded: dict[str, str] = {}
        for name, data in images.items():
            try:
                reply = self.watching(job, functools.partial(self.http.upload_image, name, data, subfolder))
            except OSError as exc:
                if refused(exc):
                    raise self.unavailable("upload", exc) from None
                raise ConnectorError(f"could not upload image {name} to ComfyUI: {exc}") from None
            folder = str(reply.get("subfolder") or "")
            uploaded[name] = f"{folder}/{reply['name']}" if folder else str(reply["name"])
        return {node_id: {**node, "inputs": {k: uploaded.get(v, v) if isinstance(v, str) else v
                                             for k, v in node["inputs"].items()}}
                for node_id, node in workflow.items()}

    def open_socket_quietly(self) -> websocket.WebSocket:
        """Our socket to ComfyUI, with the feature-flag handshake (previews then name their prompt: binary
        event 4). Raises OSError or WebSocketException as they come."""
        headers = [f"Authorization: {self.http.auth_header}"] if self.http.auth_header else None
        ws = websocket.create_connection(f"{self.ws_url}?clientId={self.client_id}",
                                         timeout=self.connect_timeout_s, header=headers)
        try:
            ws.send('{"type": "feature_flags", "data": {"supports_preview_metadata": true}}')
        except (OSError, websocket.WebSocketException):
            close_socket(ws)
            raise
        ws.settimeout(0.5)
        return ws

    def _open_socket(self) -> websocket.WebSocket:
        try:
            return self.open_socket_quietly()
        except (OSError, websocket.WebSocketException) as exc:
            if refused(exc):
                raise self.unavailable("WebSocket", exc) from None
            raise ConnectorError(f"cannot open ComfyUI's WebSocket at {self.ws_url}: {exc}") from None

    def _post(self, job: JobContext, workflow: dict[str, Any], prompt_id: str) -> None:
        body = {"prompt": workflow, "client_id": self.client_id, "prompt_id": prompt_id,
                "extra_data": {"client_id": self.client_id, "appliance_job_id": job.id}}
        try:
            status, raw = self.http.call("POST", "/prompt", body)
        except OSError as exc:
            if refused(exc):
                raise self.unavailable("POST /prompt", exc) from None
            raise ConnectorError(f"cannot reach ComfyUI at {self.http.base}: {exc}") from None
        if status == 400:
            reply = loads_object(raw)
            error = reply.get("error") or {}
            error = error if isinstance(error, dict) else {"message": str(error)}
            node_errors = reply.get("node_errors") or {}
            detail = "; ".join(f"node {n} ({e.get('class_type')}): " + ", ".join(
                f"{x.get('message')} ({x.get('details')})" for x in e.get("errors", []))
                for n, e in node_errors.items() if isinstance(e, dict))
            message = f"ComfyUI refused the workflow: {error.get('message', raw[:200])}"
            message += f" {error.get('details')}".rstrip() if error.get("details") else ""
            raise ConnectorError(message + (f" [{detail}]" if detail else ""), retryable=False,
                                 details={"error": error, "node_errors": node_errors})
        if status == 500 or (400 < status < 500 and status not in (401, 403, 404, 408, 429)):
            # a graph ComfyUI cannot even read (it answers a UI-format workflow with a 500): retrying cannot help
            raise ConnectorError(f"ComfyUI could not read the workflow: POST /prompt answered {status}",
                                 retryable=False, details={"status": status,
                                                           "body": raw[:4096].decode(errors="replace")})
        if status != 200:
            raise ConnectorError(f"ComfyUI POST /prompt answered {status}: {raw[:200]!r}")
        job.progress(0, "Queued in ComfyUI", "queued", len(workflow))

    def cancel(self, job: JobContext) -> None:
        """Interrupt our prompt if it runs, or delete it from ComfyUI's queue if it waits."""
        prompt_id = self.prompts.get(job.id)
        if prompt_id:
            self.stop_prompt(prompt_id)

    def stop_prompt(self, prompt_id: str) -> str:
        """Returns "interrupted", "deleted" or "" (ComfyUI no longer has it, or another call is stopping it).
        Each call waits at most STOP_TIMEOUT_S."""
        if prompt_id in self._stopping:
            return ""
        self._stopping.add(prompt_id)
        try:
            queue = self.http.json("GET", "/queue", timeout_s=STOP_TIMEOUT_S)
            if any(item[1] == prompt_id for item in queue.get("queue_running", [])):
                self.http.call("POST", "/interrupt", {"prompt_id": prompt_id}, timeout_s=STOP_TIMEOUT_S)
                return "interrupted"
            if any(item[1] == prompt_id for item in queue.get("queue_pending", [])):
                self.http.call("POST", "/queue", {"delete": [prompt_id]}, timeout_s=STOP_TIMEOUT_S)
                return "deleted"
        except (OSError, ValueError, TypeError, IndexError) as exc:
            log.warning("could not stop ComfyUI prompt %s: %s", prompt_id, exc)
        finally:
            self._stopping.discard(prompt_id)
        return ""

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        entry = self.http.json("GET", f"/history/{prompt_id}").get(prompt_id)
        return entry if isinstance(entry, dict) else None

def loads_list(raw: bytes) -> list[Any]:
    value = loads_object(b'{"v": %s}' % raw if raw else b"{}").get("v")
    return value if isinstance(value, list) else []


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
