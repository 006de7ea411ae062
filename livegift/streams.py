"""Rooms and their live streams: going live, ending, shout-outs, room state and top gifters.

Changes to a room that members see (``stream_ended``, shout-outs) are one Lua call each
(``lua/stream_*.lua``, ``lua/shoutout.lua``), which bumps the room's seq, keeps the event
in the room's history and publishes it. No money moves here: see :mod:`livegift.ledger`.

A room's keys live in its creator's partition (:mod:`livegift.keys`), which the room id
names in its first two characters, so a gift lands on the room and the creator's wallet
in one step. A creator has at most one live stream: going live ends the other one. An ended room's
keys expire (history after ``history_seconds``, the room and its top gifters after
``ended_room_ttl``), so Redis does not grow with every stream ever held.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import Any, cast

from redis.exceptions import OutOfMemoryError

from livegift import keys
from livegift.auth import User
from livegift.config import Settings
from livegift.errors import BadRequest, NotFound, Unavailable
from livegift.scripts import Scripts, store_errors
from livegift.store import Store

# Tries at going live while the creator's live stream keeps changing under the call. A
# try fails only when another go-live of the same creator succeeded since its read, so
# this many concurrent go-lives of one creator all succeed (the last one stays live).
START_ATTEMPTS = 16


def stream_start_call(
    s: Settings, creator: User, title: str, room: str, live: str
) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of one stream_start.lua call; ``live`` is the creator's live room
    as just read ("" for none), which the script ends (see the script's header)."""
    other = live or room
    keys_ = [keys.room(room), keys.creator_live(creator.id), keys.history(room), keys.top(room),
             keys.room(other), keys.history(other), keys.top(other)]  # fmt: skip
    args: list[Any] = [room, creator.id, creator.name, title, keys.creator_channel(creator.id),
                       live, keys.channel(other), s.history_len, s.history_seconds * 1000,
                       s.ended_room_ttl]  # fmt: skip
    return keys_, args


async def room_creator(redis: Any, room: str) -> str | None:
    """The id of the room's creator (it never changes), or None for no such room."""
    with store_errors():
        creator = await redis.hget(keys.room(room), "creator")
    return creator.decode() if creator else None


class Streams:
    def __init__(self, redis: Store, settings: Settings, scripts: Scripts | None = None) -> None:
        # redis-py's return types are loose unions; reads here check shapes themselves.
        self.redis: Any = redis
        self.settings = settings
        self.scripts = scripts or Scripts(redis)

    async def start_stream(self, creator: User, title: str) -> tuple[str, bool]:
        """Go live in a new room: (room id, created)."""
        suffix = secrets.token_urlsafe(7)[:9].replace("-", "x").replace("_", "y")
        return await self.start_stream_as(creator, title, keys.new_room_id(creator.id, suffix))

    async def start_stream_as(self, creator: User, title: str, room: str) -> tuple[str, bool]:
        """Go live in ``room``, re-opening it if it is the creator's already.

        One live stream per creator: the creator's other live stream ends (its members get
        ``stream_ended``) in the same script. The script needs that room's keys, so the
        creator's live-room pointer is read first; if it changed before the script ran,
        the script changes nothing and this reads it again. ``room`` must be of the
        creator's partition (keys.new_room_id)."""
        if keys.room_partition(room) != keys.user_partition(creator.id):
            raise BadRequest(f"room {room!r} is not of the creator's partition (keys.new_room_id)")
        for _ in range(START_ATTEMPTS):
            with store_errors():
                raw = await self.redis.get(keys.creator_live(creator.id))
            live = raw.decode() if raw else ""
            keys_, args = stream_start_call(self.settings, creator, title, room, live)
            room_id, created, _ended = await self.scripts.call("stream_start", keys_, args)
            if int(created) >= 0:
                rid = room_id.decode() if isinstance(room_id, bytes) else str(room_id)
                return rid, bool(created)
        raise Unavailable("the creator's live stream kept changing, try again")

    async def end_stream(self, caller: User, room: str) -> int:
        """End the stream: the stream_ended seq, or 0 when it had already ended. The room's
        keys then expire (docs/protocol.md, "Ended streams")."""
        creator = await self.room_creator(room)
        seq = await self.scripts.call(
            "stream_end",
            [
                keys.room(room),
                keys.creator_live(creator or caller.id),
                keys.history(room),
                keys.top(room),
            ],
            [
                caller.id,
                keys.channel(room),
                self.settings.history_len,
                self.settings.history_seconds * 1000,
                self.settings.ended_room_ttl,
            ],
        )
        return int(seq)

    async def shoutout(self, caller: User, room: str, to: str, text: str) -> int:
        """The creator recognises viewer ``to`` in front of the room: the shoutout's seq."""
        with store_errors():
            name = await self.redis.get(keys.name(to))
        seq = await self.scripts.call(
            "shoutout",
            [keys.room(room), keys.history(room)],
            [
                caller.id,
                to,
                text,
                keys.channel(room),
                self.settings.history_len,
                self.settings.history_seconds * 1000,
                name.decode() if name else to,
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
            async with self.redis.pipeline(transaction=False) as pipe:
                for u in ids:  # each name in its user's partition
                    pipe.get(keys.name(u))
                names = await pipe.execute()
        return [
            (uid, (nm.decode() if nm else uid), int(score))
            for uid, nm, (_, score) in zip(ids, names, rows, strict=True)
        ]

    async def live_room(self, creator: str) -> tuple[str, dict[str, str]] | None:
        """The creator's live stream now: (room id, the room's hash), or None."""
        with store_errors():
            room = await self.redis.get(keys.creator_live(creator))
        if room is None:
            return None
        try:
            info = await self.room(room.decode())
        except NotFound:
            return None
        return (room.decode(), info) if info.get("live") == "1" else None

    async def remember_name(self, user: User) -> None:
        """Keep the user's display name for leaderboards and shout-outs. Best effort when
        the data store is full: joining a room to watch only reads."""
        with store_errors(), contextlib.suppress(OutOfMemoryError):
            await self.redis.set(keys.name(user.id), user.name)
