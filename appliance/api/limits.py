"""Limits on what one client can make an API process do, shared by HTTP and WebSocket submits.

Each is a setting (README, Configuration) and each is answered clearly: a body too large (413), too slow (408),
nested too deep or a payload too large (400), submits too fast for one caller (429 with Retry-After; a token
bucket per API key name, or per client address without keys).
"""

from __future__ import annotations

import math
import re
import socket
import time
from typing import Any

import falcon
import gevent
import orjson
from gunicorn.http.errors import NoMoreData, ParseException  # type: ignore[import-untyped]

from appliance.api.gunicorn_errors import ChunkTooLarge
from appliance.connector import check_payload
from appliance.errors import Overloaded, ValidationError, shown
from appliance.jobs import JobSpec, json_depth_within
from appliance.settings import ApiSettings

READ_CHUNK = 65536
MAX_CALLERS = 100_000   # token buckets kept; beyond, those full again are forgotten


class TokenBuckets:
    """A token bucket per caller: `rate` per second, holding at most one second's worth (at least one)."""

    def __init__(self, rate: float, max_callers: int = MAX_CALLERS):
        self.rate = rate
        self.burst = max(1.0, rate)
        self.max_callers = max_callers
        self._buckets: dict[str, tuple[float, float]] = {}   # caller -> (tokens, when counted)

    def take(self, caller: str, now: float | None = None) -> float:
        """Take a token for `caller`: 0 if it had one, else the seconds until it will. A rate of 0 is no limit."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1:
            self._buckets[caller] = (tokens - 1, now)
            if len(self._buckets) > self.max_callers:
                self._forget_full(now)
            return 0.0
        self._buckets[caller] = (tokens, now)
        return (1 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {caller: (tokens, at) for caller, (tokens, at) in self._buckets.items()
                         if now - at < full_after}


def caller_of(key_name: str, address: str | None) -> str:
    """Who a submit is counted against: the API key's name, or (keys off) the client's address."""
    return f"key:{key_name}" if key_name else f"addr:{address or '?'}"


_LONG_DIGITS = re.compile(rb"\d{19}")


def _big_integer(value: Any, path: str) -> str | None:
    """The path of the first number orjson read from an integer beyond 64 bits (a whole float of 2^63 or more)."""
    if isinstance(value, float):
        return path if value.is_integer() and abs(value) >= 2**63 else None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _big_integer(item, (f"{path}.{key}" if path else key) if isinstance(key, str) else f"{path}[{key}]")
        if found is not None:
            return found
    return None


def _close_after(req: falcon.Request) -> None:
    """End the connection after this answer: the rest of a malformed body cannot be told from a next request.
    (gunicorn drops a Connection header the app sets; a socket shut for reading ends its keep-alive loop.)"""
    sock = req.env.get("gunicorn.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


class JsonBodies:
    """Falcon middleware: a request body (POST, PUT, PATCH, DELETE) must be `application/json` (415 otherwise).

    A web page of another origin can send a form or text/plain body without the browser asking first; a JSON
    body makes the browser ask (a CORS preflight), which the origin check answers. A body without any
    Content-Type is taken (a browser always sends one with a form)."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.method not in ("POST", "PUT", "PATCH", "DELETE"):
            return
        has_body = bool(req.content_length) or "chunked" in (req.get_header("Transfer-Encoding") or "").lower()
        media = (req.content_type or "").split(";", 1)[0].strip().lower()
        if has_body and media and media != falcon.MEDIA_JSON:
            raise falcon.HTTPUnsupportedMediaType(description=(
                f"Send the body as JSON with `Content-Type: application/json`, not {shown(media, 80)}"))


