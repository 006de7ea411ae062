"""The python-socketio peer, written the way its documentation shows.

``AsyncServer`` with an ``AsyncRedisManager`` (so it would scale out over
several processes), served as an ASGI app by uvicorn. A client joins the room
named in its connect query string; a ``pub`` event from a member is emitted to
the whole room, through Redis, with ``sio.emit(..., room=...)``.
"""

from __future__ import annotations

import argparse
import urllib.parse
from typing import Any

import socketio  # type: ignore[import-untyped,unused-ignore]
import uvicorn


def make_app(redis_url: str) -> Any:
    mgr = socketio.AsyncRedisManager(redis_url)
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=mgr, cors_allowed_origins="*")
    rooms: dict[str, str] = {}

    @sio.event  # type: ignore[untyped-decorator,unused-ignore]
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        qs = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        room = qs.get("room", ["lobby"])[0]
        rooms[sid] = room
        await sio.enter_room(sid, room)

    @sio.event  # type: ignore[untyped-decorator,unused-ignore]
    async def disconnect(sid: str, *args: Any) -> None:
        rooms.pop(sid, None)

    @sio.on("pub")  # type: ignore[untyped-decorator,unused-ignore]
    async def pub(sid: str, data: Any) -> None:
        await sio.emit("gift", data, room=rooms[sid])

    return socketio.ASGIApp(sio)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8002)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    a = ap.parse_args()
    uvicorn.run(
        make_app(a.redis),
        host=a.host,
        port=a.port,
        log_level="warning",
        loop="uvloop",
        http="httptools",
        ws="websockets",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
