"""A lean WebSocket protocol for uvicorn (``--ws livegift.api.fastws:FastWebSocket``).

uvicorn hands an upgrade request to this class instead of its own WebSocket protocol. It
speaks RFC 6455 directly on the asyncio transport and talks to the session and the hub
without ASGI in between:

- an idle connection holds no task, no queue and no parsed headers: one small object, the
  transport, a member entry in its room and a session (a few KB instead of ~20 KB);
- client frames are parsed in ``data_received``; ops run one at a time per connection on
  a task that exists only while ops are waiting (reading pauses if a client floods);
- server frames are the hub's pre-encoded bytes, written by ``transport.write``;
- one timer per process pings every connection and drops the dead ones.

The portable ASGI endpoint (``livegift.api.ws``) serves any other server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import socket
import struct
import time
from collections import deque
from typing import Any, cast

import orjson

from livegift.api.handshake import Join, check_join, live_room, welcome_factory
from livegift.errors import LiveGiftError, Unavailable
from livegift.hub import Member
from livegift.metrics import CONNECTIONS
from livegift.protocol import JSON, MAX_FRAME, Codec, close_frame, ws_frame
from livegift.services import Services
from livegift.session import Session

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets ships its C speedups on CPython
    from websockets.utils import apply_mask


log = logging.getLogger("livegift.ws")

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
HANDSHAKE, OPENING, OPEN, CLOSING, CLOSED = range(5)
MAX_HANDSHAKE = 16384
MAX_QUEUED_OPS = 32
CLOSE_TIMEOUT = 5.0
SLOW_CLOSE_GRACE = 2.0
PING_INTERVAL = 20.0
REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           426: "Upgrade Required", 503: "Service Unavailable"}  # fmt: skip


class FastWebSocket(asyncio.Protocol):
    """One WebSocket connection; also the hub's sink for it."""

    __slots__ = (
        "_bad",
        "_buf",
        "_frag",
        "_frag_op",
        "_ops",
        "_task",
        "app_state",
        "closed",
        "codec",
        "join",
        "last_seen",
        "member",
        "on_close",
        "on_slow",
        "server_state",
        "services",
        "session",
        "state",
        "transport",
        "writer",
    )

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], **_: Any) -> None:
        self.server_state = server_state
        self.app_state = app_state
        self.services: Services | None = app_state.get("services")
        self.transport: asyncio.Transport | None = None
        self.state = HANDSHAKE
        self.closed = False
        self.codec: Codec = JSON
        self.on_slow: Any = None
        self.on_close: Any = None
        self.writer: Any = None
        self.join: Join | None = None
        self.member: Member | None = None
        self.session: Session | None = None
        self._buf = bytearray()
        self._frag: bytearray | None = None
        self._frag_op = 0
        self._ops: deque[bytes | str] = deque()
        self._task: asyncio.Task[None] | None = None
        self._bad = 0
        self.last_seen = time.monotonic()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.writer = self.transport.write
        self.server_state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        self._buf += data
        if self.state == HANDSHAKE:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HANDSHAKE:
                    self._http_error(400, "bad_request", "handshake too large")
                return
            request = bytes(self._buf[: end + 4])
            del self._buf[: end + 4]
            self._handshake(request)
        if self.state in (OPENING, OPEN, CLOSING):
            self._parse()

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = self.state in (OPENING, OPEN, CLOSING)
        self.state = CLOSED
        self.closed = True
        self.server_state.connections.discard(self)
        if self.services is not None:
            self.services.sockets.discard(self)
            if self.member is not None and self.join is not None:
                self.services.hub.leave(self.join.room, self.member)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._ops.clear()
        if was_open:
            CONNECTIONS.dec()

    def pause_writing(self) -> None:
        # The transport passed the send-buffer bound inside a write, maybe mid fan-out.
        if not self.closed:
            asyncio.get_running_loop().call_soon(self._too_slow)

    def resume_writing(self) -> None:
        pass

    def shutdown(self) -> None:
        """uvicorn is stopping: tell clients to come back later."""
        if self.state == HANDSHAKE and self.transport is not None:
            self.transport.close()
        else:
            self.close(1013, "server restarting")

    # -- handshake -----------------------------------------------------------------------

    def _handshake(self, request: bytes) -> None:
        services = self.services
        try:
            head, _, _ = request.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, target, _version = lines[0].split(b" ", 2)
            headers = []
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers.append((name.strip().lower(), value.strip()))
        except ValueError:
            self._http_error(400, "bad_request", "malformed handshake")
            return
        hmap = dict(headers)
        key = hmap.get(b"sec-websocket-key", b"")
        if method != b"GET" or hmap.get(b"sec-websocket-version") != b"13" or len(key) != 24:
            self._http_error(426, "bad_request", "a WebSocket version 13 upgrade is required")
            return
        if services is None:
            self._http_error(503, "unavailable", "server is starting")
            return
        path, _, query = target.partition(b"?")
        try:
            join = check_join(services.settings, path.decode("latin-1"), query, headers)
        except LiveGiftError as exc:
            self._http_error(exc.status, exc.code, exc.message)
            return
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        response = [
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
            b"Sec-WebSocket-Accept: " + accept + b"\r\n",
        ]
        if join.subprotocol:
            response.append(b"Sec-WebSocket-Protocol: " + join.subprotocol.encode() + b"\r\n")
        response.append(b"\r\n")
        assert self.transport is not None
        self.transport.write(b"".join(response))
        self.state = OPENING
        self.join = join
        self.codec = join.codec
        settings = services.settings
        sock = self.transport.get_extra_info("socket")
        if settings.socket_sndbuf and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.socket_sndbuf)
        self.transport.set_write_buffer_limits(high=settings.send_buffer_limit)
        services.sockets.add(self)
        CONNECTIONS.inc()
        self._task = asyncio.get_running_loop().create_task(self._open(services, join))

    def _http_error(self, status: int, code: str, message: str) -> None:
        body = orjson.dumps({"error": {"code": code, "message": message}})
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            + ("sec-websocket-version: 13\r\n" if status == 426 else "")
            + "connection: close\r\n\r\n"
        ).encode()
        self.state = CLOSED
        if self.transport is not None:
            self.transport.write(head + body)
            self.transport.close()

    async def _open(self, services: Services, join: Join) -> None:
        try:
            await self._join(services, join)
        finally:
            # Whatever happened (an error, or a cancellation that was not ours), a socket
            # that did not make it into its room is closed rather than left hanging.
            if self.state == OPENING:
                self.close(1011, "could not join the room")
        if self.state == OPEN:
            await self._run_ops()

    async def _join(self, services: Services, join: Join) -> None:
        try:
            info = await services.ledger.room(join.room) if join.room else None
        except Unavailable as exc:
            self.close(1013, exc.message[:100])
            return
        except LiveGiftError:
            info = None
        if not live_room(info) or info is None:
            self.close(4404, "unknown or ended room")
            return
        self.on_slow = services.hub.slow
        self.member = Member(join.user.id, self)
        self.session = Session(
            join.user,
            join.room,
            join.codec,
            services.ledger,
            services.catalog,
            services.settings.max_bad_frames,
            creator=info["creator"],
        )
        try:
            await services.ledger.remember_name(join.user)
            await services.hub.join(join.room, self.member, welcome_factory(join, info), join.since)
        except Unavailable as exc:
            self.close(1013, exc.message[:100])
            return
        except Exception:
            log.exception("join failed")
            self.close(1011, "server error")
            return
        if self.state == OPENING and not self.closed:
            self.state = OPEN

    # -- client frames -------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buf
        while self.state in (OPENING, OPEN, CLOSING) and len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            opcode, n = b0 & 0x0F, b1 & 0x7F
            pos = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, pos = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, pos = int.from_bytes(buf[2:10], "big"), 10
            if b0 & 0x70 or not b1 & 0x80:
                self._fail(1002, "protocol error: reserved bits or unmasked frame")
                return
            if opcode >= 8 and (n > 125 or not b0 & 0x80):
                self._fail(1002, "protocol error: bad control frame")
                return
            pending = len(self._frag) if self._frag is not None and opcode == 0 else 0
            if n + pending > MAX_FRAME:
                self._fail(1009, "frame too big")
                return
            end = pos + 4 + n
            if len(buf) < end:
                return
            payload = apply_mask(bytes(buf[pos + 4 : end]), bytes(buf[pos : pos + 4]))
            del buf[:end]
            self._frame(opcode, bool(b0 & 0x80), payload)

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode == 0x9:  # ping
            self._write_control(ws_frame(payload, 0xA))
        elif opcode == 0xA:  # pong
            pass
        elif opcode == 0x8:  # close
            if len(payload) == 1:
                self._fail(1002, "protocol error: close frame with a 1-byte payload")
                return
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1000
            if self.state != CLOSING:
                sendable = 1000 <= code < 5000 and code not in (1004, 1005, 1006, 1015)
                self._write_control(close_frame(code if sendable else 1000))
            self.state = CLOSING
            if not self.closed:
                self.closed = True
                if self.on_close is not None:
                    self.on_close()
            if self.transport is not None:
                self.transport.close()
        elif opcode in (0x1, 0x2):
            if self._frag is not None:
                self._fail(1002, "protocol error: expected a continuation frame")
            elif fin:
                self._message(opcode, payload)
            else:
                self._frag, self._frag_op = bytearray(payload), opcode
        elif opcode == 0x0 and self._frag is not None:
            self._frag += payload
            if fin:
                data, self._frag = bytes(self._frag), None
                self._message(self._frag_op, data)
        else:
            self._fail(1002, "protocol error: unknown opcode")

    def _message(self, opcode: int, payload: bytes) -> None:
        if self.state not in (OPENING, OPEN):
            return
        data: bytes | str = payload
        if opcode == 0x1:
            try:
                data = payload.decode()
            except UnicodeDecodeError:
                self._fail(1007, "text frame is not UTF-8")
                return
        self._ops.append(data)
        if len(self._ops) >= MAX_QUEUED_OPS and self.transport is not None:
            self.transport.pause_reading()  # a flood waits in the kernel, not here
        if self._task is None and self.state == OPEN:
            self._task = asyncio.get_running_loop().create_task(self._run_ops())

    async def _run_ops(self) -> None:
        session = self.session
        assert session is not None
        try:
            while self._ops and self.state == OPEN:
                ack = await session.handle(self._ops.popleft())
                if self.state != OPEN:
                    break
                self.write(self.codec.frame(self.codec.encode(ack)))
                if session.too_many_bad_frames:
                    self.close(1008, "too many invalid frames")
                    break
                if not self._ops and self.transport is not None:
                    self.transport.resume_reading()
        finally:
            self._task = None

    # -- sink (the hub writes through these) ---------------------------------------------

    def write(self, frame: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(frame)

    def _write_control(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def _too_slow(self) -> None:
        if not self.closed:
            if self.on_slow is not None:
                self.on_slow()
            self.close(4008, "too slow: resume with since")

    def _fail(self, code: int, reason: str) -> None:
        self.close(code, reason)
        self._buf.clear()

    def close(self, code: int, reason: str = "") -> None:
        if self.closed or self.transport is None:
            return
        self.closed = True
        if self.on_close is not None:
            self.on_close()
        if self.state in (OPENING, OPEN):
            self._write_control(close_frame(code, reason))
            self.state = CLOSING
            loop = asyncio.get_running_loop()
            grace = SLOW_CLOSE_GRACE if code == 4008 else CLOSE_TIMEOUT
            loop.call_later(grace, self.transport.abort)
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
            self._write_control(ws_frame(b"", 0x9))
