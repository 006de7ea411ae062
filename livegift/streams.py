"""Rooms and their live streams: going live, ending, shout-outs, room state and top gifters.

Changes to a room that members see (``stream_ended``, shout-outs) are one Lua call each
(``lua/stream_*.lua``, ``lua/shoutout.lua``), which bumps the room's seq, keeps the event
in the room's history and publishes it. No money moves here: see :mod:`livegift.ledger`.
"""

from __future__ import annotations

import secrets
from typing import Any, cast

from redis.asyncio import Redis

from livegift import keys
from livegift.auth import User
from livegift.config import Settings
from livegift.errors import NotFound
from livegift.scripts import Scripts, store_errors


async def room_creator(redis: Any, room: str) -> str | None:
    """The id of the room's creator (it never changes), or None for no such room."""
    with store_errors():
        creator = await redis.hget(keys.room(room), "creator")
    return creator.decode() if creator else None


class Streams:
    def __init__(self, redis: Redis, settings: Settings, scripts: Scripts | None = None) -> None:
        # redis-py's return types are loose unions; reads here check shapes themselves.
        self.redis: Any = redis
        self.settings = settings
        self.scripts = scripts or Scripts(redis)

    async def start_stream(self, creator: User, title: str) -> tuple[str, bool]:
        """Go live in a new room: (room id, created)."""
        room = secrets.token_urlsafe(8).replace("-", "x").replace("_", "y")
        return await self.start_stream_as(creator, title, room)

    async def start_stream_as(self, creator: User, title: str, room: str) -> tuple[str, bool]:
        """Go live in ``room``, re-opening it if it is the creator's already."""
        result = await self.scripts.call(
            "stream_start",
            [keys.room(room), keys.creator_live(creator.id)],
            [room, creator.id, creator.name, title],
        )
        room_id, created = result
        return room_id.decode() if isinstance(room_id, bytes) else str(room_id), bool(created)

    async def end_stream(self, caller: User, room: str) -> int:
        """End the stream: the stream_ended seq, or 0 when it had already ended."""
        creator = await self.room_creator(room)
        seq = await self.scripts.call(
            "stream_end",
            [keys.room(room), keys.creator_live(creator or caller.id), keys.history(room)],
            [
                caller.id,
                keys.channel(room),
                self.settings.history_len,
                self.settings.history_seconds * 1000,
            ],
        )
        return int(seq)

    async def shoutout(self, caller: User, room: str, to: str, text: str) -> int:
        """The creator recognises viewer ``to`` in front of the room: the shoutout's seq."""
        seq = await self.scripts.call(
            "shoutout",
            [keys.room(room), keys.history(room), keys.name(to)],
            [
                caller.id,
                to,
                text,
                keys.channel(room),
                self.settings.history_len,
                self.settings.history_seconds * 1000,
            ],
        )
        return int(seq)

    async def room_creator(self, room: str) -> str | None:
        return await room_creator(self.redis, room)

    async def room(self, room: str) -> dict[str, str]:
        """The room's hash (creator, creator_name, live, seq, coins, gifts, title, ...)."""
        with store_errors():
            raw = await self.redis.hgetall(keys.room(room))
        if not raw:
            raise NotFound(f"no stream {room!r}")
        return {k.decode(): v.decode() for k, v in cast(dict[bytes, bytes], raw).items()}

    async def top(self, room: str, n: int = 10) -> list[tuple[str, str, int]]:
        """The top gifters of a room: (user id, display name, coins)."""
        with store_errors():
            rows = await self.redis.zrevrange(keys.top(room), 0, n - 1, withscores=True)
            ids = [member.decode() for member, _ in rows]
            names = await self.redis.mget([keys.name(u) for u in ids]) if ids else []
        return [
            (uid, (nm.decode() if nm else uid), int(score))
            for uid, nm, (_, score) in zip(ids, names, rows, strict=True)
        ]

    async def remember_name(self, user: User) -> None:
        """Keep the user's display name for leaderboards and shout-outs."""
        with store_errors():
            await self.redis.set(keys.name(user.id), user.name)
