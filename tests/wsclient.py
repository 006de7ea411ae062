"""A small test WebSocket client over the real ``websockets`` library."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import orjson
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import unit


class Client:
    def __init__(self, ws: ClientConnection, binary: bool = False) -> None:
        self.ws = ws
        self.binary = binary
        self.buffer: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, url: str, subprotocol: str | None = "livegift.json", **kw: Any) -> Client:
        protocols = [subprotocol] if subprotocol else None
        ws = await connect(url, subprotocols=protocols, max_size=None, **kw)  # type: ignore[arg-type]
        return cls(ws, binary=subprotocol == "livegift.msgpack")

    async def send(self, op: dict[str, Any]) -> None:
        await self.ws.send(msgpack.packb(op) if self.binary else orjson.dumps(op).decode())

    async def next(self, timeout: float = 5) -> dict[str, Any]:
        while not self.buffer:
            frame = await asyncio.wait_for(self.ws.recv(), unit(timeout))
            data = msgpack.unpackb(frame) if self.binary else orjson.loads(frame)
            self.buffer.extend(data if isinstance(data, list) else [data])
        return self.buffer.pop(0)

    async def until(self, pred: Any, timeout: float = 5) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + unit(timeout)
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError("no matching event")
            event = await self.next(left)
            if pred(event):
                return event

    async def ack(self, req: str, timeout: float = 5) -> dict[str, Any]:
        return await self.until(lambda e: e.get("type") == "ack" and e.get("req") == req, timeout)

    async def gift(self, req: str, gift: str = "rose", count: int = 1) -> dict[str, Any]:
        await self.send({"op": "gift", "req": req, "gift": gift, "count": count})
        return await self.ack(req)

    async def close(self) -> None:
        await self.ws.close()
