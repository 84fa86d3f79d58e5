"""gunicorn's own error answers in the API's envelope.

gunicorn answers a request it cannot parse or serve by itself (400 for a malformed request, 414 for a request
line over `limit_request_line`, 431 for header fields over `limit_request_fields`/`limit_request_field_size`,
500), with an HTML page written by `gunicorn.util.write_error`; it has no setting for that page.
`install()` (called from etc/gunicorn.conf.py, in the arbiter before workers fork) replaces that function with
one that writes `{success: false, error, status, timestamp}` and quotes at most a short prefix of the request.

This module stays light (no Redis, no Falcon): gunicorn's configuration imports it before workers patch with
gevent.
"""

from __future__ import annotations

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


def install() -> None:
    """Make every gunicorn worker write its own error answers with `write_error`."""
    import gunicorn.util

    gunicorn.util.write_error = write_error
