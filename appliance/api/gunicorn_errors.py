"""gunicorn's own error answers in the API's envelope.

gunicorn answers a request it cannot parse or serve by itself (400 for a malformed request, 414 for a request
line over `limit_request_line`, 431 for header fields over `limit_request_fields`/`limit_request_field_size`,
500), with an HTML page written by `gunicorn.util.write_error`; it has no setting for that page.
`install()` (called from etc/gunicorn.conf.py, in the arbiter before workers fork) replaces that function with
one that writes `{success: false, error, status, timestamp}` and quotes at most a short prefix of the request.

`SecretFilter` masks API keys and the Redis password in gunicorn's own log lines (an invalid request is logged
with its request line or header line) and in the access log.

This module stays light (no Redis, no Falcon): gunicorn's configuration imports it before workers patch with
gevent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import orjson

from appliance import clock
from appliance.errors import ECHO_CHARS


def write_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error's replacement: the same status line, a JSON envelope for body."""
    import gunicorn.util  # type: ignore[import-untyped]

    limit = ECHO_CHARS * 2
    detail = f"{reason}: {mesg[:limit]}{'…' if len(mesg) > limit else ''}" if mesg else reason
    body = orjson.dumps({"success": False, "error": detail, "status": status_int,
                         "timestamp": clock.iso(clock.now_ms())})
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


def install(max_chunk_bytes: int | None = None) -> None:
    """Make every gunicorn worker write its own error answers with `write_error`; with `max_chunk_bytes` (the
    body limit), a chunk of a chunked body declared larger than that fails at once (ChunkTooLarge, answered
    413 by the API) instead of being waited for."""
    import gunicorn.util
    from gunicorn.http.body import ChunkedReader  # type: ignore[import-untyped]

    gunicorn.util.write_error = write_error
    if max_chunk_bytes is None or getattr(ChunkedReader, "_appliance_limit", None) is not None:
        return
    parse_chunk_size = ChunkedReader.parse_chunk_size

    def limited(self: Any, unreader: Any, data: Any = None) -> Any:
        size, rest = parse_chunk_size(self, unreader, data)
        if size > max_chunk_bytes:
            raise ChunkTooLarge(size)
        return size, rest

    ChunkedReader.parse_chunk_size = limited
    ChunkedReader._appliance_limit = max_chunk_bytes


class ChunkTooLarge(Exception):
    """A chunk of a chunked request body declared larger than the API takes."""


# a `token` query parameter, however its name is percent-encoded; Bearer credentials; X-API-Key header values
_TOKEN = re.compile(r"((?:^|[?&;\s'\"])(?:t|%74)(?:o|%6f)(?:k|%6b)(?:e|%65)(?:n|%6e)(?:=|%3d))[^&;\s\"']*",
                    re.IGNORECASE)
_BEARER = re.compile(r"(bearer(?:\s|%20|\+)+)[^\s\"',;]+", re.IGNORECASE)
_API_KEY = re.compile(r"(x-api-key(?:\s|:|%3a)*)[^\s\"',;]+", re.IGNORECASE)


class SecretFilter(logging.Filter):
    """A logging filter that masks secrets in a record's message: `token=` values (percent-encoded names
    included), Bearer and X-API-Key values, and each of `secrets` (the configured keys, the Redis password)
    wherever it appears."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        text = _TOKEN.sub(r"\1***", text)
        text = _BEARER.sub(r"\1***", text)
        return _API_KEY.sub(r"\1***", text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:       # a message that cannot be formatted is left to logging's own error report
            return True
        redacted = self.redact(text)
        if redacted != text:
            record.msg, record.args = redacted, None
        return True
