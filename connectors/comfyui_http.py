"""A small HTTP client for ComfyUI (JSON and multipart uploads, optional basic auth), used by connectors/comfyui.py."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from typing import Any

import orjson


class Http:
    """JSON over HTTP to one ComfyUI."""

    def __init__(self, base: str, auth_header: str, timeout_s: float):
        self.base, self.auth_header, self.timeout_s = base, auth_header, timeout_s

    def call(self, method: str, path: str, body: Any = None, timeout_s: float | None = None,
             raw: bytes | None = None, content_type: str = "") -> tuple[int, bytes]:
        """(status, body); raises OSError when ComfyUI cannot be reached (see `refused`)."""
        data = orjson.dumps(body) if body is not None else raw
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", content_type or "application/json")
        if self.auth_header:
            request.add_header("Authorization", self.auth_header)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, method: str, path: str, body: Any = None, timeout_s: float | None = None) -> Any:
        status, raw = self.call(method, path, body, timeout_s)
        if status != 200:
            raise OSError(f"ComfyUI {method} {path} answered {status}: {raw[:200]!r}")
        return orjson.loads(raw) if raw else {}

    def upload_image(self, name: str, data: bytes, subfolder: str) -> dict[str, Any]:
        """POST /upload/image (multipart, as ComfyUI's own front end sends it); returns ComfyUI's answer
        {name, subfolder, type}. Raises OSError when it cannot be reached or refuses the file."""
        boundary = uuid.uuid4().hex
        parts = [(b'Content-Disposition: form-data; name="image"; filename="%s"\r\n'
                  b"Content-Type: application/octet-stream\r\n\r\n" % name.encode(), data)]
        for field, value in (("subfolder", subfolder), ("type", "input"), ("overwrite", "true")):
            parts.append((b'Content-Disposition: form-data; name="%s"\r\n\r\n' % field.encode(), value.encode()))
        body = b"".join(b"--%s\r\n%s%s\r\n" % (boundary.encode(), head, value) for head, value in parts)
        body += b"--%s--\r\n" % boundary.encode()
        status, raw = self.call("POST", "/upload/image", raw=body,
                                content_type=f"multipart/form-data; boundary={boundary}")
        if status != 200:
            raise OSError(f"ComfyUI POST /upload/image of {name} answered {status}: {raw[:200]!r}")
        reply = orjson.loads(raw)
        if not isinstance(reply, dict) or not isinstance(reply.get("name"), str):
            raise OSError(f"ComfyUI POST /upload/image of {name} answered {raw[:200]!r}")
        return reply


def refused(exc: BaseException) -> bool:
    """Whether a failed call means nothing listens at ComfyUI's address (connection refused): it is down."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        reason = getattr(seen, "reason", None)
        seen = reason if isinstance(reason, BaseException) else (seen.__cause__ or seen.__context__)
    return False
