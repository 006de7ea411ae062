"""The portable WebSocket endpoint ``/ws/{room}`` for any ASGI server.

``livegift serve`` uses the lean protocol in :mod:`livegift.api.fastws` instead. This
endpoint runs as a raw ASGI callable ahead of Starlette's middleware so that it receives
the server's own ``send``; under uvicorn's websockets-sansio protocol that lets
:mod:`livegift.writer` write pre-framed bytes straight to the transport.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from livegift.api.handshake import check_join, live_room, welcome_factory
from livegift.errors import LiveGiftError, Unavailable
from livegift.hub import Member
from livegift.metrics import CONNECTIONS
from livegift.services import Services
from livegift.session import Session
from livegift.writer import QueueSink, Sink, TransportSink

log = logging.getLogger("livegift.ws")

Scope = dict[str, Any]
Receive = Any
Send = Any


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    """Refuse the handshake with an HTTP response and the PROTOCOL error body."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})


async def websocket_endpoint(
    services: Services, scope: Scope, receive: Receive, send: Send
) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    settings = services.settings
    try:
        join = check_join(
            settings, scope["path"], scope.get("query_string", b""), scope.get("headers", [])
        )
    except LiveGiftError as exc:
        await _refuse(send, exc.status, exc.code, exc.message)
        return
    accept: dict[str, Any] = {"type": "websocket.accept"}
    if join.subprotocol:
        accept["subprotocol"] = join.subprotocol
    await send(accept)

    try:
        info = await services.ledger.room(join.room) if join.room else None
    except Unavailable as exc:
        await send({"type": "websocket.close", "code": 1013, "reason": exc.message[:100]})
        return
    except LiveGiftError:
        info = None
    if not live_room(info) or info is None:
        await send({"type": "websocket.close", "code": 4404, "reason": "unknown or ended room"})
        return

    sink: Sink
    if TransportSink.supports(send):
        sink = TransportSink(
            send.__self__, join.codec, settings.send_buffer_limit, settings.socket_sndbuf
        )
    else:
        sink = QueueSink(send, join.codec, settings.send_buffer_limit)
    sink.on_slow = services.hub.slow
    member = Member(join.user.id, sink)
    session = Session(
        join.user,
        join.room,
        join.codec,
        services.ledger,
        services.catalog,
        settings.max_bad_frames,
        creator=info["creator"],
    )
    CONNECTIONS.inc()
    try:
        await services.ledger.remember_name(join.user)
        await services.hub.join(join.room, member, welcome_factory(join, info), join.since)
        del info
        await _read_loop(session, sink, receive)
    except LiveGiftError as exc:
        sink.close(1013 if exc.code == "unavailable" else 1011, exc.message[:100])
    except Exception:
        log.exception("websocket failed")
        sink.close(1011, "server error")
    finally:
        CONNECTIONS.dec()
        services.hub.leave(join.room, member)


async def _read_loop(session: Session, sink: Sink, receive: Receive) -> None:
    codec = session.codec
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data is None:
            data = message.get("text", "")
        ack = await session.handle(data)
        sink.write(codec.frame(codec.encode(ack)))
        if session.too_many_bad_frames:
            sink.close(1008, "too many invalid frames")
