"""Following one ComfyUI prompt over the WebSocket until it ends (used by connectors/comfyui.py).

Only events carrying our prompt_id count (plus the `executing` a reconnect gets without one). Progress follows
the work: each node weighs its steps (a node's `steps` input, then the `max` of its progress messages; 1 for a
node without), and the message names the node and step ("KSampler (node 3): step 4/8"). Binary preview frames
of our prompt become the job's latest preview (stored at most once per PREVIEW_EVERY_S, each with a `preview`
event). When the socket drops it reconnects, and what happened meanwhile is made up from /history; when
ComfyUI refuses the reconnection for REFUSED_GRACE_S it is down, and the job goes back in line
(ServiceUnavailable). A prompt found in neither /queue nor /history was deleted from ComfyUI's queue (a
failure) while the socket stayed up; after the socket dropped it was lost in a ComfyUI restart (the service's
outage: ServiceUnavailable, the job goes back in line with no retry counted).
"""

from __future__ import annotations

import logging
import struct
import time
from typing import TYPE_CHECKING, Any

import orjson
import websocket

from appliance.connector import ConnectorError, JobContext, JobStopped, ServiceUnavailable
from connectors.comfyui_http import refused

if TYPE_CHECKING:
    from connectors.comfyui import ComfyUIConnector

log = logging.getLogger(__name__)
TERMINAL = ("execution_success", "execution_error", "execution_interrupted")
QUIET_POLL_S = 2.0  # after this long without a message, look at /history and /queue
REFUSED_GRACE_S = 1.0  # a dropped socket whose reconnection is refused this long: ComfyUI is down
PREVIEW_EVERY_S = 1.0  # at most one stored preview (and `preview` event) per job this often
PREVIEW_FORMATS = {1: "image/jpeg", 2: "image/png"}


