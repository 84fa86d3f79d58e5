"""API keys and origins: who may call the API, and which jobs each caller sees.

With API_KEYS or API_KEYS_FILE set, every route but /health, every SSE stream and every WebSocket path needs a
key: `Authorization: Bearer KEY`, `X-API-Key: KEY`, or `?token=KEY` (browsers' EventSource and WebSocket,
the original monitors). A plain key sees only the jobs it submitted (others' are 404, as if they did not
exist); an admin key sees everything and alone may open monitor sockets and read /api/workers. Without keys
every caller is an admin (the API then listens on loopback unless API_BIND says otherwise).

Keys are compared in constant time over all keys (SHA-256 digests, so lengths do not show either), and never
logged. A browser request from another web page (its Origin header) is refused, HTTP (403) and WebSocket alike,
unless CORS_ORIGINS names that origin, or the API has no keys and the page is on a loopback origin
(`http(s)://localhost`, `127.0.0.1`, `[::1]`, any port: monitor web apps run locally). A request without an
Origin header (not a browser) is not judged by origin.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import falcon
import orjson

from appliance import clock
from appliance.errors import JobNotFound, shown
from appliance.queue import Queue
from appliance.settings import ApiKey, ApiSettings

# open to anyone: health (details for key holders only) and the API's documentation (no data)
OPEN_ROUTES = frozenset({"/health", "/api/health", "/openapi.json", "/docs"})
ADMIN_ROUTES = frozenset({"/api/workers"})            # uri templates only an admin key may call
HOW = "send it as `Authorization: Bearer KEY`, `X-API-Key: KEY` or `?token=KEY`"


@dataclass(frozen=True)
class Identity:
    """Who a request comes from: the name of its key (recorded on the jobs it submits) and its rights."""

    name: str
    admin: bool

    def sees(self, submitted_by: str) -> bool:
        """Whether this caller may read, follow and cancel a job submitted under that key name."""
        return self.admin or submitted_by == self.name


OPEN = Identity("", True)   # no keys configured: anyone who reaches the port


class Keyring:
    """The configured keys, looked up in constant time."""

    def __init__(self, keys: Iterable[ApiKey]):
        self._entries = [(_digest(k.key), Identity(k.name, k.admin)) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def identify(self, token: str | None) -> Identity | None:
        """The identity a token belongs to (OPEN when no keys are configured), else None.

        Every key is compared, whatever matched, so the time taken tells nothing about which nor how much."""
        if not self._entries:
            return OPEN
        if not token:
            return None
        digest = _digest(token)
        found = None
        for expected, identity in self._entries:
            if hmac.compare_digest(expected, digest):
                found = identity
        return found


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def token_of(environ: Mapping[str, Any]) -> str | None:
    """The key a request carries: Authorization Bearer, X-API-Key, or the `token` query parameter."""
    header = str(environ.get("HTTP_AUTHORIZATION") or "")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = str(environ.get("HTTP_X_API_KEY") or "").strip()
    if key:
        return key
    for name, value in parse_qsl(str(environ.get("QUERY_STRING") or ""), keep_blank_values=True):
        if name == "token" and value:
            return value
    return None


class OriginMiddleware(falcon.CORSMiddleware):  # type: ignore[type-arg]
    """CORS for the allowed origins (Guard.origin_allowed), and a 403 for a browser request from any other: a
    page elsewhere must not drive the API even with a request a browser sends without asking (a form post).
    The allowed origin is echoed back (`*` only when CORS_ORIGINS says `*`); credentials are never allowed:
    keys travel in headers, not cookies."""

    def __init__(self, guard: Guard):
        super().__init__(allow_origins="*", allow_credentials=None, expose_headers=["Retry-After"])
        self.guard = guard

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self.guard.origin_allowed(req.env):
            raise falcon.HTTPForbidden(title="Origin not allowed", description=(
                f"Web pages of origin {shown(req.get_header('Origin'))} may not call this API; add the origin to "
                "CORS_ORIGINS"))

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        origin = req.get_header("Origin")
        if origin is None or not self.guard.origin_allowed(req.env):
            return
        super().process_response(req, resp, resource, req_succeeded)
        if "*" not in self.guard.origins and resp.get_header("Access-Control-Allow-Origin") is not None:
            resp.set_header("Access-Control-Allow-Origin", origin)
            resp.append_header("Vary", "Origin")


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def loopback_origin(origin: str) -> bool:
    """Whether a browser origin is a page served from this host's loopback (any port)."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and (parts.hostname or "") in LOOPBACK_HOSTS


