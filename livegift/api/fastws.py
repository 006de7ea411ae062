"""The lean WebSocket driver for uvicorn (``--ws livegift.api.fastws:FastWebSocket``).

uvicorn hands an upgrade request to this class instead of its own WebSocket protocol.
It only moves bytes between the asyncio transport and the connection core:

- the handshake and every client frame are parsed by :mod:`livegift.rfc6455` (pure);
- the connection's life (join, ops, acks, leave) is :class:`livegift.connection.Connection`;
- this object is the hub's :class:`~livegift.hub.Sink` for the socket: the hub writes
  pre-built frames with ``transport.write`` itself, and a transport past its high-water
  mark (the client does not read) is closed with 4008 on the next tick;
- an idle connection holds no task, no queue and no parsed headers; one timer per process
  pings every connection and drops the dead ones.

The portable ASGI driver (:mod:`livegift.api.ws`) serves any other server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any, cast

import orjson

from livegift import disconnect, rfc6455
from livegift.api.handshake import check_follow, check_join, is_follow
from livegift.connection import Connection
from livegift.disconnect import Close
from livegift.errors import LiveGiftError, Unavailable, error_body
from livegift.follow import Follow
from livegift.protocol import JSON_FRAMES, Codec, Wire, wire_for
from livegift.services import Services

HANDSHAKE, OPEN, CLOSING, CLOSED = range(4)


class FastWebSocket(asyncio.Protocol):
    """One WebSocket connection: the driver of its Connection and the hub's sink for it."""

    __slots__ = (
        "_head",
        "app_state",
        "closed",
        "connection",
        "last_seen",
        "on_close",
        "parser",
        "server_state",
        "services",
        "state",
        "transport",
        "wire",
    )

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], **_: Any) -> None:
        self.server_state = server_state
        self.app_state = app_state
        self.services: Services | None = app_state.get("services")
        self.transport: asyncio.Transport | None = None
        self.state = HANDSHAKE
        self.closed = False
        self.wire: Wire = JSON_FRAMES
        self.on_close: Any = None
        self.connection: Connection | Follow | None = None
        self.parser: rfc6455.FrameParser | None = None
        self._head: bytearray | None = bytearray()
        self.last_seen = time.monotonic()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server_state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        if self.state == HANDSHAKE:
            data = self._handshake_data(data)
        if self.parser is not None and data:
            for event in self.parser.feed(data):
                self._event(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self.closed = True
        self.server_state.connections.discard(self)
        if self.services is not None:
            self.services.sockets.discard(self)
        if self.connection is not None:
            self.connection.closed()

    def pause_writing(self) -> None:
        # The transport passed the send-buffer bound inside a write, maybe mid fan-out.
        if not self.closed and self.connection is not None:
            asyncio.get_running_loop().call_soon(self.connection.too_slow)

    def resume_writing(self) -> None:
        pass

    def shutdown(self) -> None:
        """uvicorn is stopping: tell clients to come back later."""
        if self.state == HANDSHAKE and self.transport is not None:
            self.transport.close()
        else:
            self.close(disconnect.TRY_AGAIN_LATER, "server restarting")

    # -- Flow (the connection pauses reading while a client's ops pile up) ----------------

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.state == OPEN:
            self.transport.resume_reading()

    # -- handshake -----------------------------------------------------------------------

    def _handshake_data(self, data: bytes) -> bytes:
        """Gather the request head; once complete, answer it. Returns the bytes after it."""
        head = self._head
        assert head is not None
        head += data
        try:
            rfc6455.check_partial(head)
            end = head.find(b"\r\n\r\n")
            if end < 0:
                return b""
            upgrade = rfc6455.parse_upgrade(head)
        except rfc6455.HandshakeError as exc:
            self._http_error(exc.status, error_body(exc.code, exc.message))
            return b""
        rest, self._head = bytes(head[end + 4 :]), None
        self._accept(upgrade)
        return rest

    def _accept(self, upgrade: rfc6455.Upgrade) -> None:
        services = self.services
        if services is None:
            self._http_error(503, Unavailable("server is starting").body())
            return
        if is_follow(upgrade.path.decode("latin-1")):
            self._accept_follow(services, upgrade)
            return
        try:
            join = check_join(
                services.settings, upgrade.path.decode("latin-1"), upgrade.query, upgrade.headers
            )
            slot = Connection.admit(services, join)  # 429 past the user's cap
        except LiveGiftError as exc:
            self._http_error(exc.status, exc.body())
            return
        self._upgrade(services, upgrade, join.codec, join.subprotocol)
        self.connection = Connection(services, join, self, flow=self, slot=slot)
        self.connection.start()

    def _accept_follow(self, services: Services, upgrade: rfc6455.Upgrade) -> None:
        """``/ws/creator/{user}?key=``: a creator's overlay (livegift.follow), uncapped."""
        try:
            follow = check_follow(
                services.settings, upgrade.path.decode("latin-1"), upgrade.query, upgrade.headers
            )
        except LiveGiftError as exc:
            self._http_error(exc.status, exc.body())
            return
        self._upgrade(services, upgrade, follow.codec, follow.subprotocol)
        self.connection = Follow(services, follow, self, flow=self)
        self.connection.start()

    def _upgrade(
        self, services: Services, upgrade: rfc6455.Upgrade, codec: Codec, subprotocol: str | None
    ) -> None:
        """Answer 101 Switching Protocols and get ready for frames."""
        transport = self.transport
        assert transport is not None
        transport.write(rfc6455.accept_response(upgrade.key, subprotocol))
        self.state = OPEN
        self.wire = wire_for(codec, framed=True)
        self.parser = rfc6455.FrameParser()
        settings = services.settings
        sock = transport.get_extra_info("socket")
        if settings.socket_sndbuf and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.socket_sndbuf)
        transport.set_write_buffer_limits(high=settings.send_buffer_limit)
        services.sockets.add(self)

    def _http_error(self, status: int, body: dict[str, Any]) -> None:
        self.state = CLOSED
        self._head = None
        if self.transport is not None:
            self.transport.write(rfc6455.refusal(status, orjson.dumps(body)))
            self.transport.close()

    # -- client frames -------------------------------------------------------------------

    def _event(self, event: rfc6455.Event) -> None:
        if isinstance(event, rfc6455.Message):
            if self.state == OPEN and self.connection is not None:
                self.connection.receive(event.data)
        elif isinstance(event, rfc6455.Ping):
            self._write_control(rfc6455.frame(event.payload, rfc6455.OP_PONG))
        elif isinstance(event, rfc6455.CloseReceived):
            if self.state != CLOSING:
                self._write_control(rfc6455.close_reply(event))
            self._done()
        elif isinstance(event, rfc6455.Fail):
            # §7.1.7: fail the connection; nothing more is read or processed.
            self.close(event.close, event.reason)
            self._done()

    def _done(self) -> None:
        """The closing handshake is over (or failed): close TCP once the close is sent."""
        self.state = CLOSING
        if not self.closed:
            self.closed = True
            if self.on_close is not None:
                self.on_close()
        if self.transport is not None:
            self.transport.close()

    # -- sink (the hub writes through these) ---------------------------------------------

    @property
    def writer(self) -> Any:
        assert self.transport is not None
        return self.transport.write

    def write(self, data: bytes | str) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(cast(bytes, data))

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def _write_control(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def close(self, close: Close, reason: str = "") -> None:
        if self.closed or self.transport is None:
            return
        self.closed = True
        if self.on_close is not None:
            self.on_close()
        if self.state == OPEN:
            self._write_control(rfc6455.close_frame(close.code, reason or close.reason))
            self.state = CLOSING
            grace = (
                disconnect.SLOW_CLOSE_GRACE
                if close is disconnect.TOO_SLOW
                else disconnect.CLOSE_TIMEOUT
            )
            asyncio.get_running_loop().call_later(grace, self.transport.abort)
            with contextlib.suppress(Exception):
                self.transport.resume_reading()  # to read the peer's closing handshake

    def keepalive(self, now: float, interval: float) -> None:
        """Ping an idle peer; drop one that has been silent for two intervals."""
        if self.state != OPEN or self.transport is None:
            return
        silent = now - self.last_seen
        if silent > 2 * interval:
            self.transport.abort()
        elif silent > interval / 2:
            self._write_control(rfc6455.frame(b"", rfc6455.OP_PING))
