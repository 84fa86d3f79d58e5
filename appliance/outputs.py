"""Files a job produced (ComfyUI images, ...), kept in Redis so that clients download them from the API.

One hash per job (`outputs:{job_id}`): file name → JSON {content_type, size, node, data (base64)}. It expires
with the job's retention (JOB_COMPLETED_TTL_SECONDS), counted from when the files are stored. A running job's
latest preview image (ComfyUI's live previews) is one string (`preview:{job_id}`) with a short TTL
(PREVIEW_TTL_S), replaced by each new one.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from redis.typing import EncodableT

from appliance.keys import Keys

PREVIEW_TTL_S = 300  # a preview outlives its job's run only briefly
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A file name usable in a URL path segment: letters, digits, '.', '_' and '-' only."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "output"
    return cleaned[:200]


@dataclass(frozen=True)
class OutputFile:
    name: str
    content_type: str
    data: bytes
    node: str = ""


class OutputStore:
    """Stores and reads a job's output files."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int):
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s

    def put(self, job_id: str, files: list[OutputFile]) -> None:
        if not files:
            return
        key = self.keys.job_outputs(job_id)
        mapping: dict[EncodableT, EncodableT] = {
            f.name: orjson.dumps({"content_type": f.content_type, "size": len(f.data), "node": f.node,
                                  "data": base64.b64encode(f.data).decode()}).decode() for f in files}
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def get(self, job_id: str, name: str) -> OutputFile | None:
        text = self.client.hget(self.keys.job_outputs(job_id), name)
        if not text:
            return None
        record: dict[str, Any] = orjson.loads(text)
        return OutputFile(name, str(record.get("content_type") or "application/octet-stream"),
                          base64.b64decode(record["data"]), str(record.get("node") or ""))


    def put_preview(self, job_id: str, data: bytes, content_type: str, node: str = "") -> None:
        """Store a running job's latest preview image, replacing the one before (expires after PREVIEW_TTL_S)."""
        record = orjson.dumps({"content_type": content_type, "node": node, "data": base64.b64encode(data).decode()})
        self.client.set(self.keys.job_preview(job_id), record, ex=PREVIEW_TTL_S)

    def get_preview(self, job_id: str) -> OutputFile | None:
        text = self.client.get(self.keys.job_preview(job_id))
        if not text:
            return None
        record: dict[str, Any] = orjson.loads(text)
        content_type = str(record.get("content_type") or "application/octet-stream")
        extension = {"image/png": "png", "image/webp": "webp"}.get(content_type, "jpg")
        return OutputFile(f"preview.{extension}", content_type, base64.b64decode(record["data"]),
                          str(record.get("node") or ""))


def output_url(job_id: str, name: str) -> str:
    """Where a client downloads a job's output file from the appliance's API."""
    return f"/api/jobs/{job_id}/outputs/{name}"


def preview_url(job_id: str) -> str:
    """Where a client gets a running job's latest preview image from the appliance's API."""
    return f"/api/jobs/{job_id}/preview"
