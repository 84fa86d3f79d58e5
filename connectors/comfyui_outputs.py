"""A finished ComfyUI prompt's result: its outputs from /history, their files fetched through /view and stored
for clients to download from the appliance (used by connectors/comfyui.py)."""

from __future__ import annotations

import mimetypes
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

from appliance.connector import ConnectorError, JobContext
from appliance.outputs import OutputFile, output_url, safe_name
from connectors.comfyui_http import refused

if TYPE_CHECKING:
    from connectors.comfyui import ComfyUIConnector
    from connectors.comfyui_follow import Follow


def collect_result(c: ComfyUIConnector, job: JobContext, prompt_id: str, follow: Follow,
                   elapsed_ms: int) -> dict[str, Any]:
    """The job's result after execution_success: ComfyUI's outputs, with their files stored for download."""
    entry = follow.history_entry or _history_after_success(c, job, prompt_id)
    outputs = (entry or {}).get("outputs") or {}
    files: list[OutputFile] = []
    listed: list[dict[str, Any]] = []
    total = 0
    for node_id, output in outputs.items():
        for kind, items in (output or {}).items():
            for item in items if isinstance(items, list) else []:
                if not isinstance(item, dict) or "filename" not in item:
                    continue
                data, content_type = _view(c, item)
                total += len(data)
                if total > c.max_output_bytes:
                    raise ConnectorError(f"outputs larger than WORKER_COMFYUI_MAX_OUTPUT_MB "
                                         f"({c.max_output_bytes // 1024**2} MB)", retryable=False)
                name = _unique(safe_name(f"{node_id}_{item['filename']}"), {f.name for f in files})
                files.append(OutputFile(name, content_type, data, node_id))
                listed.append({"name": name, "node": node_id, "kind": kind, "filename": item["filename"],
                               "subfolder": item.get("subfolder", ""), "type": item.get("type", "output"),
                               "content_type": content_type, "size": len(data),
                               "url": output_url(job.id, name)})
    for file in files:  # stored once all are fetched: a job over WORKER_COMFYUI_MAX_OUTPUT_MB stores none
        job.store_output(file.name, file.data, file.content_type, file.node)
    job.progress(100, "ComfyUI workflow finished", len(follow.done), len(follow.workflow))
    status = ((entry or {}).get("status") or {}).get("status_str", "success")
    return {"prompt_id": prompt_id, "status": status,
            "outputs": outputs, "files": listed, "cached_nodes": follow.cached,
            "execution_time_ms": elapsed_ms}

def _history_after_success(c: ComfyUIConnector, job: JobContext, prompt_id: str) -> dict[str, Any] | None:
    """ComfyUI writes history just after it sends execution_success: wait for it briefly."""
    deadline = time.monotonic() + min(c.timeout_s, 10)
    while True:
        try:
            entry = c.history(prompt_id)
        except (OSError, ValueError) as exc:
            if refused(exc):
                raise c.unavailable("GET /history", exc) from None
            raise ConnectorError(f"cannot read ComfyUI history: {exc}") from None
        if entry is not None or time.monotonic() > deadline:
            return entry
        job.sleep(0.05)

def _view(c: ComfyUIConnector, item: dict[str, Any]) -> tuple[bytes, str]:
    query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                    "type": item.get("type", "output")})
    try:
        status, data = c.http.call("GET", f"/view?{query}")
    except OSError as exc:
        if refused(exc):
            raise c.unavailable("GET /view", exc) from None
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
