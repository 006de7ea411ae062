"""One room's members in this process, and how a batch of the room's events reaches them.

A member is in one of three places. Live: its sink's writer is called for every batch,
grouped by :class:`~livegift.protocol.Wire`, and every writer of a wire gets the same
packed object. Catching up: it is resuming, history is being replayed to it, and live
events wait in its backlog. Joining: it joined while events were pending that its welcome
already counts, so it gets only the rest of that batch before it goes live.

The hub (:mod:`livegift.hub`) owns the rooms, their subscription and their timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from livegift import disconnect
from livegift.disconnect import Close
from livegift.metrics import SLOW_CLOSES
from livegift.protocol import Codec, Wire, encode_payload
from livegift.sequencer import Sequencer

if TYPE_CHECKING:
    from livegift.hub import Sink

# An event as a room keeps it: its type and the bytes the Lua script published.
Item = tuple[str, bytes]
Writer = Callable[[Any], None]


class Member:
    __slots__ = ("backlog", "backlogged", "caught", "counted", "head", "sink", "user")

    def __init__(self, user: str, sink: Sink, counted: bool = True) -> None:
        self.user = user
        self.sink = sink
        # False for a creator's overlay (livegift.follow): it gets every event but is not
        # a viewer, so count() leaves it out.
        self.counted = counted
        self.backlog: list[bytes] | None = None
        self.backlogged = 0  # bytes in the backlog
        # The seq in this member's welcome: it gets every durable event after it.
        self.head = 0
        # Resuming: replay written, waiting for this process to reach its head.
        self.caught = False


class Room:
    __slots__ = (
        "backlog_limit",
        "catching",
        "ended",
        "first_pending",
        "handle",
        "id",
        "joiners",
        "joining",
        "linger",
        "pending",
        "ready",
        "seq",
        "uncounted",
        "window",
        "writers",
    )

    def __init__(
        self, room_id: str, loop: asyncio.AbstractEventLoop, backlog_limit: int = 1 << 20
    ) -> None:
        self.id = room_id
        # A resuming member whose backlog passes this many bytes is too slow (4008).
        self.backlog_limit = backlog_limit
        self.seq: Sequencer[Item] = Sequencer()
        # Set once subscribed and the room's head is known; joiners wait for it.
        self.ready: asyncio.Future[None] = loop.create_future()
        # Live members by wire, each with the callable that writes one packed item to it.
        self.writers: dict[Wire, dict[Member, Writer]] = {}
        # Members still replaying history on resume: live events wait in their backlog.
        self.catching: set[Member] = set()
        # Members who joined while events were pending, with how many were pending then:
        # those are already counted in their welcome's seq.
        self.joiners: list[tuple[Member, int]] = []
        # Members not counted as viewers (overlays), from attach until remove: a few.
        self.uncounted: set[Member] = set()
        # The next batch, as (seq, bytes); seq is 0 for this process's own events.
        self.pending: list[tuple[int, bytes]] = []
        self.first_pending = 0.0
        self.handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self.window = 0.0
        self.ended = False
        self.joining = 0
        self.linger: asyncio.TimerHandle | None = None

    def size(self) -> int:
        """Members here: live, catching up and joining (a room with none can go)."""
        live = sum(len(writers) for writers in self.writers.values())
        return live + len(self.catching) + len(self.joiners)

    def count(self) -> int:
        """Viewers here: the members, overlays left out."""
        total = self.size()
        if self.uncounted:
            total -= sum(1 for member in self.uncounted if self._present(member))
        return total

    def _present(self, member: Member) -> bool:
        writers = self.writers.get(member.sink.wire)
        return (
            (writers is not None and member in writers)
            or member in self.catching
            or any(m is member for m, _ in self.joiners)
        )

    def members(self) -> list[Member]:
        live = [member for writers in self.writers.values() for member in writers]
        return [*live, *self.catching, *(member for member, _ in self.joiners)]

    # -- membership ----------------------------------------------------------------------

    def attach(self, member: Member) -> None:
        """Make a member live. Pending events up to its head are already accounted for
        (its welcome or its replay), so it joins the next batch after them."""
        if not member.counted:
            self.uncounted.add(member)
        skip = 0
        for i, (seq, _) in enumerate(self.pending):
            if seq and seq <= member.head:
                skip = i + 1
        if skip:
            self.joiners.append((member, skip))
        else:
            self._go_live(member)

    def catch_up(self, member: Member) -> None:
        """Write what a resuming member gathered while replaying, then make it live."""
        sink = member.sink
        backlog, member.backlog = member.backlog, None
        member.caught, member.backlogged = False, 0
        self.catching.discard(member)
        if backlog:
            sink.write(sink.wire.events(backlog))
        if self.ended:
            sink.close(disconnect.NORMAL)
        elif not sink.closed:
            self.attach(member)

    def detach(self, member: Member) -> None:
        """Stop writing to a member: its socket is closing."""
        writers = self.writers.get(member.sink.wire)
        if writers is not None:
            writers.pop(member, None)

    def remove(self, member: Member) -> None:
        self.detach(member)
        self.uncounted.discard(member)
        self.catching.discard(member)
        self.joiners = [(m, i) for m, i in self.joiners if m is not member]

    def _go_live(self, member: Member) -> None:
        sink = member.sink
        self.writers.setdefault(sink.wire, {})[member] = sink.writer

    # -- events out ----------------------------------------------------------------------

    def write(self, batch: list[tuple[int, bytes]]) -> int:
        """Write one batch to every member; how many live members got all of it."""
        data = [event for _, event in batch]
        delivered = self._fan_out(data)
        if self.joiners:
            self._release_joiners(data)
        if self.catching:
            self._feed_catching(batch)
        return delivered

    def close_live(self, close: Close) -> None:
        for writers in self.writers.values():
            for member in list(writers):
                member.sink.close(close)

    def _fan_out(self, data: list[bytes]) -> int:
        """One payload per codec, packed once per wire: the same object to all its writers."""
        payloads: dict[Codec, bytes] = {}
        delivered = 0
        for wire, writers in self.writers.items():
            if writers:
                payload = payloads.get(wire.codec)
                if payload is None:
                    payload = payloads[wire.codec] = encode_payload(wire.codec, data)
                packed = wire.pack(payload)
                for write in writers.values():
                    write(packed)
                delivered += len(writers)
        return delivered

    def _release_joiners(self, data: list[bytes]) -> None:
        """Members who joined mid-batch get the part after their head, then go live."""
        joiners, self.joiners = self.joiners, []
        for member, index in joiners:
            sink = member.sink
            if sink.closed:
                continue
            if index < len(data):
                sink.write(sink.wire.events(data[index:]))
            self._go_live(member)

    def _feed_catching(self, batch: list[tuple[int, bytes]]) -> None:
        """Resuming members keep what is after their head; those caught up go live, and
        those whose backlog passed its bound (a replay they do not read) are too slow."""
        ready: list[Member] = []
        slow: list[Member] = []
        for member in self.catching:
            if member.backlog is not None:
                kept = [data for seq, data in batch if seq > member.head]
                member.backlog.extend(kept)
                member.backlogged += sum(map(len, kept))
                if member.backlogged > self.backlog_limit:
                    slow.append(member)
                elif member.caught and self.seq.last >= member.head:
                    ready.append(member)
        for member in ready:
            self.catch_up(member)
        for member in slow:
            member.backlog = None
            self.catching.discard(member)
            SLOW_CLOSES.inc()
            member.sink.close(disconnect.TOO_SLOW)
