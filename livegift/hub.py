"""The per-process hub: rooms, members, one subscription per room, encode-once fan-out.

Events for a room are gathered for ``batch_ms`` and then written as one frame: one JSON
array (the raw bytes the Lua script published, joined) and, only if a member speaks it,
one MessagePack array. The same frame bytes go to every member through its sink; no
coroutine runs per member per event. Seqs are checked on arrival: duplicates are dropped
and a gap is filled from the room's history before anything later goes out, so every
member sees durable events in seq order exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import orjson
from redis.exceptions import RedisError

from livegift.broker import Broker
from livegift.errors import Unavailable
from livegift.metrics import DELIVERIES, FANOUT_BATCH, FANOUT_LATENCY, ROOMS, SLOW_CLOSES
from livegift.protocol import JSON, MSGPACK, Codec
from livegift.writer import Sink

log = logging.getLogger("livegift.hub")

SEQ = re.compile(rb'"seq":(\d+)')
ENDED = b'"type":"stream_ended"'
GIFT = b'"type":"gift"'

TopFn = Callable[[str], Awaitable[list[dict[str, Any]]]]
PresenceFn = Callable[[dict[str, int]], Awaitable[dict[str, int]]]


def event_seq(data: bytes) -> int:
    match = SEQ.search(data)
    return int(match.group(1)) if match else 0


def encode_events(codec: Codec, events: list[bytes]) -> bytes:
    """One frame for a list of raw JSON events: the object itself, or an array."""
    if codec is JSON:
        payload = events[0] if len(events) == 1 else b"[" + b",".join(events) + b"]"
    else:
        decoded = [orjson.loads(e) for e in events]
        payload = msgpack.packb(decoded[0] if len(decoded) == 1 else decoded)
    return codec.frame(payload)


class Member:
    __slots__ = ("backlog", "caught", "head", "sink", "user")

    def __init__(self, user: str, sink: Sink) -> None:
        self.user = user
        self.sink = sink
        self.backlog: list[bytes] | None = None
        # The seq in this member's welcome: it gets every durable event after it.
        self.head = 0
        # Resuming: replay written, waiting for this process to reach its head.
        self.caught = False


Writer = Callable[[bytes], None]


class Room:
    __slots__ = (
        "catching",
        "early",
        "ended",
        "filling",
        "first_pending",
        "handle",
        "id",
        "joiners",
        "joining",
        "last_seq",
        "last_top",
        "linger",
        "pending",
        "ready",
        "stash",
        "top_dirty",
        "viewers",
        "window",
        "writers",
    )

    def __init__(self, room_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.id = room_id
        # Live members by codec, each with the callable that writes one frame to it.
        self.writers: dict[Codec, dict[Member, Writer]] = {JSON: {}, MSGPACK: {}}
        # Members still replaying history on resume: live events wait in their backlog.
        self.catching: set[Member] = set()
        # Members who joined while events were pending, with how many were pending then:
        # those are already counted in their welcome's seq.
        self.joiners: list[tuple[Member, int]] = []
        self.window = 0.0
        self.pending: list[bytes] = []
        self.first_pending = 0.0
        self.handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self.last_seq = 0
        self.ready: asyncio.Future[None] = loop.create_future()
        self.early: list[bytes] = []
        self.stash: dict[int, bytes] = {}
        self.filling = False
        self.ended = False
        self.joining = 0
        self.linger: asyncio.TimerHandle | None = None
        self.top_dirty = False
        self.last_top: list[dict[str, Any]] = []
        self.viewers = -1

    def count(self) -> int:
        writers = len(self.writers[JSON]) + len(self.writers[MSGPACK])
        return writers + len(self.catching) + len(self.joiners)

    def members(self) -> list[Member]:
        joiners = [member for member, _ in self.joiners]
        return [*self.writers[JSON], *self.writers[MSGPACK], *self.catching, *joiners]

    def detach(self, member: Member) -> None:
        """Stop writing to a member (its socket is closing); it still counts until it leaves."""
        self.writers[member.sink.codec].pop(member, None)


class Hub:
    def __init__(
        self,
        broker_factory: Callable[[Callable[[str, bytes], None], Callable[[], None]], Broker],
        *,
        batch_ms: int,
        max_batch_ms: int = 100,
        linger_s: float = 1.0,
    ) -> None:
        self.broker = broker_factory(self.on_message, self.on_reconnect)
        self.batch_s = batch_ms / 1000
        self.max_batch_s = max(max_batch_ms, batch_ms) / 1000
        self.linger_s = linger_s
        self.rooms: dict[str, Room] = {}
        self.process_id = f"{os.uname().nodename}:{os.getpid()}"
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, top: TopFn | None = None, presence: PresenceFn | None = None) -> None:
        await self.broker.start()
        if top is not None and presence is not None:
            self._ticker = self._loop.create_task(self._tick(top, presence), name="hub-ticker")

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self.broker.close()

    def drain(self, code: int = 1013, reason: str = "server shutting down") -> None:
        for room in self.rooms.values():
            for member in room.members():
                member.sink.close(code, reason)

    # -- membership ----------------------------------------------------------------------

    async def join(
        self,
        room_id: str,
        member: Member,
        welcome: Callable[[int, int], dict[str, Any]],
        since: int | None = None,
    ) -> None:
        """Add a member; its first frame is welcome(seq, viewers), then (on resume) the
        history after ``since`` and a ``resumed`` event, then live events."""
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = Room(room_id, self._loop)
            ROOMS.inc()
            room.joining += 1
            try:
                await self.broker.subscribe(room_id)
                room.last_seq = await self.broker.latest_seq(room_id)
            except BaseException as exc:
                room.joining -= 1
                # Waiters get a plain error even when this joiner was cancelled.
                failed = exc if isinstance(exc, Exception) else Unavailable("room join aborted")
                room.ready.set_exception(failed)
                room.ready.exception()  # mark retrieved
                self._forget(room)
                self._spawn(self.broker.unsubscribe(room_id))
                raise
            room.ready.set_result(None)
            early, room.early = room.early, []
            for data in early:
                self.on_message(room_id, data)
        else:
            room.joining += 1
            if room.linger is not None:
                room.linger.cancel()
                room.linger = None
            try:
                await asyncio.shield(room.ready)
            except BaseException:
                room.joining -= 1
                raise
        room.joining -= 1
        sink = member.sink
        head = room.last_seq
        # A member resuming from a seq this process has not seen yet (another worker was
        # ahead) must not get anything up to that seq again.
        member.head = head if since is None else max(head, since)
        viewers = max(room.viewers, room.count() + 1)
        sink.write(sink.codec.frame(sink.codec.encode(welcome(head, viewers))))
        sink.on_close = lambda: room.detach(member)
        if since is None:
            if room.ended:
                sink.close(4404, "unknown or ended room")
            else:
                self._attach(room, member)
            return
        member.backlog = []
        room.catching.add(member)
        try:
            replay = await self.broker.history(room_id, since, head) if since < head else []
        except BaseException:
            member.backlog = None
            room.catching.discard(member)
            raise
        complete = since >= head or (bool(replay) and event_seq(replay[0]) == since + 1)
        if replay:
            sink.write(encode_events(sink.codec, replay))
        resumed = {"type": "resumed", "from": since + 1, "to": member.head, "complete": complete}
        sink.write(sink.codec.frame(sink.codec.encode(resumed)))
        if room.last_seq >= member.head:
            self._catch_up(room, member)
        else:
            member.caught = True  # attached by _flush once this process reaches its head

    def _catch_up(self, room: Room, member: Member) -> None:
        """Write what a resuming member gathered while replaying, then make it live."""
        sink = member.sink
        backlog, member.backlog = member.backlog, None
        member.caught = False
        room.catching.discard(member)
        if backlog:
            sink.write(encode_events(sink.codec, backlog))
        if room.ended:
            sink.close(1000, "stream ended")
        elif not sink.closed:
            self._attach(room, member)

    def _attach(self, room: Room, member: Member) -> None:
        """Make a member live. Pending events up to its head are already accounted for
        (its welcome or its replay), so it joins the next frame after them."""
        skip = 0
        for i, data in enumerate(room.pending):
            seq = event_seq(data)
            if seq and seq <= member.head:
                skip = i + 1
        if skip:
            room.joiners.append((member, skip))
        else:
            room.writers[member.sink.codec][member] = member.sink.writer

    def leave(self, room_id: str, member: Member) -> None:
        room = self.rooms.get(room_id)
        if room is None:
            return
        room.writers[member.sink.codec].pop(member, None)
        room.catching.discard(member)
        room.joiners = [(m, i) for m, i in room.joiners if m is not member]
        if room.count() == 0 and room.joining == 0 and room.linger is None:
            room.linger = self._loop.call_later(self.linger_s, self._drop, room)

    def _drop(self, room: Room) -> None:
        room.linger = None
        if room.count() == 0 and room.joining == 0 and self.rooms.get(room.id) is room:
            self._forget(room)
            self._spawn(self.broker.unsubscribe(room.id))

    def _forget(self, room: Room) -> None:
        if self.rooms.get(room.id) is room:
            del self.rooms[room.id]
            ROOMS.dec()
        if room.handle is not None:
            room.handle.cancel()

    # -- events in -----------------------------------------------------------------------

    def on_message(self, room_id: str, data: bytes) -> None:
        room = self.rooms.get(room_id)
        if room is None:
            return
        if not room.ready.done():
            room.early.append(data)
            return
        seq = event_seq(data)
        if seq <= room.last_seq:
            return  # already delivered, or before the members' welcome
        if seq > room.last_seq + 1 or room.filling:
            room.stash[seq] = data
            if not room.filling:
                room.filling = True
                self._spawn(self._fill(room))
            return
        self._accept(room, seq, data)

    def on_reconnect(self) -> None:
        """Pub/sub came back: anything published meanwhile is fetched from history."""
        for room in list(self.rooms.values()):
            if room.ready.done() and not room.filling:
                room.filling = True
                self._spawn(self._fill(room, check_head=True))

    async def _fill(self, room: Room, check_head: bool = False) -> None:
        """Deliver what pub/sub missed, from the room's history, then what it stashed.

        With ``check_head`` (after a pub/sub reconnect) it also asks for the room's latest
        seq. Data-store errors are retried with backoff for as long as the room has
        members here, so a Redis restart cannot leave a gap behind.
        """
        delay = 0.1
        try:
            while self.rooms.get(room.id) is room:
                try:
                    if await self._fill_once(room, check_head):
                        return
                    check_head = False
                except Exception as exc:
                    log.warning("room %s: filling from history failed (%s); retrying", room.id, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            room.filling = False

    async def _fill_once(self, room: Room, check_head: bool) -> bool:
        """One pass; True when nothing is left to fill."""
        target = max(room.stash) - 1 if room.stash else room.last_seq
        if check_head:
            target = max(target, await self.broker.latest_seq(room.id))
        if target > room.last_seq:
            for data in await self.broker.history(room.id, room.last_seq, target):
                seq = event_seq(data)
                if seq > room.last_seq:
                    self._accept(room, seq, data)
        if room.stash and min(room.stash) > room.last_seq + 1:
            log.warning(
                "room %s: history lost seq %d..%d", room.id, room.last_seq + 1, min(room.stash) - 1
            )
            room.last_seq = min(room.stash) - 1
        while room.last_seq + 1 in room.stash:
            seq = room.last_seq + 1
            self._accept(room, seq, room.stash.pop(seq))
        for seq in [s for s in room.stash if s <= room.last_seq]:
            del room.stash[seq]
        return not room.stash

    def _accept(self, room: Room, seq: int, data: bytes) -> None:
        room.last_seq = seq
        if ENDED in data:
            room.ended = True
        elif GIFT in data:
            room.top_dirty = True
        self.push(room, data)

    def push(self, room: Room, data: bytes) -> None:
        """Queue one event for the room's next frame."""
        if not room.pending:
            room.first_pending = time.perf_counter()
            if room.handle is None:
                window = max(self.batch_s, room.window)
                if window > 0:
                    room.handle = self._loop.call_later(window, self._flush, room)
                else:
                    room.handle = self._loop.call_soon(self._flush, room)
        room.pending.append(data)

    # -- events out ----------------------------------------------------------------------

    def _flush(self, room: Room) -> None:
        """Write the room's pending events: one frame per codec, the same bytes to all.

        The next window adapts to the room's size: at least twice what this write loop
        took, so a huge room batches more per frame instead of starving everything else.
        """
        room.handle = None
        events = room.pending
        if not events:
            return
        started = time.perf_counter()
        room.pending = []
        delivered = 0
        for codec, writers in room.writers.items():
            if writers:
                frame = encode_events(codec, events)
                for write in writers.values():
                    write(frame)
                delivered += len(writers)
        if room.joiners:
            joiners, room.joiners = room.joiners, []
            for member, index in joiners:
                sink = member.sink
                if sink.closed:
                    continue
                if index < len(events):
                    sink.write(encode_events(sink.codec, events[index:]))
                room.writers[sink.codec][member] = sink.writer
        ready: list[Member] = []
        for member in room.catching:
            if member.backlog is not None:
                member.backlog.extend(e for e in events if event_seq(e) > member.head)
                if member.caught and room.last_seq >= member.head:
                    ready.append(member)
        for member in ready:
            self._catch_up(room, member)
        done = time.perf_counter()
        room.window = min(self.max_batch_s, 2 * (done - started))
        DELIVERIES.inc(delivered * len(events))
        FANOUT_BATCH.observe(len(events))
        FANOUT_LATENCY.observe(done - room.first_pending)
        if room.ended:
            for writers in room.writers.values():
                for member in list(writers):
                    member.sink.close(1000, "stream ended")

    def slow(self) -> None:
        SLOW_CLOSES.inc()

    # -- liveliness: leaderboard and viewer counts ------------------------------------------

    async def _tick(self, top: TopFn, presence: PresenceFn) -> None:
        beat = 0
        while True:
            await asyncio.sleep(1.0)
            beat += 1
            try:
                for room in list(self.rooms.values()):
                    if room.top_dirty and room.ready.done():
                        room.top_dirty = False
                        board = await top(room.id)
                        if board != room.last_top:
                            room.last_top = board
                            self.push(room, orjson.dumps({"type": "leaderboard", "top": board}))
                if beat % 2 == 0:
                    counts = {r.id: r.count() for r in self.rooms.values() if r.ready.done()}
                    if counts:
                        totals = await presence(counts)
                        for room_id, total in totals.items():
                            counted = self.rooms.get(room_id)
                            if counted is not None and total != counted.viewers:
                                counted.viewers = total
                                self.push(
                                    counted, orjson.dumps({"type": "viewers", "count": total})
                                )
            except (OSError, RedisError) as exc:
                log.warning("liveliness tick skipped: data store unavailable (%s)", exc)
            except Exception:
                log.exception("liveliness tick failed")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
