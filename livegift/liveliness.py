"""Liveliness: the leaderboard and viewer-count events, and presence across processes.

Every second, each room that had a gift since the last look gets a ``leaderboard`` event
if its top gifters changed. Every two seconds this process writes its member count per
room into the room's presence hash (``keys.presence``) and reads the other processes'
counts back; each room whose total changed gets a ``viewers`` event. Both events go out
through :meth:`Hub.push <livegift.hub.Hub.push>`, batched with the room's durable events;
the hub tells this module about gifts and rooms through :class:`livegift.hub.Watcher`.

A process's count older than :data:`PRESENCE_TTL_MS` belongs to a process that went away
and is not summed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.exceptions import RedisClusterException, RedisError

from livegift import events, keys
from livegift.hub import Hub
from livegift.store import Store

log = logging.getLogger("livegift.liveliness")

PRESENCE_TTL_MS = 6000
TOP_EVERY_S = 1.0
# Presence is written every this many leaderboard beats.
VIEWERS_EVERY = 2

# A room's top gifters as (user id, display name, coins), best first (Streams.top).
TopRows = Callable[[str], Awaitable[list[tuple[str, str, int]]]]


class Liveliness:
    def __init__(self, hub: Hub, redis: Store, top_rows: TopRows) -> None:
        self.hub = hub
        self.redis = redis
        self.top_rows = top_rows
        self.process_id = f"{os.uname().nodename}:{os.getpid()}"
        # Rooms with a gift since the last leaderboard look.
        self._gifted: set[str] = set()
        # What each room's members were last told.
        self._boards: dict[str, list[dict[str, Any]]] = {}
        self._viewers: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Watch the hub and start the ticker."""
        self.hub.watcher = self
        self._task = asyncio.get_running_loop().create_task(self._run(), name="liveliness")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- what the hub tells us (livegift.hub.Watcher) ------------------------------------

    def delivered(self, room_id: str, type_: str) -> None:
        if type_ == events.GIFT:
            self._gifted.add(room_id)

    def known_viewers(self, room_id: str) -> int:
        return self._viewers.get(room_id, -1)

    def forgotten(self, room_id: str) -> None:
        self._gifted.discard(room_id)
        self._boards.pop(room_id, None)
        self._viewers.pop(room_id, None)

    # -- reads ---------------------------------------------------------------------------

    async def top(self, room: str) -> list[dict[str, Any]]:
        """The room's leaderboard, as the ``leaderboard`` event carries it."""
        return [
            {"user": {"id": uid, "name": name}, "coins": coins}
            for uid, name, coins in await self.top_rows(room)
        ]

    async def viewers(self, room: str) -> int:
        """The room's viewers over all processes."""
        raw = await self.redis.hgetall(keys.presence(room))
        return _sum_fresh(raw, int(time.time() * 1000))

    async def presence(self, counts: dict[str, int]) -> dict[str, int]:
        """Publish this process's member counts; return each room's total over processes."""
        now = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for room, count in counts.items():
                pipe.hset(keys.presence(room), self.process_id, f"{count}:{now}")
                pipe.pexpire(keys.presence(room), PRESENCE_TTL_MS * 2)
                pipe.hgetall(keys.presence(room))
            results = await pipe.execute()
        return {room: _sum_fresh(results[i * 3 + 2], now) for i, room in enumerate(counts)}

    # -- the ticker ----------------------------------------------------------------------

    async def _run(self) -> None:
        beat = 0
        while True:
            await asyncio.sleep(TOP_EVERY_S)
            beat += 1
            try:
                await self.tick(viewers=beat % VIEWERS_EVERY == 0)
            except (OSError, RedisError, RedisClusterException) as exc:
                log.warning("liveliness tick skipped: data store unavailable (%s)", exc)
            except Exception:
                log.exception("liveliness tick failed")

    async def tick(self, viewers: bool = True) -> None:
        """One beat: leaderboards of rooms that had gifts, and (with ``viewers``) counts."""
        for room_id in list(self._gifted):
            self._gifted.discard(room_id)
            board = await self.top(room_id)
            if board != self._boards.get(room_id, []):
                event = orjson.dumps({"type": events.LEADERBOARD, "top": board})
                if self.hub.push(room_id, event):
                    self._boards[room_id] = board
        if viewers:
            counts = self.hub.counts()
            if counts:
                for room_id, total in (await self.presence(counts)).items():
                    if total != self._viewers.get(room_id, -1):
                        event = orjson.dumps({"type": events.VIEWERS, "count": total})
                        if self.hub.push(room_id, event):
                            self._viewers[room_id] = total


def _sum_fresh(raw: Any, now: int) -> int:
    total = 0
    for value in raw.values():
        count, _, ts = value.partition(b":")
        if now - int(ts or 0) <= PRESENCE_TTL_MS:
            total += int(count)
    return total
