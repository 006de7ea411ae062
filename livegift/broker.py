"""Room events over Redis sharded pub/sub, and room history.

Every channel (a room's, a followed creator's feed: :mod:`livegift.follow`) is a shard
channel: the Lua scripts SPUBLISH to it where its slot lives, and this process
SSUBSCRIBEs there. One server or a Redis Cluster, one code path: the channels are grouped
by the master that serves their slot, with one pub/sub connection and one reader task per
master in use (on one server, the server).

- One SSUBSCRIBE per channel per process, counted: the last unsubscribe ends it.
- A subscribe returns once the server confirms it (else ``Unavailable`` after
  ``confirm_timeout``), so a read of the room's seq afterwards cannot miss an event.
- A channel lost (its connection dropped, its master gone or hung, its slot moved, which
  the server tells with a pushed ``sunsubscribe`` or a MOVED) is subscribed again through
  whichever master serves it after a refresh of the slot map, retried with backoff. Then
  its owner hears of it: the hub refills that room from history, a feed re-reads.
- Events go to ``on_message(room, bytes)`` untouched, read straight off the connection.

Room reads (seq, history) and live events (SPUBLISH) go through the store client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final

from redis import exceptions as redis_errors
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from livegift import keys
from livegift.errors import Unavailable
from livegift.metrics import REDIS_ERRORS
from livegift.scripts import store_errors
from livegift.store import is_cluster, node_for

log = logging.getLogger("livegift.broker")

OnMessage = Callable[[str, bytes], None]
OnRoomBack = Callable[[str], None]
OnReconnect = Callable[[], None]
OnData = Callable[[bytes], None]

SSUBSCRIBE: Final = "SSUBSCRIBE"
SUNSUBSCRIBE: Final = "SUNSUBSCRIBE"
# The heartbeat's PING payload (commands are marked with PINGs of their own).
HEARTBEAT: Final = b"lg:hb"
# A refusal worth trying again, after a refresh of the slot map: the slot moved, is
# moving, or its master is being replaced.
RETRYABLE: Final = (
    redis_errors.AskError,  # MOVED too
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.BusyLoadingError,
)
# Channels per SSUBSCRIBE on one server (a cluster takes one slot's channels per command).
BATCH: Final = 500
# Options of the store's connections that a pub/sub connection must not copy.
NOT_COPIED: Final = ("maint_notifications", "oss_cluster_maint", "orig_")


class _Sub:
    """One channel this process listens to: how many want it, and where it stands."""

    __slots__ = ("confirmed", "link", "lost", "ready", "refs")

    def __init__(self, ready: asyncio.Future[None]) -> None:
        self.refs = 0
        self.ready = ready  # done at the first confirmation
        self.link: _Link | None = None  # where its SSUBSCRIBE went; None: to be placed
        self.confirmed = False  # the server confirmed it on ``link``
        self.lost = False  # confirmed once, then lost: its owner hears when it is back


class _Command:
    """A command sent on a link, until the PING sent right after it is answered: every
    reply in between (a confirmation or an error, which names no channel) is its own."""

    __slots__ = ("kind", "subs", "token")

    def __init__(self, kind: str, subs: dict[bytes, _Sub], token: bytes) -> None:
        self.kind = kind
        self.subs = subs
        self.token = token


class _Link:
    """One pub/sub connection to one node, and the task that connects and reads it."""

    def __init__(self, name: str, connection: AbstractConnection, broker: Broker) -> None:
        self.name = name
        self.connection = connection
        self.broker = broker
        self.channels: set[bytes] = set()  # placed here: sent, or to send once connected
        self.unsent: list[bytes] = []
        self.sent: deque[_Command] = deque()
        self.up = False
        self.was_up = False  # connected once: losing it is news, failing to connect less so
        self.dead = False
        self.heard = 0.0  # loop time of the last reply
        self.pinged = 0.0  # loop time of the last heartbeat
        self.idle = 0  # heartbeats seen with no channel here
        self._lock = asyncio.Lock()
        self._tokens = itertools.count()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"pubsub {name}")

    async def subscribe(self, channels: list[bytes]) -> None:
        if self.up:
            await self._send(SSUBSCRIBE, channels)
        else:
            self.unsent += channels

    async def unsubscribe(self, channel: bytes) -> None:
        self.channels.discard(channel)
        if channel in self.unsent:
            self.unsent.remove(channel)
        elif self.up:
            await self._send(SUNSUBSCRIBE, [channel])

    async def ping(self) -> None:
        self.pinged = asyncio.get_running_loop().time()
        await self._write([("PING", HEARTBEAT)])

    def close(self) -> None:
        self.up, self.dead = False, True
        if self.task is not asyncio.current_task():
            self.task.cancel()

    async def _send(self, kind: str, channels: list[bytes]) -> None:
        """``kind`` for ``channels``, one slot's worth per command, each followed by a
        PING that marks the end of its replies."""
        if kind == SSUBSCRIBE:  # not those unsubscribed while this waited its turn
            channels = [c for c in channels if self.broker.placed_here(c, self)]
        for group in self.broker.groups(channels):
            token = b"lg:%d" % next(self._tokens)
            subs = self.broker.subs_of(group) if kind == SSUBSCRIBE else {}
            async with self._lock:
                self.sent.append(_Command(kind, subs, token))
                await self._write([(kind, *group), ("PING", token)])

    async def _write(self, commands: list[tuple[Any, ...]]) -> None:
        if not self.up:  # never let redis-py reconnect a dead link behind the reader's back
            return
        try:
            await self.connection.send_packed_command(
                self.connection.pack_commands(commands), check_health=False
            )
        except (redis_errors.RedisError, OSError) as exc:
            self.broker.down(self, exc)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.broker.connect_timeout):
                await self.connection.connect()  # type: ignore[no-untyped-call]
            self.up = self.was_up = True
            self.heard = loop.time()
            unsent, self.unsent = self.unsent, []
            await self.subscribe(unsent)
            while self.up:
                try:
                    reply = await self.connection.read_response(
                        timeout=math.inf, disconnect_on_error=False
                    )
                except redis_errors.ResponseError as exc:  # an error reply: not the link's
                    self.heard = loop.time()
                    self._refused(exc)
                    continue
                self.heard = loop.time()
                self._handle(reply)
        except Exception as exc:  # lost, refused, timed out, unreadable: gone all the same
            self.broker.down(self, exc)
        finally:
            self.up = False
            with contextlib.suppress(Exception):
                await self.connection.disconnect(nowait=True)

    def _handle(self, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) >= 2:
            kind = reply[0]
            if kind == b"smessage":
                self.broker.deliver(reply[1], reply[2])
            elif kind == b"ssubscribe":
                self._confirmed(reply[1])
            elif kind == b"sunsubscribe":
                self.broker.pushed_out(self, reply[1])
            elif kind == b"pong":
                self._marker(reply[1])
        elif isinstance(reply, bytes):  # PING's answer while subscribed to nothing
            self._marker(reply)

    def _confirmed(self, channel: bytes) -> None:
        head = self.sent[0] if self.sent else None
        sub = head.subs.get(channel) if head is not None else None
        if sub is not None:
            self.broker.confirmed(self, channel, sub)

    def _refused(self, exc: redis_errors.ResponseError) -> None:
        head = self.sent[0] if self.sent else None
        if head is not None and head.subs:
            subs, head.subs = head.subs, {}
            self.broker.refused(self, subs, exc)

    def _marker(self, token: bytes) -> None:
        if self.sent and self.sent[0].token == token:
            self.sent.popleft()


class Broker:
    # How long a subscribe waits for the data store to confirm it.
    confirm_timeout = 10.0
    # How long a pub/sub connection may take to connect (and authenticate).
    connect_timeout = 5.0
    # A pub/sub connection is pinged this often, and is given up (its channels subscribed
    # again elsewhere) when a ping is not answered by the next: a hung master.
    ping_interval = 5.0
    # Seconds between two attempts to subscribe lost channels again (doubling up to max).
    backoff_min = 0.1
    backoff_max = 1.0

    def __init__(self, redis: Any, on_message: OnMessage, on_reconnect: OnRoomBack) -> None:
        self.redis: Any = redis
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._cluster = is_cluster(redis)
        self._subs: dict[bytes, _Sub] = {}
        self._rooms: dict[bytes, str] = {}
        # Channels that are not a room's: what to call with a message and after a reconnect.
        self._channels: dict[bytes, tuple[OnData, OnReconnect]] = {}
        self._links: dict[str, _Link] = {}
        # Wanted channels on no link; the repair task places them again.
        self._lost: set[bytes] = set()
        self._lost_event = asyncio.Event()
        self._delay = self.backoff_min
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._repair(), name="pubsub repair"),
            loop.create_task(self._watch(), name="pubsub heartbeat"),
        ]

    async def close(self) -> None:
        links = list(self._links.values())
        self._links.clear()
        tasks = self._tasks + [link.task for link in links]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- what the hub and the feeds use ----------------------------------------------------

    async def subscribe(self, room: str) -> None:
        channel = keys.channel(room).encode()
        self._rooms[channel] = room
        await self._subscribe(channel)

    async def unsubscribe(self, room: str) -> None:
        channel = keys.channel(room).encode()
        if await self._unsubscribe(channel):
            self._rooms.pop(channel, None)

    async def listen(self, channel: str, on_data: OnData, on_reconnect: OnReconnect) -> None:
        """Subscribe to a channel that is not a room's. ``on_reconnect`` is called after
        it is subscribed again, since messages published meanwhile are lost."""
        raw = channel.encode()
        self._channels[raw] = (on_data, on_reconnect)
        await self._subscribe(raw)

    async def unlisten(self, channel: str) -> None:
        raw = channel.encode()
        if await self._unsubscribe(raw):
            self._channels.pop(raw, None)

    async def publish(self, room: str, data: bytes) -> None:
        """Publish a live (non-durable) event on the room's channel."""
        await self.redis.spublish(keys.channel(room), data)

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

    # -- subscriptions -------------------------------------------------------------------

    async def _subscribe(self, channel: bytes) -> None:
        sub = self._subs.get(channel)
        if sub is None:
            sub = self._subs[channel] = _Sub(asyncio.get_running_loop().create_future())
        # Counted, so that an unsubscribe left over from a room dropped a moment ago
        # cannot end this newer subscription.
        sub.refs += 1
        if sub.link is None and channel not in self._lost:
            await self._place([channel])
        try:
            with store_errors():
                await asyncio.wait_for(asyncio.shield(sub.ready), self.confirm_timeout)
        except TimeoutError:
            # A join waiting on this answers 1013, like any other data-store outage.
            raise Unavailable("the data store did not confirm the subscription") from None

    async def _unsubscribe(self, channel: bytes) -> bool:
        """Drop one reference; True when it was the last."""
        sub = self._subs.get(channel)
        if sub is None:
            return True
        sub.refs -= 1
        if sub.refs > 0:
            return False
        del self._subs[channel]
        self._lost.discard(channel)
        sub.ready.cancel()
        if sub.link is not None:
            await sub.link.unsubscribe(channel)
        return True

    async def _place(self, channels: Iterable[bytes]) -> None:
        """Send each channel to the link of the master that serves its slot."""
        placed: dict[_Link, list[bytes]] = {}
        for channel in channels:
            sub = self._subs.get(channel)
            if sub is None or sub.link is not None:
                continue
            try:
                link = self._link_for(channel)
            except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
                log.warning("pub/sub: no node for %r (%s)", channel, exc)
                self._lose(channel, sub)
                continue
            sub.link = link
            link.channels.add(channel)
            placed.setdefault(link, []).append(channel)
        for link, group in placed.items():
            await link.subscribe(group)

    def _link_for(self, channel: bytes) -> _Link:
        if self._cluster:
            node = node_for(self.redis, channel.decode())
            name, make, options = node.name, node.connection_class, node.connection_kwargs
        else:
            pool = self.redis.connection_pool
            name, make, options = "the store", pool.connection_class, pool.connection_kwargs
        link = self._links.get(name)
        if link is None:
            # The store's own options (address, credentials, TLS, client name), in RESP2:
            # pub/sub replies as plain arrays, and nothing else arrives unasked.
            kwargs = {k: v for k, v in options.items() if not k.startswith(NOT_COPIED)}
            kwargs.update(protocol=2, health_check_interval=0)
            link = self._links[name] = _Link(name, make(**kwargs), self)
        return link

    def groups(self, channels: list[bytes]) -> list[list[bytes]]:
        """Channels in the batches one command may carry: on a cluster, one slot's."""
        if not self._cluster:
            return [channels[i : i + BATCH] for i in range(0, len(channels), BATCH)]
        slots: dict[int, list[bytes]] = {}
        for channel in channels:
            slots.setdefault(key_slot(channel), []).append(channel)
        return list(slots.values())

    def subs_of(self, channels: list[bytes]) -> dict[bytes, _Sub]:
        return {c: sub for c in channels if (sub := self._subs.get(c)) is not None}

    def placed_here(self, channel: bytes, link: _Link) -> bool:
        sub = self._subs.get(channel)
        return sub is not None and sub.link is link

    # -- what the links report -------------------------------------------------------------

    def deliver(self, channel: bytes, data: bytes) -> None:
        try:
            room = self._rooms.get(channel)
            if room is not None:
                self._on_message(room, data)
            elif (handlers := self._channels.get(channel)) is not None:
                handlers[0](data)
        except Exception:  # one bad event must not cost every channel on the link
            log.exception("pub/sub: handling a message on %r failed", channel)

    def confirmed(self, link: _Link, channel: bytes, sub: _Sub) -> None:
        if self._subs.get(channel) is not sub or sub.link is not link:
            return  # unsubscribed, or placed elsewhere, meanwhile
        sub.confirmed = True
        if not sub.ready.done():
            sub.ready.set_result(None)
        if sub.lost:
            sub.lost = False
            self._delay = self.backoff_min
            self._reconnected(channel)

    def refused(self, link: _Link, subs: dict[bytes, _Sub], exc: Exception) -> None:
        """An SSUBSCRIBE answered with an error: a slot elsewhere now is placed again;
        anything else fails the subscribes that wait for it."""
        retry = isinstance(exc, RETRYABLE)
        if retry:
            log.info("pub/sub: %s refused %d channels (%s); again", link.name, len(subs), exc)
        else:
            log.warning("pub/sub: %s refused %d channels (%s)", link.name, len(subs), exc)
        for channel, sub in subs.items():
            if self._subs.get(channel) is not sub or sub.link is not link:
                continue
            link.channels.discard(channel)
            if retry or sub.lost:
                self._lose(channel, sub)
                continue
            sub.link = None
            waiting, sub.ready = sub.ready, asyncio.get_running_loop().create_future()
            if not waiting.done():
                waiting.set_exception(exc)
                waiting.exception()  # the waiters have it; nobody else needs to

    def pushed_out(self, link: _Link, channel: bytes) -> None:
        """The server unsubscribed us (the slot is no longer this node's): subscribe again
        through its new master. Also the answer to our own SUNSUBSCRIBE, which concerns
        no channel that is confirmed here."""
        sub = self._subs.get(channel)
        if sub is not None and sub.link is link and sub.confirmed:
            log.info("pub/sub: %s dropped %r (slot moved); subscribing again", link.name, channel)
            link.channels.discard(channel)
            self._lose(channel, sub)

    def down(self, link: _Link, exc: BaseException) -> None:
        """A link failed (lost, refused, hung): its channels go to whichever master serves
        them by the time the repair task runs."""
        if link.dead:
            return
        if self._links.get(link.name) is link:
            del self._links[link.name]
        link.close()
        REDIS_ERRORS.labels("pubsub").inc()
        lost = [c for c in link.channels if self.placed_here(c, link)]
        link.channels.clear()
        log.log(
            logging.WARNING if link.was_up else logging.INFO,
            "pub/sub connection to %s %s (%s); %d channels to subscribe again",
            link.name,
            "lost" if link.was_up else "failed",
            exc,
            len(lost),
        )
        for channel in lost:
            self._lose(channel, self._subs[channel])

    def _lose(self, channel: bytes, sub: _Sub) -> None:
        sub.link = None
        if sub.confirmed:
            sub.confirmed, sub.lost = False, True
        self._lost.add(channel)
        self._lost_event.set()

    def _reconnected(self, channel: bytes) -> None:
        try:
            room = self._rooms.get(channel)
            if room is not None:
                self._on_reconnect(room)
            elif (handlers := self._channels.get(channel)) is not None:
                handlers[1]()
        except Exception:
            log.exception("pub/sub: the reconnect handler of %r failed", channel)

    # -- background tasks ----------------------------------------------------------------

    async def _repair(self) -> None:
        """Place lost channels again, after a backoff and a refresh of the slot map."""
        while True:
            await self._lost_event.wait()
            await asyncio.sleep(self._delay * random.uniform(0.5, 1.0))
            self._delay = min(self._delay * 2, self.backoff_max)
            if self._cluster:
                # A failure (cluster still down) is fine: the next round asks again.
                with contextlib.suppress(Exception):
                    await self.redis.nodes_manager.initialize()
            lost = list(self._lost)
            self._lost.clear()
            self._lost_event.clear()
            await self._place(lost)

    async def _watch(self) -> None:
        """Ping every link; give up one that did not answer the previous ping (a hung
        node holds its sockets open, so nothing else would tell), and close a link that
        has served no channel for two rounds."""
        while True:
            await asyncio.sleep(self.ping_interval)
            for link in list(self._links.values()):
                if not link.up:
                    continue  # still connecting: bounded by connect_timeout
                if link.pinged and link.heard < link.pinged:
                    self.down(link, TimeoutError("no answer to a ping"))
                    continue
                link.idle = 0 if link.channels or link.sent else link.idle + 1
                if link.idle > 2:
                    del self._links[link.name]
                    link.close()
                    continue
                # A write that cannot even leave (a hung server with full buffers) is
                # cut here; redis-py then drops the connection, and the reader fails.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.ping_interval):
                        await link.ping()
