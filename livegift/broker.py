"""Redis pub/sub and room history: one subscription per room per process.

One dedicated connection carries every room channel this process has members in. A
subscribe returns only once Redis confirms it, so a reader of the room's seq afterwards
cannot miss an event between the two. Events arrive as the JSON bytes the Lua script
published, and go to the hub untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from livegift import keys
from livegift.metrics import REDIS_ERRORS

log = logging.getLogger("livegift.broker")

OnMessage = Callable[[str, bytes], None]
OnReconnect = Callable[[], None]


class Broker:
    def __init__(self, redis: Redis, on_message: OnMessage, on_reconnect: OnReconnect) -> None:
        self.redis: Any = redis
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._pubsub: PubSub = redis.pubsub(ignore_subscribe_messages=False)
        self._rooms: dict[bytes, str] = {}
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._refs: dict[bytes, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Connect before any subscribe: concurrent first subscribes would otherwise each
        # open a connection of their own, and the reader would hear only one of them.
        await self._pubsub.connect()  # type: ignore[no-untyped-call]
        self._task = asyncio.get_running_loop().create_task(self._run(), name="broker")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def subscribe(self, room: str) -> None:
        channel = keys.channel(room).encode()
        self._rooms[channel] = room
        # Counted, so that an unsubscribe left over from a room dropped a moment ago
        # cannot cancel this newer subscription.
        self._refs[channel] = self._refs.get(channel, 0) + 1
        future = asyncio.get_running_loop().create_future()
        self._confirm[channel] = future
        async with self._lock:
            await self._pubsub.subscribe(channel)
        self._wake.set()
        await asyncio.wait_for(future, timeout=10)

    async def unsubscribe(self, room: str) -> None:
        channel = keys.channel(room).encode()
        refs = self._refs.get(channel, 0) - 1
        if refs > 0:
            self._refs[channel] = refs
            return
        self._refs.pop(channel, None)
        self._rooms.pop(channel, None)
        with contextlib.suppress(redis_errors.RedisError):
            async with self._lock:
                if channel not in self._refs:  # nobody subscribed again meanwhile
                    await self._pubsub.unsubscribe(channel)

    async def publish(self, room: str, data: bytes) -> None:
        """Publish a live (non-durable) event on the room's channel."""
        await self.redis.publish(keys.channel(room), data)

    async def latest_seq(self, room: str) -> int:
        raw = await self.redis.hget(keys.room(room), "seq")
        return int(raw or 0)

    async def history(self, room: str, after: int, upto: int | None = None) -> list[bytes]:
        """Durable events with after < seq <= upto still held in the room's history."""
        top = "+inf" if upto is None else upto
        rows = await self.redis.zrangebyscore(keys.history(room), f"({after}", top)
        return list(rows)

    async def _run(self) -> None:
        reconnecting = False
        while True:
            if not self._pubsub.subscribed:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                async for msg in self._pubsub.listen():
                    kind = msg["type"]
                    if kind == "message":
                        room = self._rooms.get(msg["channel"])
                        if room is not None:
                            self._on_message(room, msg["data"])
                    elif kind == "subscribe":
                        future = self._confirm.pop(msg["channel"], None)
                        if future is not None and not future.done():
                            future.set_result(None)
                        if reconnecting:
                            reconnecting = False
                            log.info("pub/sub reconnected")
                            self._on_reconnect()
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                REDIS_ERRORS.labels("pubsub").inc()
                if not reconnecting:
                    log.warning("pub/sub connection lost (%s); reconnecting", exc)
                reconnecting = True
                await asyncio.sleep(0.5)