class Limits:
    """One API process's limits on submits (its token buckets are the process's own)."""

    def __init__(self, settings: ApiSettings):
        self.settings = settings
        self.submits = TokenBuckets(settings.submits_per_second)

    # -- rate ---------------------------------------------------------------------------------------------------
    def admit_submit(self, caller: str) -> None:
        """Raises Overloaded (429) when `caller` submits faster than API_SUBMITS_PER_SECOND."""
        wait_s = self.submits.take(caller)
        if wait_s > 0:
            retry = math.ceil(wait_s)
            raise Overloaded(f"Too many submits: at most {self.settings.submits_per_second:g} per second per "
                             f"{'API key' if caller.startswith('key:') else 'client'} (API_SUBMITS_PER_SECOND); "
                             f"retry in {retry} s", retry, status=429)

    # -- bodies and messages ------------------------------------------------------------------------------------
    def read_body(self, req: falcon.Request) -> bytes:
        """The request body, whole (Content-Length or chunked), within API_MAX_BODY_BYTES and arriving within
        API_BODY_TIMEOUT_SECONDS."""
        max_bytes = self.settings.max_body_bytes
        too_large = falcon.HTTPContentTooLarge(description=f"Body is larger than {max_bytes} bytes "
                                                           "(API_MAX_BODY_BYTES)")
        if req.content_length is not None and req.content_length > max_bytes:
            raise too_large
        chunked = "chunked" in (req.get_header("Transfer-Encoding") or "").lower()
        stream: Any = req.stream if req.content_length is None and chunked else req.bounded_stream
        timer = gevent.Timeout(self.settings.body_timeout_s)
        timer.start()
        parts: list[bytes] = []
        total = 0
        try:
            while total <= max_bytes:
                chunk = stream.read(min(READ_CHUNK, max_bytes + 1 - total))
                if not chunk:
                    break
                parts.append(chunk)
                total += len(chunk)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise falcon.HTTPError(falcon.HTTP_408, description=(
                f"The body did not arrive within {self.settings.body_timeout_s:g} s "
                "(API_BODY_TIMEOUT_SECONDS)")) from None
        except ChunkTooLarge:
            _close_after(req)
            raise falcon.HTTPContentTooLarge(description=f"A chunk of the body is larger than {max_bytes} bytes "
                                                         "(API_MAX_BODY_BYTES)") from None
        except (ParseException, NoMoreData) as exc:     # gunicorn's reader: a malformed chunked body
            _close_after(req)
            raise falcon.HTTPBadRequest(description=f"Malformed request body ({type(exc).__name__}); send it "
                                                    "with Content-Length or valid chunked encoding") from None
        finally:
            timer.close()
        if total > max_bytes:
            raise too_large
        return b"".join(parts)

    def parse_json(self, raw: bytes | str, field: str = "body") -> Any:
        """JSON text as a value, nested at most API_MAX_JSON_DEPTH deep (a depth the API can also write back).

        Raises:
            ValidationError: naming `field`.
        """
        if not raw.strip():
            raise ValidationError(field, "empty; send a JSON object such as {\"service_required\": \"simulation\"}")
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if "depth limit" in str(exc) or "recursion" in str(exc).lower():
                raise self._too_deep(field) from None
            if "UTF-8" in str(exc) or "surrogate" in str(exc):
                raise ValidationError(field, "not valid UTF-8; send JSON text in UTF-8") from None
            raise ValidationError(field, f"not valid JSON ({str(exc)[:120]}); send a JSON object with "
                                         "Content-Type: application/json") from None
        if not json_depth_within(value, self.settings.max_json_depth, raw):
            raise self._too_deep(field)
        if _LONG_DIGITS.search(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")):
            where = _big_integer(value, "")     # orjson reads an integer beyond 64 bits as a float: refuse it
            if where is not None:
                raise ValidationError(where or field, "integers beyond ±2^63 are not supported (they would lose "
                                                      "digits); send such a number as a string")
        return value

    def _too_deep(self, field: str) -> ValidationError:
        return ValidationError(field, f"nested deeper than {self.settings.max_json_depth} levels of arrays and "
                                      "objects (API_MAX_JSON_DEPTH)")

    def submission(self, body: Any, submitted_by: str = "", raw_size: int | None = None) -> JobSpec:
        """A checked job from a submission body: its requirements' size (at most API_MAX_REQUIREMENTS_BYTES as
        JSON), its fields (JobSpec.parse), its payload's size (at most API_MAX_PAYLOAD_BYTES as JSON) and its
        connector's payload check.

        Raises:
            ValidationError: naming the field.
        """
        requirements = body.get("requirements") if isinstance(body, dict) else None
        limit = self.settings.max_requirements_bytes
        if requirements is not None and (raw_size is None or raw_size > limit):
            size = len(orjson.dumps(requirements))
            if size > limit:
                raise ValidationError("requirements", f"{size} bytes as JSON; at most {limit} "
                                                      "(API_MAX_REQUIREMENTS_BYTES)")
        spec = JobSpec.parse(body, submitted_by=submitted_by)
        limit = self.settings.max_payload_bytes
        if raw_size is None or raw_size > limit:
            size = len(orjson.dumps(spec.payload))
            if size > limit:
                raise ValidationError("payload", f"{size} bytes as JSON; at most {limit} "
                                                 "(API_MAX_PAYLOAD_BYTES)")
        check_payload(spec.service_required, spec.payload)
        return spec
