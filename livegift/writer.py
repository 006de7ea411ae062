"""Per-connection write paths: pre-framed bytes in, no coroutine per message.

The hub calls :meth:`Sink.write` for every member of a room with the same frame bytes.
Under uvicorn's ``websockets-sansio`` protocol, :class:`TransportSink` writes them straight
to the connection's asyncio transport: one ``transport.write`` per member per batch, no
ASGI message dict, no await. A connection whose unsent bytes pass the bound is closed
with 4008 at once, so a reader that stalls can never hold the room back or grow memory.

Any other ASGI server gets :class:`QueueSink`: one writer task per connection draining a
byte-bounded queue through ASGI ``send``, with the same bound and close code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from livegift.protocol import Codec

log = logging.getLogger("livegift.writer")

SLOW_CLOSE_GRACE = 2.0
TOO_SLOW = 4008


class Sink(Protocol):
    codec: Codec
    closed: bool
    on_slow: Callable[[], None] | None
    on_close: Callable[[], None] | None

    @property
    def writer(self) -> Callable[[bytes], None]:
        """The cheapest callable that writes one frame (what the hub's fan-out loop calls)."""
        ...

    def write(self, frame: bytes) -> None: ...

    def close(self, code: int, reason: str = "") -> None: ...


class TransportSink:
    """Writes frames to the transport under uvicorn's sans-I/O websockets protocol.

    The fan-out loop calls ``transport.write`` itself (see :attr:`writer`). The bound on
    unsent bytes is the transport's own high-water mark: when a write passes it, the
    transport calls ``pause_writing``, which here schedules a 4008 close.
    """

    __slots__ = ("_proto", "_transport", "closed", "codec", "limit", "on_close", "on_slow")

    def __init__(self, proto: Any, codec: Codec, limit: int, sndbuf: int = 0) -> None:
        self._proto = proto
        self._transport: asyncio.Transport = proto.transport
        self.codec = codec
        self.limit = limit
        self.closed = False
        self.on_slow: Callable[[], None] | None = None
        self.on_close: Callable[[], None] | None = None
        # The handshake is over: uvicorn no longer needs its parsed request and response.
        proto.request = proto.response = None
        sock = self._transport.get_extra_info("socket")
        if sndbuf and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self._transport.set_write_buffer_limits(high=limit)
        proto.pause_writing = self._paused

    @staticmethod
    def supports(send: Any) -> bool:
        proto = getattr(send, "__self__", None)
        return (
            proto is not None
            and type(proto).__name__ == "WebSocketsSansIOProtocol"
            and hasattr(proto, "conn")
            and hasattr(proto, "transport")
        )

    @property
    def writer(self) -> Callable[[bytes], None]:
        return self._transport.write

    def write(self, frame: bytes) -> None:
        if not self.closed:
            self._transport.write(frame)

    def _paused(self) -> None:
        # Called from inside transport.write, possibly mid fan-out: close on the next tick.
        if not self.closed:
            asyncio.get_running_loop().call_soon(self._too_slow)

    def _too_slow(self) -> None:
        if self.closed:
            return
        if self.on_slow is not None:
            self.on_slow()
        self.close(TOO_SLOW, "too slow: resume with since")

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame now, bypassing ASGI's send (which waits while paused)."""
        if self.closed:
            return
        self.closed = True
        if self.on_close is not None:
            self.on_close()
        proto, transport = self._proto, self._transport
        if proto.close_sent or transport.is_closing():
            return
        try:
            proto.conn.send_close(code, reason)
            transport.write(b"".join(proto.conn.data_to_send()))
        except Exception:  # the peer already went away
            transport.abort()
            return
        proto.close_sent = True
        proto.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        if proto.read_paused:
            proto.read_paused = False
            transport.resume_reading()
        loop = asyncio.get_running_loop()
        if code == TOO_SLOW:
            # The peer is not reading; it may never drain the close frame either.
            loop.call_later(SLOW_CLOSE_GRACE, transport.abort)
        else:
            loop.call_later(proto.close_timeout, transport.close)


class QueueSink:
    """Portable fallback: a byte-bounded queue and one writer task per connection."""

    def __init__(
        self, send: Callable[[dict[str, Any]], Awaitable[None]], codec: Codec, limit: int
    ) -> None:
        self._send = send
        self.codec = codec
        self.limit = limit
        self.closed = False
        self.on_slow: Callable[[], None] | None = None
        self.on_close: Callable[[], None] | None = None
        self._queue: deque[bytes] = deque()
        self._size = 0
        self._wake = asyncio.Event()
        self._close_code: int | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    def write(self, frame: bytes) -> None:
        if self.closed:
            return
        self._queue.append(frame)
        self._size += len(frame)
        self._wake.set()
        if self._size > self.limit:
            asyncio.get_running_loop().call_soon(self._too_slow)

    def _too_slow(self) -> None:
        if not self.closed:
            if self.on_slow is not None:
                self.on_slow()
            self.close(TOO_SLOW, "too slow: resume with since")

    @property
    def writer(self) -> Callable[[bytes], None]:
        return self.write

    def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        if self.on_close is not None:
            self.on_close()
        self._close_code = code
        if code == TOO_SLOW:
            self._queue.clear()
        self._wake.set()

    async def _run(self) -> None:
        key = "bytes" if self.codec.binary else "text"
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                frame = self._queue.popleft()
                self._size -= len(frame)
                payload = _unframe(frame)
                with contextlib.suppress(Exception):
                    await self._send(
                        {
                            "type": "websocket.send",
                            key: payload if self.codec.binary else payload.decode(),
                        }
                    )
            if self._close_code is not None:
                with contextlib.suppress(Exception):
                    await self._send({"type": "websocket.close", "code": self._close_code})
                return


def _unframe(frame: bytes) -> bytes:
    """The payload of a frame built by protocol.ws_frame."""
    n = frame[1] & 0x7F
    return frame[2 + (0 if n < 126 else 2 if n == 126 else 8) :]
