"""The portable WebSocket driver: ``/ws/{room}`` under any ASGI server.

``livegift serve`` uses the lean driver in :mod:`livegift.api.fastws` instead; both hand
the connection's life to :class:`livegift.connection.Connection` and only move messages.
Here the ASGI server frames them: the hub hands this sink bare payloads (``str`` for
JSON, ``bytes`` for MessagePack), and one writer task per connection drains a
byte-bounded queue through ASGI ``send``. Past the bound the client is too slow (4008).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from livegift import disconnect
from livegift.admission import Slot
from livegift.api.handshake import Join, check_follow, check_join, is_follow
from livegift.connection import Connection
from livegift.disconnect import Close
from livegift.errors import LiveGiftError
from livegift.follow import Follow
from livegift.protocol import Codec, Wire, wire_for
from livegift.services import Services

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class QueueSink:
    """The hub's sink for one ASGI connection: a bounded queue and one writer task."""

    def __init__(self, send: Send, wire: Wire, limit: int) -> None:
        self._send = send
        self.wire = wire
        self.limit = limit
        self.closed = False
        self.on_close: Callable[[], None] | None = None
        self.on_slow: Callable[[], None] | None = None
        self._queue: deque[bytes | str] = deque()
        self._size = 0
        self._wake = asyncio.Event()
        self._close: tuple[int, str] | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def writer(self) -> Callable[[Any], None]:
        return self.write

    def write(self, data: bytes | str) -> None:
        if self.closed:
            return
        self._queue.append(data)
        self._size += len(data)
        self._wake.set()
        if self._size > self.limit and self.on_slow is not None:
            asyncio.get_running_loop().call_soon(self.on_slow)

    def buffered(self) -> int:
        return self._size

    def close(self, close: Close, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        if self.on_close is not None:
            self.on_close()
        self._close = (close.code, reason or close.reason)
        if close is disconnect.TOO_SLOW:
            self._queue.clear()  # it would not read them anyway
        self._wake.set()

    async def finish(self) -> None:
        """The connection is over: let a pending close go out (briefly), then stop."""
        if not self.closed:
            self.closed = True
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._task, timeout=disconnect.CLOSE_TIMEOUT)

    async def _run(self) -> None:
        key = "bytes" if self.wire.codec.binary else "text"
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                data = self._queue.popleft()
                self._size -= len(data)
                await self._send({"type": "websocket.send", key: data})
            if self._close is not None:
                code, reason = self._close
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
                return


async def refuse(send: Send, exc: LiveGiftError) -> None:
    """Refuse the handshake with an HTTP response and the PROTOCOL error body."""
    await send(
        {
            "type": "websocket.http.response.start",
            "status": exc.status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "websocket.http.response.body", "body": orjson.dumps(exc.body())})


async def websocket_endpoint(
    services: Services, scope: dict[str, Any], receive: Receive, send: Send
) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    if is_follow(scope["path"]):
        await _follow(services, scope, receive, send)
        return
    settings = services.settings
    try:
        join = check_join(
            settings, scope["path"], scope.get("query_string", b""), scope.get("headers", [])
        )
        slot = Connection.admit(services, join)  # 429 past the user's cap
    except LiveGiftError as exc:
        await refuse(send, exc)
        return
    try:
        await _serve(services, join, slot, receive, send)
    finally:
        slot.release()  # the connection gave it back already, unless accepting failed


async def _serve(services: Services, join: Join, slot: Slot, receive: Receive, send: Send) -> None:
    def make(sink: QueueSink) -> Connection:
        return Connection(services, join, sink, slot=slot)

    await _run(services, join.codec, join.subprotocol, make, receive, send)


async def _follow(services: Services, scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """``/ws/creator/{user}?key=``: a creator's overlay (livegift.follow), uncapped."""
    try:
        follow = check_follow(
            services.settings,
            scope["path"],
            scope.get("query_string", b""),
            scope.get("headers", []),
        )
    except LiveGiftError as exc:
        await refuse(send, exc)
        return

    def make(sink: QueueSink) -> Follow:
        return Follow(services, follow, sink)

    await _run(services, follow.codec, follow.subprotocol, make, receive, send)


async def _run(
    services: Services,
    codec: Codec,
    subprotocol: str | None,
    make: Callable[[QueueSink], Connection | Follow],
    receive: Receive,
    send: Send,
) -> None:
    """Accept, then the connection's life: open, ops until the client goes, closed."""
    accept: dict[str, Any] = {"type": "websocket.accept"}
    if subprotocol:
        accept["subprotocol"] = subprotocol
    await send(accept)
    limit = services.settings.send_buffer_limit
    sink = QueueSink(send, wire_for(codec, framed=False), limit)
    connection = make(sink)
    sink.on_slow = connection.too_slow
    try:
        if await connection.open():
            await _read(connection, receive)
    finally:
        connection.closed()
        await sink.finish()


async def _read(connection: Connection | Follow, receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        await connection.op(data if data is not None else message.get("text", ""))