class Follow:
    """Follows one prompt over the socket (reconnecting when it drops) until a terminal event."""

    def __init__(self, connector: ComfyUIConnector, job: JobContext, workflow: dict[str, Any], prompt_id: str,
                 ws: websocket.WebSocket):
        self.c, self.job, self.workflow, self.prompt_id, self.ws = connector, job, workflow, prompt_id, ws
        self.cached: list[str] = []
        self.done: set[str] = set()
        self.node: str | None = None
        self.started = False
        self.history_entry: dict[str, Any] | None = None
        self.missing = 0
        self.dropped = False  # the socket dropped since the prompt was posted: a vanished prompt means a restart
        self.weights = {node_id: _steps(node) for node_id, node in workflow.items()}
        self.preview: tuple[bytes, str, str] | None = None  # the latest frame not stored yet
        self.preview_at = 0.0

    def until_done(self, deadline: float) -> tuple[str, dict[str, Any]]:
        quiet_since = time.monotonic()
        while True:
            if self.job.stopped.is_set():  # cancel, timeout, lost, shutdown: stop our prompt, return at once
                self.c.stop_prompt(self.prompt_id)
                raise JobStopped(self.job.stop_reason)
            if time.monotonic() > deadline:
                self.c.stop_prompt(self.prompt_id)
                raise ConnectorError(f"ComfyUI workflow did not finish within "
                                     f"{self.c.workflow_timeout_s:g}s "
                                     "(WORKER_COMFYUI_WORKFLOW_TIMEOUT_SECONDS)")
            self._store_preview()
            try:
                opcode, data = self.ws.recv_data()
            except websocket.WebSocketTimeoutException:
                if time.monotonic() - quiet_since > QUIET_POLL_S:
                    quiet_since = time.monotonic()
                    found = self._from_history()
                    if found:
                        return self._end(found)
                    self._check_still_queued()
                continue
            except (OSError, websocket.WebSocketException) as exc:
                found = self._reconnect(exc, deadline)
                if found:
                    return self._end(found)
                continue
            if opcode == websocket.ABNF.OPCODE_BINARY:
                self._on_binary(data)
                continue
            if opcode != websocket.ABNF.OPCODE_TEXT:
                continue
            quiet_since = time.monotonic()
            terminal = self._on_message(loads_object(data))
            if terminal:
                return self._end(terminal)

    def _end(self, terminal: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        self._store_preview(force=True)
        return terminal

    def _on_message(self, message: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        kind, data = message.get("type"), message.get("data") or {}
        if not isinstance(data, dict):
            return None
        ours = data.get("prompt_id") == self.prompt_id
        if kind in TERMINAL and ours:
            return str(kind), data
        if kind == "execution_start" and ours:
            self.started = True
            self._report("ComfyUI started the workflow", "started")
        elif kind == "execution_cached" and ours:
            self.cached = [str(n) for n in data.get("nodes") or []]
            self.done.update(self.cached)
        elif kind == "executing" and (ours or ("prompt_id" not in data and self.started)):
            node = data.get("node")
            if node is None:
                return None
            if self.node is not None and self.node != str(node):
                self.done.add(self.node)
            self.node = str(node)
            self._report(f"{self._class(self.node)} (node {self.node})", f"node {self.node}")
        elif kind == "progress" and ours:
            value, maximum = _number(data.get("value")), _number(data.get("max"), 1.0)
            node = str(data.get("node") or self.node or "")
            if maximum >= 1:
                self.weights[node] = maximum
            self._report(f"{self._class(node)} (node {node}): step {value:g}/{maximum:g}", int(value),
                         int(maximum), fraction=min(1.0, value / maximum) if maximum > 0 else 0.0)
        elif kind == "executed" and ours:
            self.done.add(str(data.get("node")))
        return None

    def _class(self, node: str) -> str:
        return str((self.workflow.get(node) or {}).get("class_type", "?"))

    def _report(self, message: str, step: int | str, total: int | str = "", fraction: float = 0.0) -> None:
        """Progress as the share of the graph's steps done: finished nodes whole, the running one in part."""
        whole = sum(self.weights.values()) or 1.0
        done = sum(self.weights.get(n, 1.0) for n in self.done)
        running = 0.0 if self.node is None or self.node in self.done else fraction * self.weights.get(self.node, 1.0)
        percent = min(99.0, 100 * (done + running) / whole)
        self.job.progress(percent, message, step, total if total != "" else len(self.workflow))

    # -- previews ---------------------------------------------------------------------------------------
    def _on_binary(self, data: bytes) -> None:
        """A preview frame: event 1 (format, image) or, after the feature-flag handshake, event 4 (metadata
        with the prompt id, image). Anything else, or another prompt's, is ignored."""
        if len(data) < 8:
            return
        event, second = struct.unpack(">II", data[:8])
        if event == 1 and self.started:
            self.preview = (data[8:], PREVIEW_FORMATS.get(second, "image/jpeg"), self.node or "")
        elif event == 4 and 8 + second <= len(data):
            meta = loads_object(data[8:8 + second])
            if meta.get("prompt_id") == self.prompt_id:
                content_type = str(meta.get("image_type") or "image/jpeg")
                self.preview = (data[8 + second:], content_type, str(meta.get("node_id") or self.node or ""))

    def _store_preview(self, force: bool = False) -> None:
        if self.preview is None or (not force and time.monotonic() - self.preview_at < PREVIEW_EVERY_S):
            return
        image, content_type, node = self.preview
        self.preview, self.preview_at = None, time.monotonic()
        try:
            url = self.job.store_preview(image, content_type, node)
        except Exception as exc:  # a preview is not worth failing the job (Redis away, say)
            log.warning("preview of job %s not stored: %s", self.job.id, exc)
            return
        self.job.annotate({"comfyui_preview": url}, event="preview")

    # -- a quiet or dropped socket ---------------------------------------------------------------------
    def _check_still_queued(self) -> None:
        """A prompt in neither /queue nor /history was deleted from ComfyUI's queue (which sends no event) or,
        after the socket dropped, lost in a ComfyUI restart; two quiet polls in a row make sure it is not just
        between the two."""
        if self._queued() is not False:
            self.missing = 0
            return
        self.missing += 1
        if self.missing >= 2:
            if self.dropped:
                raise self._restarted()
            raise ConnectorError("the prompt vanished from ComfyUI (deleted from its queue while our socket "
                                 "stayed connected)")

    def _queued(self) -> bool | None:
        """Whether ComfyUI's /queue holds our prompt (None: could not tell)."""
        try:
            queue = self.c.http.json("GET", "/queue")
        except (OSError, ValueError) as exc:
            if refused(exc):
                raise self.c.unavailable("GET /queue", exc) from None
            return None
        if not isinstance(queue, dict):
            return None
        items = list(queue.get("queue_running") or []) + list(queue.get("queue_pending") or [])
        return any(isinstance(i, list) and len(i) > 1 and i[1] == self.prompt_id for i in items)

    def _restarted(self) -> ServiceUnavailable:
        """ComfyUI restarted under us (its socket dropped, and it no longer knows the prompt): the service's
        outage, not the job's failure. ComfyUI answers again, so it is not marked down."""
        log.warning("ComfyUI at %s restarted and lost prompt %s: handing the job back", self.c.http.base,
                    self.prompt_id)
        return ServiceUnavailable(f"ComfyUI at {self.c.http.base} restarted and lost the prompt (its socket "
                                  "dropped, and it knows the prompt no more); the job goes back in line")

    def _from_history(self) -> tuple[str, dict[str, Any]] | None:
        """Make up missed events from /history: a terminal status ends the wait; outputs mark nodes done."""
        try:
            entry = self.c.history(self.prompt_id)
        except (OSError, ValueError):
            return None
        if entry is None:
            return None
        status = entry.get("status") or {}
        self.done.update(str(n) for n in (entry.get("outputs") or {}))
        for kind, data in status.get("messages") or []:
            if kind in TERMINAL and isinstance(data, dict):
                self.history_entry = entry
                return str(kind), data
        if status.get("completed") or status.get("status_str") in ("success", "error"):
            self.history_entry = entry
            return ("execution_success" if status.get("status_str") == "success" else "execution_error",
                    {"prompt_id": self.prompt_id, "exception_message": "failed (from history)"})
        return None

    def _reconnect(self, exc: Exception, deadline: float) -> tuple[str, dict[str, Any]] | None:
        """Get the socket back. Refused for REFUSED_GRACE_S: ComfyUI is down (ServiceUnavailable); any other
        failure (a proxy's 503, say) is retried until the workflow's deadline. A stop ends the wait at once."""
        log.warning("ComfyUI socket dropped while following prompt %s (%s): reconnecting", self.prompt_id,
                    exc)
        self.dropped = True
        close_socket(self.ws)
        delay, refused_since = 0.1, None
        while True:
            found = self._from_history()
            if found:
                return found
            if self.job.stopped.is_set():
                self.c.stop_prompt(self.prompt_id)
                raise JobStopped(self.job.stop_reason)
            if time.monotonic() > deadline:
                raise ConnectorError(f"lost ComfyUI's WebSocket and could not get it back: {exc}")
            try:
                self.ws = self.c.open_socket_quietly()
            except (OSError, websocket.WebSocketException) as error:
                if refused(error):
                    refused_since = refused_since or time.monotonic()
                    if time.monotonic() - refused_since >= REFUSED_GRACE_S:
                        raise self.c.unavailable("its WebSocket dropped and reconnecting is refused",
                                                 error) from None
                else:
                    refused_since = None
                self.job.stopped.wait(delay)
                delay = min(delay * 2, 1.0 if refused_since else 2.0)
                continue
            log.info("ComfyUI socket back for prompt %s", self.prompt_id)
            found = self._from_history()  # anything that ended while we were reconnecting
            if found is None and self._queued() is False:
                found = self._from_history()  # it may have ended between the two looks
                if found is None:
                    raise self._restarted()
            return found


def _steps(node: Any) -> float:
    """A node's weight before it reports: its `steps` input when it has one (KSampler), else 1."""
    steps = (node.get("inputs") or {}).get("steps") if isinstance(node, dict) else None
    return float(steps) if isinstance(steps, (int, float)) and not isinstance(steps, bool) and steps >= 1 else 1.0


def _number(value: Any, default: float = 0.0) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def loads_object(raw: bytes | str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def close_socket(ws: websocket.WebSocket | None) -> None:
    if ws is not None:
        try:
            ws.close(timeout=0.2)
        except (OSError, websocket.WebSocketException):
            pass
