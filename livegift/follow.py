"""A creator's overlay connection, ``/ws/creator/{user}?key=K`` (PROTOCOL §8).

It carries no user token: the creator's overlay key (:mod:`livegift.overlays`) lets it in,
read-only, and it follows the creator from one live stream to the next:

- **open**: subscribe to the creator's feed channel (one subscription per creator per
  process, :class:`Following`), then check the key, then follow what is live: the live
  room's ``welcome`` and events, or an ``offline`` event. Checking the key after the
  subscription is confirmed means a key replaced meanwhile is always noticed.
- **follow**: ``lua/stream_start.lua`` publishes ``stream_started`` on the feed; the
  connection then leaves its room and joins the new one through the hub (a ``stream_started``
  event ``{room}``, then that room's ``welcome``). When the stream ends the member gets
  ``stream_ended`` like everyone, but the socket stays open: ``offline`` follows. Every
  switch re-reads the creator's live room under one lock, so events that cross cannot
  leave it in an old room.
- **not a viewer**: its member is not counted (``Member.counted``), nor in the per-user
  connection cap; every op is answered ``forbidden``.
- **revoked**: a new key announces itself on the feed (``overlay_key``); every process
  closes the creator's overlay sockets opened with another key, 4401.

It offers the drivers the same calls as :class:`livegift.connection.Connection`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from livegift import disconnect, events, keys, overlays
from livegift.api.handshake import FollowJoin, welcome
from livegift.connection import MAX_QUEUED_OPS, Flow, close_too_slow, run_or_close
from livegift.disconnect import Close
from livegift.errors import BadRequest, Forbidden, LiveGiftError, Unauthorized, Unavailable
from livegift.hub import Member, Sink
from livegift.metrics import BAD_FRAMES, CONNECTIONS
from livegift.protocol import Wire, ack_error, read_req

if TYPE_CHECKING:
    from livegift.broker import Broker
    from livegift.services import Services

log = logging.getLogger("livegift.follow")

JOINING, OPEN, CLOSED = range(3)
# The closes a room gives its members that end only the room, not the overlay's socket.
ROOM_OVER = (disconnect.NORMAL, disconnect.NOT_FOUND)
READ_ONLY = "this overlay connection is read-only"
OFFLINE = object()  # Follow.room while the creator is known to have no live stream


class RoomSink:
    """The hub's sink for an overlay in one room: writes go to the socket, but the room's
    own closes (stream ended, room gone) end only the follow of that room."""

    __slots__ = ("closed", "follow", "on_close", "sink", "wire")

    def __init__(self, follow: Follow) -> None:
        self.follow = follow
        self.sink = follow.sink
        self.wire: Wire = follow.sink.wire
        self.closed = False
        self.on_close: Callable[[], None] | None = None

    @property
    def writer(self) -> Callable[[Any], None]:
        return self.sink.writer

    def write(self, data: bytes | str) -> None:
        if not self.closed:
            self.sink.write(data)

    def buffered(self) -> int:
        return self.sink.buffered()

    def close(self, close: Close, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        if self.on_close is not None:
            self.on_close()
        if close in ROOM_OVER:
            # Called from inside the hub's fan-out: leave the room on the next tick.
            asyncio.get_running_loop().call_soon(self.follow.room_over, self)
        else:
            self.sink.close(close, reason)


class Follow:
    """One overlay connection: the driver's connection object for ``/ws/creator/``."""

    __slots__ = (
        "_early",
        "_flow",
        "_lock",
        "bad_frames",
        "digest",
        "join",
        "member",
        "room",
        "services",
        "sink",
        "state",
    )

    def __init__(
        self, services: Services, join: FollowJoin, sink: Sink, flow: Flow | None = None
    ) -> None:
        self.services = services
        self.join = join
        self.sink = sink
        self.digest = overlays.digest(join.key)
        self.state = JOINING
        # The live room followed now; None: not known yet; OFFLINE: nothing is live.
        self.room: object = None
        self.member: Member | None = None
        self.bad_frames = 0
        self._flow = flow
        self._early: list[bytes | str] = []  # ops sent before the first event went out
        self._lock = asyncio.Lock()
        sink.on_close = self._detach
        CONNECTIONS.inc()

    # -- open ----------------------------------------------------------------------------

    def start(self) -> None:
        self.services.following.spawn(self.open())

    async def open(self) -> bool:
        """Check the key and follow the creator; True once open. On failure, closed."""
        try:
            await run_or_close(self.sink, self._open(), "overlay connection failed")
        finally:
            if self.state == JOINING:
                self.sink.close(disconnect.SERVER_ERROR, "could not follow the creator")
        return self.state == OPEN

    async def _open(self) -> None:
        services, user = self.services, self.join.user
        if self.state != JOINING:
            return
        await services.following.add(user, self)
        if self.state == CLOSED:  # closed while subscribing: closed() may have run first
            services.following.remove(user, self)
            return
        if not await overlays.valid(services.redis, user, self.digest):
            raise Unauthorized("this overlay key is not valid (replaced by a newer one?)")
        if self.state != JOINING or self.sink.closed:
            return
        self.state = OPEN
        await self.sync(announce=False)
        early, self._early = self._early, []
        for data in early:
            self.receive(data)
        if self._flow is not None and self.state == OPEN:
            self._flow.resume_reading()

    # -- follow --------------------------------------------------------------------------

    async def sync(self, announce: bool = True, ended: str | None = None) -> None:
        """Follow what the creator has live now: stay, switch rooms, or say offline.
        ``ended``: a room that just ended here, not to be joined again even if its hash
        still says live (a room re-opened in place, as the demo does, starts it anew)."""
        async with self._lock:
            if self.state != OPEN:
                return
            live = await self.services.streams.live_room(self.join.user)
            if live is not None and live[0] == ended:
                live = None
            room = live[0] if live else OFFLINE
            if room == self.room or self.state != OPEN:
                return
            self._leave()
            self.room = room
            if live is None:
                self._send({"type": events.OFFLINE, "creator": self.join.user})
                return
            room_id, info = live
            if announce:
                self._send({"type": events.STREAM_STARTED, "room": room_id})
            self.member = Member(self.join.user, RoomSink(self), counted=False)
            await self.services.hub.join(room_id, self.member, welcome(room_id, None, info))

    def room_over(self, sink: RoomSink) -> None:
        """The followed stream ended (its ``stream_ended`` went out): see what is live."""
        if self.member is None or self.member.sink is not sink or self.state != OPEN:
            return
        ended = self.room if isinstance(self.room, str) else None
        self._leave()
        self.room = None
        self.background(self.sync(ended=ended))

    def _leave(self) -> None:
        member, room = self.member, self.room
        self.member = None
        if member is not None and isinstance(room, str):
            self.services.hub.leave(room, member)

    def _detach(self) -> None:
        """The socket is closing: stop the room writing to it at once."""
        member = self.member
        if member is not None and member.sink.on_close is not None:
            member.sink.on_close()

    # -- what the creator's feed says (Following) ----------------------------------------

    def stream_started(self) -> None:
        if self.state == OPEN:
            self.background(self.sync())

    def revoked(self, key_id: str) -> None:
        """A new key was made; this connection's key is revoked unless it is that one."""
        if self.state != CLOSED and overlays.key_id(self.digest) != key_id:
            self.sink.close(Unauthorized.close, "overlay key revoked")

    def resync(self) -> None:
        """Pub/sub came back: what it missed may be a new stream or a new key."""
        if self.state == OPEN:
            self.background(self._recheck())

    async def _recheck(self) -> None:
        if not await overlays.valid(self.services.redis, self.join.user, self.digest):
            self.sink.close(Unauthorized.close, "overlay key revoked")
            return
        await self.sync()

    def background(self, work: Awaitable[None]) -> None:
        """Run a switch; its failure closes the socket as the error says."""
        self.services.following.spawn(run_or_close(self.sink, work, "overlay switch failed"))

    # -- ops: none allowed ---------------------------------------------------------------

    def receive(self, data: bytes | str) -> None:
        """A client frame: ``forbidden`` (``bad_request`` when it is not even an op)."""
        if self.state == CLOSED or self.sink.closed:
            return
        if self.state == JOINING:
            self._early.append(data)
            if len(self._early) >= MAX_QUEUED_OPS and self._flow is not None:
                self._flow.pause_reading()
            return
        req: str | None = None
        error: LiveGiftError = Forbidden(READ_ONLY)
        try:
            req = read_req(self.join.codec.decode(data))
        except Exception:
            error = BadRequest("frame is not valid " + self.join.codec.name)
            self.bad_frames += 1
            BAD_FRAMES.inc()
        self._send(ack_error(req, error.code, error.message))
        if self.bad_frames >= self.services.settings.max_bad_frames:
            self.sink.close(disconnect.POLICY)

    async def op(self, data: bytes | str) -> None:
        self.receive(data)

    def _send(self, event: dict[str, Any]) -> None:
        if not self.sink.closed:
            self.sink.write(self.sink.wire.encode(event))

    # -- leave ---------------------------------------------------------------------------

    def too_slow(self) -> None:
        close_too_slow(self.sink)

    def closed(self) -> None:
        """The socket is gone: leave the room and the creator's feed. Safe to call twice."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        CONNECTIONS.dec()
        self._leave()
        self._early = []
        self.services.following.remove(self.join.user, self)


class Feed:
    """One followed creator in this process: its overlays, and whether it is subscribed."""

    __slots__ = ("followers", "ready")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.followers: set[Follow] = set()
        self.ready: asyncio.Future[None] = loop.create_future()


class Following:
    """This process's followed creators: one feed subscription each, shared by overlays."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.feeds: dict[str, Feed] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def add(self, user: str, follow: Follow) -> None:
        """Add an overlay; returns once the creator's feed is subscribed here."""
        feed = self.feeds.get(user)
        if feed is not None:
            feed.followers.add(follow)
            await asyncio.shield(feed.ready)
            return
        feed = self.feeds[user] = Feed(asyncio.get_running_loop())
        feed.followers.add(follow)
        channel = keys.creator_channel(user)
        try:
            await self.broker.listen(
                channel, partial(self._message, user), partial(self._reconnected, user)
            )
        except BaseException as exc:
            # Waiters get a plain error even when this one was cancelled.
            failed = exc if isinstance(exc, Exception) else Unavailable("follow aborted")
            feed.ready.set_exception(failed)
            feed.ready.exception()  # mark retrieved
            if self.feeds.get(user) is feed:
                del self.feeds[user]
            self.spawn(self.broker.unlisten(channel))
            raise
        feed.ready.set_result(None)

    def remove(self, user: str, follow: Follow) -> None:
        feed = self.feeds.get(user)
        if feed is None or follow not in feed.followers:
            return
        feed.followers.discard(follow)
        if not feed.followers:
            del self.feeds[user]
            self.spawn(self.broker.unlisten(keys.creator_channel(user)))

    def _message(self, user: str, data: bytes) -> None:
        feed = self.feeds.get(user)
        if feed is None:
            return
        try:
            event = orjson.loads(data)
            kind = event["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("creator %s: a feed message the server cannot read: %.200r", user, data)
            return
        for follow in list(feed.followers):
            if kind == events.STREAM_STARTED:
                follow.stream_started()
            elif kind == overlays.REVOKED:
                follow.revoked(str(event.get("id")))

    def _reconnected(self, user: str) -> None:
        feed = self.feeds.get(user)
        for follow in list(feed.followers if feed else ()):
            follow.resync()