@dataclass(frozen=True)
class Guard:
    """The keyring and allowed origins of one API process."""

    keyring: Keyring
    origins: frozenset[str]

    def origin_allowed(self, environ: Mapping[str, Any]) -> bool:
        """No Origin (not a browser), `*`, a listed origin, the API's own origin (same host and port), or
        (without keys) a loopback origin."""
        origin = str(environ.get("HTTP_ORIGIN") or "")
        if not origin or "*" in self.origins or origin in self.origins:
            return True
        if not self.keyring.enabled and loopback_origin(origin):
            return True
        netloc = urlsplit(origin).netloc
        return bool(netloc) and netloc == environ.get("HTTP_HOST")


@functools.lru_cache(maxsize=8)
def guard_for(settings: ApiSettings) -> Guard:
    return Guard(Keyring(settings.api_keys), frozenset(settings.cors_origins))


# -- HTTP ---------------------------------------------------------------------------------------------------
class AuthMiddleware:
    """Falcon middleware: identifies the caller (req.context.identity), refuses a missing or wrong key with 401,
    a plain key on an admin route with 403, and another key's job (any route with {job_id}) with 404."""

    def __init__(self, settings: ApiSettings, queue: Queue):
        self.keyring = guard_for(settings).keyring
        self.queue = queue

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        token = token_of(req.env)
        identity = self.keyring.identify(token)
        req.context.identity = identity
        if identity is not None or req.method == "OPTIONS" or req.path in OPEN_ROUTES:
            return   # CORS preflights carry no credentials; the CORS middleware answers them
        raise falcon.HTTPUnauthorized(
            title="API key required" if token is None else "API key not valid",
            description=("This API needs a key; " + HOW) if token is None else
            "The API key is not one this appliance knows (API_KEYS, API_KEYS_FILE)",
            challenges=["Bearer"])

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         params: dict[str, Any]) -> None:
        identity: Identity | None = req.context.identity
        if identity is None or identity.admin:
            return
        if req.uri_template in ADMIN_ROUTES:
            raise falcon.HTTPForbidden(title="Admin key required",
                                       description=f"{req.path} needs an admin API key")
        job_id = params.get("job_id")
        if job_id is not None:
            require_visible(identity, self.queue, job_id)


def identity_of(req: falcon.Request) -> Identity | None:
    """The caller (None: an anonymous caller of an open route while keys are configured)."""
    identity: Identity | None = getattr(req.context, "identity", OPEN)
    return identity


def submitter(req: falcon.Request) -> str:
    """The key name to record on a job this request submits ('' without keys)."""
    identity = identity_of(req)
    return identity.name if identity is not None else ""


def listing_owner(req: falcon.Request) -> str | None:
    """Whose jobs a listing shows: None (all) for an admin, else the key's own."""
    identity = identity_of(req)
    return None if identity is None or identity.admin else identity.name


def require_visible(identity: Identity, queue: Queue, job_id: str) -> None:
    """JobNotFound unless the caller may see the job (the same answer as for a job that does not exist)."""
    if not identity.admin and queue.submitter(job_id) != identity.name:
        raise JobNotFound(job_id)


# -- WebSocket ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Refusal:
    """A WebSocket handshake turned down: the HTTP status line, headers and JSON body to answer with."""

    status: str
    headers: list[tuple[str, str]]
    body: bytes


def websocket_identity(environ: Mapping[str, Any], settings: ApiSettings, monitor: bool) -> Identity | Refusal:
    """Who opens a WebSocket, or why not: 403 for an origin not allowed, 401 for a missing or wrong key, 403 for
    a plain key on a monitor socket."""
    guard = guard_for(settings)
    if not guard.origin_allowed(environ):
        return _refusal("403 Forbidden", f"Origin {shown(environ.get('HTTP_ORIGIN'))} is not allowed; add it to "
                                         "CORS_ORIGINS")
    token = token_of(environ)
    identity = guard.keyring.identify(token)
    if identity is None:
        message = ("This API needs a key; " + HOW) if token is None else "The API key is not valid"
        return _refusal("401 Unauthorized", message, [("WWW-Authenticate", "Bearer")])
    if monitor and not identity.admin:
        return _refusal("403 Forbidden", "Monitor sockets need an admin API key")
    return identity


def _refusal(status: str, error: str, headers: list[tuple[str, str]] | None = None) -> Refusal:
    body = orjson.dumps({"success": False, "error": error, "timestamp": clock.iso(clock.now_ms())})
    return Refusal(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            *(headers or [])], body)
