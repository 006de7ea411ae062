"""Redis pub/sub and room history: one subscription per room per process.

One dedicated connection carries every room channel this process has members in, and the
few other channels it listens to (a followed creator's feed, :mod:`livegift.follow`). A
subscribe returns only once Redis confirms it, so a reader of the room's seq afterwards
cannot miss an event between the two. Events arrive as the JSON bytes the Lua script
published, and go to the hub untouched.

On a Redis Cluster the subscription is still classic SUBSCRIBE (a PUBLISH on any node,
also from a Lua script, reaches subscribers on every node) on a plain client to one
node, from ``subscriber``; when that connection is lost the broker subscribes again
through the next node, and the hub refills its rooms from history as after any
reconnect. Room reads (seq, history) go through the store client (``redis``).
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
from livegift.errors import Unavailable
from livegift.metrics import REDIS_ERRORS
from livegift.scripts import store_errors

log = logging.getLogger("livegift.broker")

OnMessage = Callable[[str, bytes], None]
OnReconnect = Callable[[], None]
OnData = Callable[[bytes], None]


class Broker:
    # How long a subscribe waits for the data store to confirm it.
    confirm_timeout = 10.0

    def __init__(
        self,
        redis: Any,
        on_message: OnMessage,
        on_reconnect: OnReconnect,
        subscriber: Callable[[], Redis] | None = None,
    ) -> None:
        self.redis: Any = redis
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        # None: pub/sub through ``redis`` itself, which reconnects to the same server.
        self._subscriber = subscriber
        self._sub_client: Redis = subscriber() if subscriber is not None else redis
        self._pubsub: PubSub = self._sub_client.pubsub(ignore_subscribe_messages=False)
        self._rooms: dict[bytes, str] = {}
        # Channels that are not a room's: what to call with a message and after a reconnect.
        self._channels: dict[bytes, tuple[OnData, OnReconnect]] = {}
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
        if self._subscriber is not None:
            with contextlib.suppress(Exception):
                await self._sub_client.aclose()

    async def subscribe(self, room: str) -> None:
        channel = keys.channel(room).encode()
        self._rooms[channel] = room
        await self._subscribe(channel)

    async def unsubscribe(self, room: str) -> None:
        channel = keys.channel(room).encode()
        if self._release(channel):
            self._rooms.pop(channel, None)
            await self._unsubscribe(channel)

    async def listen(self, channel: str, on_data: OnData, on_reconnect: OnReconnect) -> None:
        """Subscribe to a channel that is not a room's. ``on_reconnect`` is called after
        pub/sub comes back, since messages published meanwhile are lost."""
        raw = channel.encode()
        self._channels[raw] = (on_data, on_reconnect)
        await self._subscribe(raw)

    async def unlisten(self, channel: str) -> None:
        raw = channel.encode()
        if self._release(raw):
            self._channels.pop(raw, None)
            await self._unsubscribe(raw)

    async def _subscribe(self, channel: bytes) -> None:
        # Counted, so that an unsubscribe left over from a room dropped a moment ago
        # cannot cancel this newer subscription.
        self._refs[channel] = self._refs.get(channel, 0) + 1
        future = asyncio.get_running_loop().create_future()
        self._confirm[channel] = future
        try:
            with store_errors():
                async with self._lock:
                    await self._pubsub.subscribe(channel)
                self._wake.set()
                await asyncio.wait_for(future, timeout=self.confirm_timeout)
        except TimeoutError:
            # A join waiting on this answers 1013, like any other data-store outage.
            raise Unavailable("the data store did not confirm the subscription") from None

    def _release(self, channel: bytes) -> bool:
        """Drop one reference; True when it was the last."""
        refs = self._refs.get(channel, 0) - 1
        if refs > 0:
            self._refs[channel] = refs
            return False
        self._refs.pop(channel, None)
        return True

    async def _unsubscribe(self, channel: bytes) -> None:
        with contextlib.suppress(redis_errors.RedisError):
            async with self._lock:
                if channel not in self._refs:  # nobody subscribed again meanwhile
                    await self._pubsub.unsubscribe(channel)

    async def publish(self, room: str, data: bytes) -> None:
        """Publish a live (non-durable) event on the room's channel."""
        await self.redis.publish(keys.channel(room), data)

    async def latest_seq(self, room: str) -> int:
        with store_errors():  # a store that is down: Unavailable (a join closes 1013)
            raw = await self.redis.hget(keys.room(room), "seq")
        return int(raw or 0)

    async def history(self, room: str, after: int, upto: int | None = None) -> list[bytes]:
        """Durable events with after < seq <= upto still held in the room's history."""
        top = "+inf" if upto is None else upto
        with store_errors():
            rows = await self.redis.zrangebyscore(keys.history(room), f"({after}", top)
        return list(rows)

    async def history_page(
        self, room: str, after: int, upto: int, limit: int
    ) -> list[tuple[int, bytes]]:
        """At most ``limit`` of the durable events with after < seq <= upto, oldest
        first, each with its seq (the history's score): one page of a resume."""
        with store_errors():
            rows = await self.redis.zrangebyscore(
                keys.history(room), f"({after}", upto, start=0, num=limit, withscores=True
            )
        return [(int(score), data) for data, score in rows]

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
                        elif (handlers := self._channels.get(msg["channel"])) is not None:
                            handlers[0](msg["data"])
                    elif kind == "subscribe":
                        future = self._confirm.pop(msg["channel"], None)
                        if future is not None and not future.done():
                            future.set_result(None)
                        if reconnecting:
                            reconnecting = False
                            log.info("pub/sub reconnected")
                            self._on_reconnect()
                            for _, again in list(self._channels.values()):
                                again()
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                REDIS_ERRORS.labels("pubsub").inc()
                if not reconnecting:
                    log.warning("pub/sub connection lost (%s); reconnecting", exc)
                reconnecting = True
                await asyncio.sleep(0.5)
                if self._subscriber is not None:
                    await self._move()

    async def _move(self) -> None:
        """Subscribe every channel again through the next node (a cluster's), until one
        takes it; the confirmations then run the reconnect path in ``_run``."""
        assert self._subscriber is not None
        while True:
            async with self._lock:
                old_pubsub, old_client = self._pubsub, self._sub_client
                self._sub_client = self._subscriber()
                self._pubsub = self._sub_client.pubsub(ignore_subscribe_messages=False)
                for closing in (old_pubsub, old_client):
                    with contextlib.suppress(Exception):
                        await closing.aclose()
                channels = list(self._refs)
                try:
                    await self._pubsub.connect()  # type: ignore[no-untyped-call]
                    if channels:
                        await self._pubsub.subscribe(*channels)
                    return
                except (redis_errors.RedisError, OSError) as exc:
                    log.warning("pub/sub: no node took the subscription (%s)", exc)
            await asyncio.sleep(0.5)
