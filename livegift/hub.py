"""The per-process hub: rooms, members, one subscription per room, encode-once fan-out.

Events for a room are gathered for a window and then written as one batch: its payload
is encoded once per codec (the raw JSON bytes the Lua script published, joined, and only
if a member speaks it, one MessagePack array) and packed once per :class:`Wire`; the same
object goes to every member of that wire through its sink's ``writer``. No coroutine runs
per member per event. Each room's :class:`~livegift.sequencer.Sequencer` orders what
arrives: duplicates are dropped and a gap is filled from the room's history before anything
later goes out, so every member sees durable events in seq order exactly once. An event the
hub cannot read is logged and counted, never dropped in silence.

The window is ``batch_ms`` while the event loop keeps up, whatever the rooms' sizes. A
batch costs one write per member however many events it carries, so a wider window saves
loop time, but every event waits for it, and the saving pays only when something else is
waiting for the loop. So the hub measures the loop's lag, and only while it is too high
does :class:`Pace` widen windows, each room's in proportion to what its writes cost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from livegift import disconnect, events
from livegift.broker import Broker
from livegift.disconnect import Close
from livegift.errors import Unavailable
from livegift.metrics import BAD_EVENTS, DELIVERIES, FANOUT_BATCH, FANOUT_LATENCY, ROOMS
from livegift.protocol import Wire
from livegift.replay import replay
from livegift.rooms import Item, Room
from livegift.rooms import Member as Member  # part of the hub's API: join(room, Member(...))
from livegift.sequencer import Step

log = logging.getLogger("livegift.hub")

# At most one warning per this many seconds about events the hub cannot read.
BAD_EVENT_LOG_EVERY = 10.0

# The loop is behind when a timer fires, on average over one sample, more than this late.
LOOP_LAG_LIMIT_S = 0.010
LAG_PROBE_S = 0.02  # the hub's lag probe: a timer this often, while it has rooms
PACE_SAMPLE_S = 0.25  # how often Pace decides
STRETCH_MIN = 0.25  # the first step above 0, then it doubles ...
STRETCH_MAX = 64.0  # ... up to this (a 1 ms write gets 64 ms)


class Pace:
    """How much wider than ``base_s`` a room's next window is, from the loop's lag.

    The window is ``stretch`` times what the room's last batch took to write, between
    ``base_s`` and ``max_s``. ``stretch`` is 0 while the loop keeps up, so every room,
    however large, gathers for ``base_s`` only. When timers fire on average more than
    ``lag_limit_s`` late over one sample (the writes themselves block the loop, or acks,
    joins, other rooms or other processes hold it), it steps up (``STRETCH_MIN``, then
    doubling): the rooms whose writes cost most widen most, since widening them saves
    most. Below half the limit it halves again, back to 0; in between it holds, so a
    loop near its limit does not flap. Pure: the hub brings the clock readings.
    """

    def __init__(
        self,
        base_s: float,
        max_s: float,
        *,
        lag_limit_s: float = LOOP_LAG_LIMIT_S,
        sample_s: float = PACE_SAMPLE_S,
    ) -> None:
        self.base_s = base_s
        self.max_s = max(max_s, base_s)
        self.lag_limit_s = lag_limit_s
        self.sample_s = sample_s
        self.stretch = 0.0
        self.lag = 0.0  # mean lateness over the last complete sample
        self.samples = 0  # complete samples so far
        self._since: float | None = None
        self._late = 0.0
        self._probes = 0

    def window(self, took: float) -> float:
        """The next window of a room whose last batch took ``took`` seconds to write."""
        return min(self.max_s, max(self.base_s, self.stretch * took))

    def lagged(self, now: float, late: float) -> None:
        """Record a timer that fired ``late`` seconds after it was due, at ``now``."""
        if self._since is None:
            self._since = now
        self._late += late
        self._probes += 1
        if now - self._since >= self.sample_s:
            self.lag = self._late / self._probes
            self._since, self._late, self._probes = now, 0.0, 0
            self.samples += 1
            self._decide()

    def _decide(self) -> None:
        if self.lag > self.lag_limit_s:
            self.stretch = min(STRETCH_MAX, max(STRETCH_MIN, 2 * self.stretch))
        elif self.lag < self.lag_limit_s / 2:
            self.stretch = self.stretch / 2 if self.stretch > STRETCH_MIN else 0.0


class Sink(Protocol):
    """What a connection gives the hub to write a member's events through.

    ``writer`` is what the fan-out loop calls for every member of a wire with the same
    packed object. It must not close the sink (nor call ``on_close``) synchronously, since
    the loop is iterating the room's members: a slow connection closes on a later tick.
    ``close`` sets ``closed`` and calls ``on_close`` once.
    """

    wire: Wire
    closed: bool
    on_close: Callable[[], None] | None

    @property
    def writer(self) -> Callable[[Any], None]:
        """The cheapest callable that writes one packed item (``wire.pack``)."""
        ...

    def write(self, data: bytes | str) -> None: ...

    def buffered(self) -> int:
        """Bytes written but not yet sent to the client (a resume waits for these)."""
        ...

    def close(self, close: Close, reason: str = "") -> None:
        """Close the connection; ``reason`` "" means ``close.reason``."""
        ...


class Watcher(Protocol):
    """What the hub tells liveliness about its rooms, and asks it (see livegift.liveliness)."""

    def delivered(self, room_id: str, type_: str) -> None:
        """A durable event of this type was queued for the room's members."""

    def known_viewers(self, room_id: str) -> int:
        """The room's last known viewer count over all processes, or -1."""
        ...

    def forgotten(self, room_id: str) -> None:
        """The room has no members here any more."""


