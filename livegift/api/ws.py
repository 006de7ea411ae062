"""The WebSocket endpoint ``/ws/{room}``: bytes between the socket, the session and the hub.

It runs as a raw ASGI callable ahead of Starlette's middleware so that it receives the
server's own ``send``; under uvicorn that lets :mod:`livegift.writer` write pre-framed
bytes straight to the transport.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qs

import orjson

from livegift.auth import USER_ID, verify_token
from livegift.errors import LiveGiftError, Unauthorized, Unavailable
from livegift.hub import Member
from livegift.metrics import CONNECTIONS
from livegift.protocol import choose_codec
from livegift.services import Services
from livegift.session import Session
from livegift.writer import QueueSink, Sink, TransportSink

log = logging.getLogger("livegift.ws")

Scope = dict[str, Any]
Receive = Any
Send = Any


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _token(scope: Scope, query: dict[str, list[str]]) -> str | None:
    if query.get("token"):
        return query["token"][0]
    auth = _header(scope, b"authorization")
    if auth and auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None


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
    room = scope["path"][len("/ws/") :].strip("/")
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    settings = services.settings
    try:
        user = verify_token(settings.secret, _token(scope, query))
    except Unauthorized as exc:
        await _refuse(send, 401, exc.code, exc.message)
        return
    offered = [p.strip() for p in (_header(scope, b"sec-websocket-protocol") or "").split(",")]
    codec = choose_codec([p for p in offered if p])
    if codec is None:
        await _refuse(
            send, 400, "bad_request", "subprotocol must be livegift.json or livegift.msgpack"
        )
        return
    since: int | None = None
    if "since" in query:
        try:
            since = int(query["since"][0])
            if since < 0:
                raise ValueError
        except ValueError:
            await _refuse(send, 400, "bad_request", "since must be a non-negative integer")
            return

    accept: dict[str, Any] = {"type": "websocket.accept"}
    if any(offered):
        accept["subprotocol"] = codec.name
    await send(accept)

    try:
        info = await services.ledger.room(room) if USER_ID.match(room) else None
    except Unavailable as exc:
        await send({"type": "websocket.close", "code": 1013, "reason": exc.message[:100]})
        return
    except LiveGiftError:
        info = None
    if info is None or info.get("live") != "1":
        await send({"type": "websocket.close", "code": 4404, "reason": "unknown or ended room"})
        return

    sink: Sink
    if TransportSink.supports(send):
        sink = TransportSink(
            send.__self__, codec, settings.send_buffer_limit, settings.socket_sndbuf
        )
    else:
        sink = QueueSink(send, codec, settings.send_buffer_limit)
    sink.on_slow = services.hub.slow
    member = Member(user.id, sink)
    session = Session(
        user,
        room,
        codec,
        services.ledger,
        services.catalog,
        settings.max_bad_frames,
        creator=info["creator"],
    )
    creator = {"id": info["creator"], "name": info.get("creator_name", info["creator"])}
    del info, query, offered

    def welcome(seq: int, viewers: int) -> dict[str, Any]:
        return {
            "type": "welcome",
            "room": room,
            "you": user.public(),
            "creator": creator,
            "viewers": viewers,
            "seq": seq,
        }

    CONNECTIONS.inc()
    try:
        await services.ledger.remember_name(user)
        await services.hub.join(room, member, welcome, since)
        await _read_loop(session, sink, receive)
    except LiveGiftError as exc:
        sink.close(1013 if exc.code == "unavailable" else 1011, exc.message[:100])
    except Exception:
        log.exception("websocket failed")
        sink.close(1011, "server error")
    finally:
        CONNECTIONS.dec()
        services.hub.leave(room, member)


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
            # Let the close frame go out; uvicorn ends the socket on the peer's reply.
            await asyncio.sleep(0)
