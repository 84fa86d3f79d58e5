"""A small WebSocket server connection on wsproto over the socket gunicorn's gevent worker hands us.

`WebSocket.accept(environ)` completes the handshake (or raises HandshakeError for a 400), `receive()` returns
the next whole text (str) or binary (bytes) message, or None once the connection is closed; pings are
answered and sent while waiting. `send()` may be called from any greenlet (one lock per connection) and
always uses sendall. Messages over the size limit close the connection with 1009, frames it cannot accept
(invalid UTF-8 text: 1007; a reserved opcode, RSV bits, an unmasked client frame: 1002) with their code, at once.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import gevent
import gevent.lock
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Message, Ping, Pong, Request, TextMessage
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

log = logging.getLogger(__name__)

RECV_BYTES = 65536
CLOSE_WAIT_S = 2.0

# close codes
NORMAL, GOING_AWAY, PROTOCOL_ERROR, POLICY, TOO_BIG, INTERNAL = 1000, 1001, 1002, 1008, 1009, 1011


def text_frame(text: str) -> bytes:
    """One whole, unmasked server text frame (no extension is negotiated), built once and sent to many."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 65536:
        head = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return head + payload


class HandshakeError(Exception):
    """The upgrade request is not a valid WebSocket handshake."""


def request_head(environ: dict[str, Any]) -> bytes:
    """The HTTP/1.1 request head, rebuilt from a WSGI environ, for wsproto to parse."""
    path = environ.get("RAW_URI") or environ.get("PATH_INFO") or "/"
    if not environ.get("RAW_URI") and environ.get("QUERY_STRING"):
        path += "?" + environ["QUERY_STRING"]
    lines = [f"GET {path} HTTP/1.1"]
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            lines.append(f"{key[5:].replace('_', '-').title()}: {value}")
    if "HTTP_HOST" not in environ:
        lines.append(f"Host: {environ.get('SERVER_NAME', 'localhost')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class WebSocket:
    """One accepted WebSocket connection."""

    def __init__(self, sock: socket.socket, conn: WSConnection, path: str, max_message_bytes: int,
                 ping_interval_s: float):
        self.sock = sock
        self.conn = conn
        self.path = path
        self.max_message_bytes = max_message_bytes
        self.ping_interval_s = ping_interval_s
        self.close_code: int | None = None
        self.close_reason = ""
        self._lock = gevent.lock.Semaphore()
        self._parts: list[str | bytes] = []
        self._size = 0
        self._pending: list[str | bytes] = []
        self._closing_since: float | None = None
        self._last_heard = time.monotonic()
        self._failed = False          # a protocol error or an oversized message: closed, nothing more is read

    @classmethod
    def accept(cls, environ: dict[str, Any], max_message_bytes: int, ping_interval_s: float) -> WebSocket:
        sock = environ.get("gunicorn.socket")
        if sock is None:
            raise HandshakeError("WebSocket needs the appliance's gunicorn server (no raw socket here)")
        conn = WSConnection(ConnectionType.SERVER)
        try:
            conn.receive_data(request_head(environ))
            request = next((e for e in conn.events() if isinstance(e, Request)), None)
        except RemoteProtocolError as exc:
            raise HandshakeError(f"Invalid WebSocket handshake: {exc}") from None
        if request is None:
            raise HandshakeError("Invalid WebSocket handshake: incomplete upgrade request")
        # browsers fail the connection unless one of the subprotocols they offer comes back
        subprotocol = request.subprotocols[0] if request.subprotocols else None
        sock.sendall(conn.send(AcceptConnection(subprotocol=subprotocol)))
        return cls(sock, conn, environ.get("PATH_INFO") or "/", max_message_bytes, ping_interval_s)

    @property
    def open(self) -> bool:
        return self.conn.state is ConnectionState.OPEN

    @property
    def busy(self) -> bool:
        """Whether a write is under way (another greenlet holds the lock, maybe waiting on the socket)."""
        return bool(self._lock.locked())

    @property
    def direct_ok(self) -> bool:
        """Whether frames may be written to the OS socket directly (a plain, non-TLS socket)."""
        return type(self.sock).__name__ == "socket"

    # -- sending -------------------------------------------------------------------------------------------
    def _write(self, event: Any) -> bool:
        with self._lock:
            try:
                data = self.conn.send(event)
                self.sock.sendall(data)
                return True
            except (LocalProtocolError, OSError):
                return False

    def send(self, text: str) -> bool:
        """Send one text message; False if the connection is no longer open."""
        if not self.open:
            return False
        return self._write(TextMessage(data=text))

    def send_frame(self, frame: bytes) -> bool:
        """Send whole text frames made by `text_frame` (the same bytes go to every subscriber of an event)."""
        if not self.open:
            return False
        with self._lock:
            try:
                self.sock.sendall(frame)
                return True
            except OSError:
                return False

    def close(self, code: int = NORMAL, reason: str = "") -> None:
        """Start the closing handshake (receive() returns None once the peer answers, or after a grace)."""
        if self.conn.state is not ConnectionState.OPEN:
            return
        self.close_code, self.close_reason = code, reason
        self._closing_since = time.monotonic()
        self._write(CloseConnection(code=code, reason=reason[:120]))

    def abort(self) -> None:
        """Cut the TCP connection (a peer that reads nothing cannot even take a close frame)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- receiving -----------------------------------------------------------------------------------------
    def receive(self) -> str | bytes | None:
        """The next whole message, or None when the connection has closed."""
        while True:
            if self._pending:
                return self._pending.pop(0)
            if self.conn.state is ConnectionState.CLOSED:
                return None
            if self._closing_since is not None and time.monotonic() - self._closing_since > CLOSE_WAIT_S:
                return None
            timeout = self.ping_interval_s if self._closing_since is None else CLOSE_WAIT_S
            self.sock.settimeout(timeout)
            try:
                data = self.sock.recv(RECV_BYTES)
            except TimeoutError:
                if self._closing_since is not None:
                    return None
                if time.monotonic() - self._last_heard > 2 * self.ping_interval_s:
                    self.close(POLICY, "ping timeout")
                    return None
                self._write(Ping(b"appliance"))
                continue
            except OSError:
                return None
            if not data:
                return None
            self._last_heard = time.monotonic()
            try:
                self.conn.receive_data(data)
                self._handle_events()
            except RemoteProtocolError as exc:
                log.info("WebSocket protocol error on %s: %s", self.path, exc)
                if exc.event_hint is not None:
                    self._write(exc.event_hint)
                return None
            if self._failed:
                return None

    def _handle_events(self) -> None:
        for event in self.conn.events():
            if isinstance(event, Ping):
                self._write(event.response())
            elif isinstance(event, Pong):
                continue
            elif isinstance(event, CloseConnection):
                if self.conn.state is ConnectionState.OPEN:
                    # wsproto reports a frame it cannot accept (invalid UTF-8: 1007; a reserved opcode, RSV bits,
                    # an unmasked client frame: 1002) as a close event without closing: close with that code now
                    log.info("WebSocket protocol error on %s: %s (%s)", self.path, event.reason, event.code)
                    self.close(event.code, event.reason or "protocol error")
                    self._failed = True
                    return
                if self.close_code is None:
                    self.close_code, self.close_reason = event.code, event.reason or ""
                if self.conn.state is ConnectionState.REMOTE_CLOSING:
                    self._write(event.response())
                return
            elif isinstance(event, Message):
                self._add_part(event)

    def _add_part(self, event: Message[Any]) -> None:
        self._size += len(event.data)
        if self._size > self.max_message_bytes:
            self._parts, self._size = [], 0
            self.close(TOO_BIG, f"message larger than {self.max_message_bytes} bytes (API_WS_MAX_MESSAGE_BYTES)")
            self._failed = True
            return
        if self._closing_since is not None:
            return
        self._parts.append(event.data)
        if event.message_finished:
            if isinstance(event, TextMessage):
                whole: str | bytes = "".join(p for p in self._parts if isinstance(p, str))
            else:
                whole = b"".join(p for p in self._parts if isinstance(p, bytes))
            self._parts, self._size = [], 0
            self._pending.append(whole)