class Unwatched:
    """No liveliness: nothing is counted."""

    def delivered(self, room_id: str, type_: str) -> None:
        pass

    def known_viewers(self, room_id: str) -> int:
        return -1

    def forgotten(self, room_id: str) -> None:
        pass


class Hub:
    def __init__(
        self,
        broker_factory: Callable[[Callable[[str, bytes], None], Callable[[str], None]], Broker],
        *,
        batch_ms: int,
        max_batch_ms: int = 100,
        linger_s: float = 1.0,
        send_limit: int = 1 << 20,
    ) -> None:
        self.broker = broker_factory(self.on_message, self.on_reconnect)
        # A member's unsent bytes past this: too slow. Bounds resume chunks and backlogs.
        self.send_limit = send_limit
        self.pace = Pace(batch_ms / 1000, max_batch_ms / 1000)
        self.linger_s = linger_s
        self.rooms: dict[str, Room] = {}
        self.watcher: Watcher = Unwatched()
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bad_logged = float("-inf")
        self._bad_unlogged = 0
        self._probe: asyncio.TimerHandle | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start()

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        await self.broker.close()

    def drain(
        self, close: Close = disconnect.TRY_AGAIN_LATER, reason: str = "server shutting down"
    ) -> None:
        for room in self.rooms.values():
            for member in room.members():
                member.sink.close(close, reason)

    # -- what liveliness uses ------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Members per room in this process, for every room whose subscription is up."""
        return {room.id: room.count() for room in self.rooms.values() if room.ready.done()}

    def has_ended(self, room_id: str) -> bool:
        """Whether this process has delivered the room's stream_ended (a gift to it then
        fails at once instead of being debited and given back)."""
        room = self.rooms.get(room_id)
        return room is not None and room.ended

    def push(self, room_id: str, data: bytes) -> bool:
        """Queue one event made by this process (JSON, no seq) for the room's next batch.

        False when the room has no subscription up here (the event is not queued).
        """
        room = self.rooms.get(room_id)
        if room is None or not room.ready.done():
            return False
        self._queue(room, 0, data)
        return True

    # -- membership ----------------------------------------------------------------------

    async def join(
        self,
        room_id: str,
        member: Member,
        welcome: Callable[[int, int], dict[str, Any]],
        since: int | None = None,
    ) -> None:
        """Add a member; its first write is welcome(seq, viewers), then (on resume) the
        history after ``since`` and a ``resumed`` event, then live events."""
        room = await self._enter(room_id)
        sink = member.sink
        head = room.seq.last
        # A member resuming from a seq this process has not seen yet (another worker was
        # ahead) must not get anything up to that seq again.
        member.head = head if since is None else max(head, since)
        viewers = max(self.watcher.known_viewers(room_id), room.count() + member.counted)
        sink.write(sink.wire.encode(welcome(head, viewers)))
        sink.on_close = lambda: room.detach(member)
        if since is not None:
            await self._resume(room, member, since, head)
        elif room.ended:
            sink.close(disconnect.NOT_FOUND)
        else:
            room.attach(member)

    async def _enter(self, room_id: str) -> Room:
        """The room, subscribed and with its head known; the first joiner subscribes."""
        room = self.rooms.get(room_id)
        fresh = room is None
        if room is None:
            room = self.rooms[room_id] = Room(room_id, self._loop, self.send_limit)
            ROOMS.inc()
            if self._probe is None:
                self._probe_lag(time.perf_counter())
        elif room.linger is not None:
            room.linger.cancel()
            room.linger = None
        room.joining += 1
        try:
            if fresh:
                await self._open(room)
            else:
                await asyncio.shield(room.ready)
        finally:
            room.joining -= 1
        return room

    async def _open(self, room: Room) -> None:
        try:
            await self.broker.subscribe(room.id)
            head = await self.broker.latest_seq(room.id)
        except BaseException as exc:
            # Waiters get a plain error even when this joiner was cancelled.
            failed = exc if isinstance(exc, Exception) else Unavailable("room join aborted")
            room.ready.set_exception(failed)
            room.ready.exception()  # mark retrieved
            self._forget(room)
            self._spawn(self.broker.unsubscribe(room.id))
            raise
        step = room.seq.begin(head)
        room.ready.set_result(None)
        self._apply(room, step)

    async def _resume(self, room: Room, member: Member, since: int, head: int) -> None:
        """Replay the history after ``since`` up to the welcome's seq (in chunks the
        client can take: livegift.replay), then go live."""
        sink = member.sink
        member.backlog = []
        room.catching.add(member)
        try:
            first = await replay(
                self.broker, room.id, sink, since, head, self.send_limit, self._read_all
            )
        except BaseException:
            member.backlog = None
            room.remove(member)
            raise
        if sink.closed:  # cut as too slow, or gone, mid-replay
            member.backlog = None
            room.remove(member)
            return
        complete = since >= head or first == since + 1
        resumed = {
            "type": events.RESUMED,
            "from": since + 1,
            "to": member.head,
            "complete": complete,
        }
        sink.write(sink.wire.encode(resumed))
        if room.seq.last >= member.head:
            room.catch_up(member)
        else:
            member.caught = True  # made live by a batch once this process reaches its head

    def leave(self, room_id: str, member: Member) -> None:
        room = self.rooms.get(room_id)
        if room is None:
            return
        room.remove(member)
        if room.size() == 0 and room.joining == 0 and room.linger is None:
            room.linger = self._loop.call_later(self.linger_s, self._drop, room)

    def _drop(self, room: Room) -> None:
        room.linger = None
        if room.size() == 0 and room.joining == 0 and self.rooms.get(room.id) is room:
            self._forget(room)
            self._spawn(self.broker.unsubscribe(room.id))

    def _forget(self, room: Room) -> None:
        if self.rooms.get(room.id) is room:
            del self.rooms[room.id]
            ROOMS.dec()
            self.watcher.forgotten(room.id)
        if room.handle is not None:
            room.handle.cancel()

    # -- events in -----------------------------------------------------------------------

    async def publish(self, room_id: str, data: bytes) -> None:
        """Send a live event (JSON, no seq, not kept in history) to the room's members in
        every process, with their next batch. Durable events come from the Lua scripts."""
        await self.broker.publish(room_id, data)

    def on_message(self, room_id: str, data: bytes) -> None:
        room = self.rooms.get(room_id)
        if room is None:
            return
        read = self._read(room_id, data, live=True)
        if read is None:
            return
        seq, item = read
        if seq:
            self._apply(room, room.seq.feed(seq, item))
        elif room.ready.done():  # a live event: no order to keep, nothing to fill
            self._queue(room, 0, data)

    def on_reconnect(self, room_id: str) -> None:
        """The room's subscription came back: what was published meanwhile comes from
        history."""
        room = self.rooms.get(room_id)
        if room is not None and room.seq.reconnect():
            self._spawn(self._fill(room, check_head=True))

    def _read(self, room_id: str, data: bytes, live: bool = False) -> tuple[int, Item] | None:
        """(seq, (type, bytes)) of a durable event, or with ``live`` (0, ...) of a live one
        (no seq, not a durable type); anything else is logged and counted."""
        try:
            type_, seq = events.head(data)
        except events.BadEvent as exc:
            self._bad_event(room_id, data, str(exc))
            return None
        if not seq and live and type_ not in events.DURABLE:
            return 0, (type_, data)
        if not seq:
            self._bad_event(room_id, data, f"a {type_!r} event without a seq")
            return None
        return seq, (type_, data)

    def _read_all(self, room_id: str, rows: Iterable[bytes]) -> list[tuple[int, Item]]:
        return [read for data in rows if (read := self._read(room_id, data)) is not None]

    def _bad_event(self, room_id: str, data: bytes, why: str) -> None:
        BAD_EVENTS.inc()
        now = time.monotonic()
        if now - self._bad_logged < BAD_EVENT_LOG_EVERY:
            self._bad_unlogged += 1
            return
        log.warning(
            "room %s: dropped an event the hub cannot read (%s; %d more since the last "
            "warning): %.200r",
            room_id,
            why,
            self._bad_unlogged,
            data,
        )
        self._bad_logged, self._bad_unlogged = now, 0

    async def _fill(self, room: Room, check_head: bool = False) -> None:
        """Deliver what pub/sub missed, from the room's history, then what it stashed.

        With ``check_head`` (after a pub/sub reconnect) it also asks for the room's latest
        seq. Data-store errors are retried with backoff for as long as the room has
        members here, so a Redis restart cannot leave a gap behind.
        """
        delay = 0.1
        try:
            while room.seq.filling and self.rooms.get(room.id) is room:
                try:
                    head = await self.broker.latest_seq(room.id) if check_head else 0
                    span = room.seq.gap(head)
                    rows = await self.broker.history(room.id, *span) if span else []
                except Exception as exc:
                    log.warning("room %s: filling from history failed (%s); retrying", room.id, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                check_head = False
                self._apply(room, room.seq.filled(self._read_all(room.id, rows)))
        finally:
            room.seq.cancel_fill()

    def _apply(self, room: Room, step: Step[Item]) -> None:
        """Carry out what the room's sequencer decided."""
        for seq, (type_, data) in step.deliver:
            if type_ == events.STREAM_ENDED:
                room.ended = True
            self.watcher.delivered(room.id, type_)
            self._queue(room, seq, data)
        for first, last in step.lost:
            log.warning("room %s: history lost seq %d..%d", room.id, first, last)
        if step.fill:
            self._spawn(self._fill(room))

    def _queue(self, room: Room, seq: int, data: bytes) -> None:
        """Queue one event for the room's next batch."""
        if not room.pending:
            room.first_pending = time.perf_counter()
            if room.handle is None:
                window = max(self.pace.base_s, room.window)
                if window > 0:
                    room.handle = self._loop.call_later(window, self._flush, room)
                else:
                    room.handle = self._loop.call_soon(self._flush, room)
        room.pending.append((seq, data))

    # -- events out ----------------------------------------------------------------------

    def _flush(self, room: Room) -> None:
        """Write the room's pending events: one payload per codec, packed once per wire.

        The room's next window comes from :class:`Pace`: ``batch_ms`` while the loop
        keeps up, wider, in proportion to what this write loop took, while it is behind.
        """
        room.handle = None
        batch = room.pending
        if not batch:
            return
        started = time.perf_counter()
        room.pending = []
        delivered = room.write(batch)
        done = time.perf_counter()
        room.window = self.pace.window(done - started)
        DELIVERIES.inc(delivered * len(batch))
        FANOUT_BATCH.observe(len(batch))
        FANOUT_LATENCY.observe(done - room.first_pending)
        if room.ended:
            room.close_live(disconnect.NORMAL)

    def _probe_lag(self, due: float) -> None:
        """Tell Pace how late this timer fired, and set the next while there are rooms.

        The clock is read here, not ``loop.time()``: uvloop's is read once per loop
        iteration, so it would not show a flush that ran just before this timer."""
        now = time.perf_counter()
        self.pace.lagged(now, max(0.0, now - due))
        if self.rooms:
            self._probe = self._loop.call_later(LAG_PROBE_S, self._probe_lag, now + LAG_PROBE_S)
        else:
            self._probe = None

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
