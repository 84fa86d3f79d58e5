"""Following one ComfyUI prompt over the WebSocket until it ends (used by connectors/comfyui.py).

Only events carrying our prompt_id count (plus the `executing` a reconnect gets without one). Progress is
reported per node; when the socket drops it reconnects, and what happened meanwhile is made up from
/history. A prompt found in neither /queue nor /history was deleted from ComfyUI's queue or lost in a restart.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import gevent
import orjson
import websocket

from appliance.connector import ConnectorError, JobContext, JobStopped

if TYPE_CHECKING:
    from connectors.comfyui import ComfyUIConnector

log = logging.getLogger(__name__)
TERMINAL = ("execution_success", "execution_error", "execution_interrupted")
QUIET_POLL_S = 2.0  # after this long without a message, look at /history and /queue


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
        self.stopping = False
        self.missing = 0

    def until_done(self, deadline: float) -> tuple[str, dict[str, Any]]:
        quiet_since = time.monotonic()
        while True:
            if self.job.stopped.is_set() and not self.stopping:
                self.stopping = True
                what = self.c.stop_prompt(self.prompt_id)
                if what != "interrupted":  # deleted before it ran, or already gone: nothing more will come
                    raise JobStopped(self.job.stop_reason)
            if time.monotonic() > deadline and not self.stopping:
                self.c.stop_prompt(self.prompt_id)
                raise ConnectorError(f"ComfyUI workflow did not finish within "
                                     f"{self.c.workflow_timeout_s:g}s "
                                     "(WORKER_COMFYUI_WORKFLOW_TIMEOUT_SECONDS)")
            try:
                opcode, data = self.ws.recv_data()
            except websocket.WebSocketTimeoutException:
                if time.monotonic() - quiet_since > QUIET_POLL_S:
                    quiet_since = time.monotonic()
                    found = self._from_history()
                    if found:
                        return found
                    self._check_still_queued()
                continue
            except (OSError, websocket.WebSocketException) as exc:
                found = self._reconnect(exc, deadline)
                if found:
                    return found
                continue
            if opcode != websocket.ABNF.OPCODE_TEXT:
                continue  # binary previews: not used
            quiet_since = time.monotonic()
            terminal = self._on_message(loads_object(data))
            if terminal:
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
            self._report(f"Running node {self.node} ({self._class(self.node)})", f"node {self.node}")
        elif kind == "progress" and ours:
            value, maximum = float(data.get("value") or 0), float(data.get("max") or 1)
            node = str(data.get("node") or self.node or "")
            self._report(f"Node {node} ({self._class(node)}): {value:g}/{maximum:g}", int(value),
                         int(maximum), fraction=value / maximum if maximum else 0)
        elif kind == "executed" and ours:
            self.done.add(str(data.get("node")))
        return None

    def _class(self, node: str) -> str:
        return str((self.workflow.get(node) or {}).get("class_type", "?"))

    def _report(self, message: str, step: int | str, total: int | str = "", fraction: float = 0.0) -> None:
        nodes = max(1, len(self.workflow))
        running = 0 if self.node is None or self.node in self.done else fraction
        percent = min(99.0, 100 * (len(self.done) + running) / nodes)
        self.job.progress(percent, message, step, total if total != "" else nodes)

    def _check_still_queued(self) -> None:
        """A prompt in neither /queue nor /history was deleted from ComfyUI's queue (which sends no event) or
        lost in a ComfyUI restart; two quiet polls in a row make sure it is not just between the two."""
        try:
            queue = self.c.http.json("GET", "/queue")
        except (OSError, ValueError):
            return
        items = list(queue.get("queue_running") or []) + list(queue.get("queue_pending") or [])
        if any(isinstance(i, list) and len(i) > 1 and i[1] == self.prompt_id for i in items):
            self.missing = 0
            return
        self.missing += 1
        if self.missing >= 2:
            raise ConnectorError("the prompt vanished from ComfyUI (deleted from its queue, or ComfyUI "
                                 "restarted)")

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
        log.warning("ComfyUI socket dropped while following prompt %s (%s): reconnecting", self.prompt_id,
                    exc)
        close_socket(self.ws)
        delay = 0.1
        while True:
            found = self._from_history()
            if found:
                return found
            if time.monotonic() > deadline or (self.job.stopped.is_set() and self.stopping):
                raise ConnectorError(f"lost ComfyUI's WebSocket and could not get it back: {exc}")
            try:
                self.ws = self.c._open_socket()
            except ConnectorError:
                gevent.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            log.info("ComfyUI socket back for prompt %s", self.prompt_id)
            return self._from_history()  # anything that ended while we were reconnecting


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
