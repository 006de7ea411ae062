"""The hub on the real broker and the real Redis pub/sub, with in-test sinks.

Durable events reach the hub the way the real system sends them: from the Lua scripts
(:class:`~livegift.streams.Streams`), or written here as the scripts write them (the event
in the room's history with its seq as score, the room's seq bumped, the bytes published
on the room's channel) so a test can leave an event out of pub/sub on purpose (a gap),
publish it twice (a duplicate), or kill the hub's pub/sub connection (a reconnect).
Every test uses a room of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import orjson
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from livegift import disconnect, events, keys
from livegift.auth import User
from livegift.broker import Broker
from livegift.config import Settings
from livegift.disconnect import Close
from livegift.hub import LAG_PROBE_S, LOOP_LAG_LIMIT_S, STRETCH_MAX, STRETCH_MIN, Hub, Member, Pace
from livegift.protocol import JSON_FRAMES, JSON_TEXT, MSGPACK_BYTES, MSGPACK_FRAMES, Wire
from livegift.streams import Streams
from tests.conftest import PAYMENT_SECRET, SECRET, uid, unit

SETTINGS = Settings(secret=SECRET, payment_secret=PAYMENT_SECRET)


class RecordingSink:
    """A member's end of the hub (the hub's ``Sink``): keeps what it is written."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.closed = False
        self.on_close: Callable[[], None] | None = None
        self.got: list[Any] = []
        self.closes: list[tuple[Close, str]] = []

    @property
    def writer(self) -> Callable[[Any], None]:
        return self.got.append

    def write(self, data: bytes | str) -> None:
        if not self.closed:
            self.got.append(data)

    def buffered(self) -> int:
        return 0  # everything written is taken at once

    def close(self, close: Close, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            if self.on_close is not None:
                self.on_close()
            self.closes.append((close, reason or close.reason))

    def events(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for item in self.got:
            payload = unframe(item) if self.wire.framed else item
            value = msgpack.unpackb(payload) if self.wire.codec.binary else orjson.loads(payload)
            out.extend(value if isinstance(value, list) else [value])
        return out

    def seqs(self) -> list[int]:
        return [e["seq"] for e in self.events() if e["type"] in events.DURABLE]


def unframe(frame: bytes) -> bytes:
    n = frame[1] & 0x7F
    return frame[2 + (0 if n < 126 else 2 if n == 126 else 8) :]


async def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait (polling) until ``check()`` holds; fail after ``unit(timeout)`` seconds."""
    deadline = time.monotonic() + unit(timeout)
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Publisher:
    """Writes a room's durable events the way the Lua scripts do, one MULTI per event."""

    def __init__(self, redis: Redis, room: str) -> None:
        self.redis = redis
        self.room = room
        self.seq = 0

    async def emit(self, type_: str = events.GIFT, times: int = 1, **fields: Any) -> bytes:
        """The next event: kept in history, the room's seq bumped, published ``times``
        times (0: pub/sub never carries it, only history has it)."""
        self.seq += 1
        data = events.event(type_, self.seq, int(time.time() * 1000), room=self.room, **fields)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(keys.history(self.room), {data: self.seq})
            pipe.hset(keys.room(self.room), "seq", self.seq)
            for _ in range(times):
                pipe.spublish(keys.channel(self.room), data)
            await pipe.execute()
        return data

    async def publish(self, data: bytes) -> None:
        """Raw bytes on the room's channel (no history, no seq)."""
        await self.redis.spublish(keys.channel(self.room), data)


HubFactory = Callable[..., Awaitable[Hub]]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def make_hub(redis_url: str) -> AsyncIterator[HubFactory]:
    """Hubs on real brokers, each with a Redis client named ``hub.name`` (so a test can
    find its pub/sub connection in CLIENT LIST)."""
    made: list[tuple[Hub, Redis]] = []

    async def make(batch_ms: int = 0) -> Hub:
        name = uid("hubtest")
        client = Redis.from_url(redis_url, client_name=name)
        hub = Hub(
            lambda on_message, on_reconnect: Broker(client, on_message, on_reconnect),
            batch_ms=batch_ms,
            linger_s=0.01,
        )
        hub.name = name  # type: ignore[attr-defined]
        made.append((hub, client))
        await hub.start()
        return hub

    yield make
    for hub, client in made:
        for task in list(hub._tasks):
            task.cancel()
        await hub.close()
        await client.aclose()


@pytest.fixture
async def hub(make_hub: HubFactory) -> Hub:
    return await make_hub()


@pytest.fixture
def room() -> str:
    return uid("room")


@pytest.fixture
def pub(redis: Redis, room: str) -> Publisher:
    return Publisher(redis, room)


def welcome(seq: int, viewers: int) -> dict[str, Any]:
    return {"type": "welcome", "seq": seq, "viewers": viewers}


async def join(
    hub: Hub, room: str, wire: Wire = JSON_FRAMES, since: int | None = None
) -> RecordingSink:
    sink = RecordingSink(wire)
    await hub.join(room, Member("u", sink), welcome, since)
    return sink


def bad_events() -> float:
    return REGISTRY.get_sample_value("livegift_bad_events_total") or 0


async def test_one_payload_per_codec_one_packed_object_per_wire(
    make_hub: HubFactory, room: str, redis: Redis
) -> None:
    # A batch window wide enough that three events published together form one batch.
    hub = await make_hub(batch_ms=int(unit(200)))
    sinks = [await join(hub, room, wire) for wire in (JSON_FRAMES, JSON_FRAMES, JSON_TEXT)]
    sinks += [await join(hub, room, MSGPACK_FRAMES), await join(hub, room, MSGPACK_BYTES)]
    assert [s.events()[0] for s in sinks] == [welcome(0, n) for n in range(1, 6)]
    # Three gifts kept and published in one go, as one script run after another would.
    async with redis.pipeline(transaction=True) as pipe:
        for n in range(1, 4):
            data = events.event(events.GIFT, n, 1000 + n, room=room, gift="rose")
            pipe.zadd(keys.history(room), {data: n})
            pipe.hset(keys.room(room), "seq", n)
            pipe.spublish(keys.channel(room), data)
        await pipe.execute()
    await until(lambda: all(len(s.got) >= 2 for s in sinks), "the batch at every member")
    for sink in sinks:
        assert len(sink.got) == 2 and sink.seqs() == [1, 2, 3]
        assert [e["gift"] for e in sink.events()[1:]] == ["rose"] * 3
    # The same packed object for every member of a wire; one payload per codec.
    assert sinks[0].got[1] is sinks[1].got[1]
    assert isinstance(sinks[0].got[1], bytes) and isinstance(sinks[2].got[1], str)
    assert unframe(sinks[0].got[1]) == sinks[2].got[1].encode()
    assert isinstance(sinks[4].got[1], bytes)
    assert unframe(sinks[3].got[1]) == sinks[4].got[1]


async def test_a_gap_is_filled_from_history_before_later_events(
    hub: Hub, room: str, pub: Publisher
) -> None:
    sink = await join(hub, room)
    await pub.emit()
    await until(lambda: sink.seqs() == [1], "seq 1")
    await pub.emit(times=0)  # pub/sub lost it: only the history has seq 2
    await pub.emit()
    await pub.emit()
    await until(lambda: 4 in sink.seqs(), "seq 4")
    assert sink.seqs() == [1, 2, 3, 4]
    # A late duplicate of 3, then 5 published twice: each goes out once.
    dup = await hub.broker.history(room, 2, 3)
    assert len(dup) == 1
    await pub.publish(dup[0])
    await pub.emit(times=2)
    await pub.emit()
    await until(lambda: 6 in sink.seqs(), "seq 6")
    assert sink.seqs() == [1, 2, 3, 4, 5, 6]
    assert hub.rooms[room].seq.last == 6 and not hub.rooms[room].seq.filling


async def test_after_a_reconnect_what_pub_sub_missed_comes_from_history(
    hub: Hub, room: str, pub: Publisher, redis: Redis
) -> None:
    sink = await join(hub, room)
    await pub.emit()
    await until(lambda: sink.seqs() == [1], "seq 1")
    # Two events pub/sub never brings this hub: only history has them.
    await pub.emit(times=0)
    await pub.emit(times=0)
    await asyncio.sleep(unit(0.05))
    assert sink.seqs() == [1]
    # Cut the hub's own pub/sub connection on the server.
    name = hub.name  # type: ignore[attr-defined]
    ids = [c["id"] for c in await redis.client_list(_type="pubsub") if c["name"] == name]
    assert len(ids) == 1
    assert await redis.client_kill_filter(_id=ids[0]) == 1
    await until(lambda: sink.seqs() == [1, 2, 3], "seqs 2 and 3 from history", timeout=10)
    # Subscribed again: live events flow as before.
    await pub.emit()
    await until(lambda: 4 in sink.seqs(), "seq 4 after the reconnect")
    assert sink.seqs() == [1, 2, 3, 4]


async def test_an_unreadable_event_is_logged_and_counted(
    hub: Hub, room: str, pub: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    sink = await join(hub, room)
    before = bad_events()
    with caplog.at_level(logging.WARNING, logger="livegift.hub"):
        await pub.publish(b"not json")
        await pub.publish(b'{"type":"gift","count":3}')  # durable without a seq: no order
        await pub.emit()
        await until(lambda: sink.seqs() == [1], "seq 1 after the bad events")
    assert bad_events() == before + 2
    assert "cannot read" in caplog.text
    assert [e["type"] for e in sink.events()] == ["welcome", "gift"]
    assert hub.rooms[room].seq.last == 1


async def test_live_events_published_without_seq_reach_every_member(
    make_hub: HubFactory, redis: Redis
) -> None:
    # Two processes' hubs in a room of the real scripts; durable events from the scripts.
    here, there = await make_hub(), await make_hub()
    streams = Streams(redis, SETTINGS)
    creator = User(uid("c"), "C")
    room, _ = await streams.start_stream(creator, "t")
    a = await join(here, room)
    b = await join(there, room, MSGPACK_FRAMES)
    c = await join(there, room, JSON_TEXT)
    members = (a, b, c)
    before = bad_events()
    assert await streams.shoutout(creator, room, uid("f"), "one") == 1
    await until(lambda: all(m.seqs() == [1] for m in members), "seq 1 at every member")
    viewers = events.event(events.VIEWERS, count=3)
    await here.publish(room, viewers)
    await here.publish(room, b'{"type":"like","user":"x"}')
    assert await streams.shoutout(creator, room, uid("f"), "two") == 2
    await until(lambda: all(2 in m.seqs() for m in members), "seq 2 at every member")
    for member in members:
        got = member.events()
        assert [e["type"] for e in got] == ["welcome", "shoutout", "viewers", "like", "shoutout"]
        assert got[2] == {"type": "viewers", "count": 3}
        assert got[3] == {"type": "like", "user": "x"}
        assert member.seqs() == [1, 2]
    # Not durable: not counted as bad, not kept, no seq taken, no gap to fill.
    assert bad_events() == before
    assert await redis.zcard(keys.history(room)) == 2
    assert await redis.hget(keys.room(room), "seq") == b"2"
    for hub in (here, there):
        assert hub.rooms[room].seq.last == 2 and not hub.rooms[room].seq.filling
    assert await streams.shoutout(creator, room, uid("f"), "three") == 3
    await until(lambda: all(m.seqs() == [1, 2, 3] for m in members), "seq 3 at every member")


async def test_stream_ended_closes_members_and_turns_joiners_away(hub: Hub, redis: Redis) -> None:
    streams = Streams(redis, SETTINGS)
    creator = User(uid("c"), "C")
    room, _ = await streams.start_stream(creator, "t")
    sink = await join(hub, room)
    assert await streams.end_stream(creator, room) == 1
    await until(lambda: sink.closed, "the member closed")
    assert sink.events()[-1]["type"] == events.STREAM_ENDED
    assert sink.seqs() == [1]
    assert sink.closes == [(disconnect.NORMAL, "stream ended")]
    assert disconnect.NORMAL.code == 1000
    late = await join(hub, room)
    assert late.events() == [welcome(1, 1)]
    assert late.closes == [(disconnect.NOT_FOUND, "unknown or ended room")]
    assert disconnect.NOT_FOUND.code == 4404


async def test_resume_replays_history_then_goes_live(hub: Hub, room: str, pub: Publisher) -> None:
    first = await join(hub, room)
    for _ in range(5):
        await pub.emit()
    await until(lambda: first.seqs() == [1, 2, 3, 4, 5], "seqs 1-5")
    sink = await join(hub, room, since=2)
    got = sink.events()
    assert got[0] == welcome(5, 2)
    assert [e.get("seq") for e in got[1:4]] == [3, 4, 5]
    assert got[4] == {"type": "resumed", "from": 3, "to": 5, "complete": True}
    await pub.emit()
    await until(lambda: 6 in sink.seqs() and 6 in first.seqs(), "seq 6 at both members")
    assert sink.seqs() == [3, 4, 5, 6] and first.seqs() == [1, 2, 3, 4, 5, 6]


async def test_push_counts_and_drain(hub: Hub, room: str) -> None:
    assert not hub.push(room, b'{"type":"viewers","count":1}')  # no such room here
    a, b = await join(hub, room), await join(hub, room, MSGPACK_FRAMES)
    assert hub.counts() == {room: 2}
    assert hub.push(room, b'{"type":"viewers","count":7}')
    await until(lambda: len(a.got) == len(b.got) == 2, "the pushed event")
    assert a.events()[-1] == b.events()[-1] == {"type": "viewers", "count": 7}
    hub.drain()
    assert a.closes == b.closes == [(disconnect.TRY_AGAIN_LATER, "server shutting down")]
    assert disconnect.TRY_AGAIN_LATER.code == 1013


async def test_a_subscribe_the_store_never_confirms_is_unavailable(tmp_path: Any) -> None:
    """A frozen data store: the join's subscribe gives up as `unavailable` (close 1013),
    never a bare timeout (1011)."""
    import os
    import signal

    from livegift.embedded import EmbeddedRedis
    from livegift.errors import Unavailable

    server = EmbeddedRedis(tmp_path / "data")
    url = server.start()
    assert server.process is not None
    client = Redis.from_url(url)
    broker = Broker(client, lambda room, data: None, lambda room: None)
    broker.confirm_timeout = unit(0.5)
    try:
        await broker.start()
        await broker.subscribe("alive")  # confirmed while the store answers
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(Unavailable):
                await broker.subscribe("frozen")
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
    finally:
        await broker.close()
        await client.aclose()
        server.stop()


# -- the batch window: Pace, and the hub's use of it ------------------------------------

BASE, MAX = 0.010, 0.100
BIG, SMALL = 0.050, 0.0005  # what writing one batch takes: 5,000 members, 50 members


def probe(pace: Pace, lag: float, samples: int = 1, now: float = 0.0) -> float:
    """Feed probes each ``lag`` late until ``samples`` more samples are complete; the
    clock after."""
    done = pace.samples + samples
    while pace.samples < done:
        now += LAG_PROBE_S
        pace.lagged(now, lag)
    return now


def test_a_room_of_any_size_keeps_the_base_window_while_the_loop_keeps_up() -> None:
    """Issue 10: a 5,000-member room took ~50 ms to write and so waited 100 ms per batch
    (twice its write time) even with the server mostly idle."""
    pace = Pace(BASE, MAX)
    probe(pace, LOOP_LAG_LIMIT_S / 3, samples=8)
    assert pace.stretch == 0
    assert pace.window(BIG) == pace.window(SMALL) == BASE
    # Lagging more than half the limit, but not more than the limit, widens nothing.
    probe(pace, LOOP_LAG_LIMIT_S * 0.9, samples=8)
    assert pace.window(BIG) == BASE


def test_a_loop_behind_widens_the_rooms_whose_writes_cost_most() -> None:
    pace = Pace(BASE, MAX)
    now = probe(pace, 2 * LOOP_LAG_LIMIT_S)
    assert pace.lag == pytest.approx(2 * LOOP_LAG_LIMIT_S)
    assert pace.stretch == STRETCH_MIN
    stretches, big, small = [], [], []
    for _ in range(12):
        now = probe(pace, 2 * LOOP_LAG_LIMIT_S, now=now)
        stretches.append(pace.stretch)
        big.append(pace.window(BIG))
        small.append(pace.window(SMALL))
    assert stretches[:3] == [2 * STRETCH_MIN, 4 * STRETCH_MIN, 8 * STRETCH_MIN]
    assert stretches[-1] == STRETCH_MAX  # bounded
    assert big == sorted(big) and big[-1] == MAX  # a really overloaded room: the widest
    assert small == sorted(small) and small[-1] == STRETCH_MAX * SMALL < MAX
    assert all(s <= b for s, b in zip(small, big, strict=True))
    # Before the stretch reaches it, a cheap room stays at the base window.
    assert small[2] == BASE < big[2]


def test_the_window_holds_near_the_limit_and_narrows_back_with_slack() -> None:
    pace = Pace(BASE, MAX)
    now = probe(pace, 2 * LOOP_LAG_LIMIT_S, samples=4)
    assert pace.stretch == 8 * STRETCH_MIN
    # Between half the limit and the limit: hold (a loop at its limit does not flap).
    now = probe(pace, 0.75 * LOOP_LAG_LIMIT_S, samples=5, now=now)
    assert pace.stretch == 8 * STRETCH_MIN
    # Slack: halve each sample, then 0 below the first step.
    seen = []
    for _ in range(5):
        now = probe(pace, 0.1 * LOOP_LAG_LIMIT_S, now=now)
        seen.append(pace.stretch)
    assert seen == [4 * STRETCH_MIN, 2 * STRETCH_MIN, STRETCH_MIN, 0, 0]
    assert pace.window(BIG) == BASE


def test_a_zero_base_window_stays_zero_until_the_loop_is_behind() -> None:
    pace = Pace(0.0, MAX)
    probe(pace, 0.0, samples=3)
    assert pace.window(BIG) == 0.0
    probe(pace, 2 * LOOP_LAG_LIMIT_S, samples=2)
    assert pace.window(BIG) == 2 * STRETCH_MIN * BIG


async def test_the_hub_waits_the_window_pace_gives_each_room(hub: Hub, room: str) -> None:
    sink = await join(hub, room)
    loop = asyncio.get_running_loop()
    seen = 1

    async def push() -> None:
        nonlocal seen
        assert hub.push(room, b'{"type":"like","user":"x"}')
        seen += 1
        await until(lambda: len(sink.got) == seen, "the pushed event")

    await push()  # a base window of 0: written on the next tick
    # The loop far behind: the next window of this room is the widest.
    hub.pace.stretch = 1e9
    await push()
    assert hub.rooms[room].window == hub.pace.max_s
    before = loop.time()
    assert hub.push(room, b'{"type":"like","user":"y"}')
    handle = hub.rooms[room].handle
    assert isinstance(handle, asyncio.TimerHandle)
    assert handle.when() >= before + hub.pace.max_s
    seen += 1
    await until(lambda: len(sink.got) == seen, "the event after the wide window")
    # Back to a loop that keeps up: the next batch goes on the next tick again.
    hub.pace.stretch = 0.0
    await push()
    assert hub.rooms[room].window == 0.0
    assert hub.push(room, b'{"type":"like","user":"z"}')
    assert not isinstance(hub.rooms[room].handle, asyncio.TimerHandle)
    seen += 1
    await until(lambda: len(sink.got) == seen, "the last event")


async def test_a_blocked_loop_is_measured_as_behind(hub: Hub, room: str) -> None:
    """The hub's lag probe runs while it has rooms; blocking the loop longer than the
    limit, again and again, for more than a sample makes Pace widen (a slower machine
    only makes the lag larger)."""
    await join(hub, room)
    assert hub.pace.stretch == 0
    block = LAG_PROBE_S + 3 * LOOP_LAG_LIMIT_S
    for _ in range(int(2 * hub.pace.sample_s / block) + 2):
        time.sleep(block)  # what a write loop to a huge room does to everything else
        await asyncio.sleep(0)
    assert hub.pace.lag > LOOP_LAG_LIMIT_S
    assert hub.pace.stretch >= STRETCH_MIN
