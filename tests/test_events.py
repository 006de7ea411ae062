"""One event shape for Lua and Python: what the scripts publish is what ``events.head`` reads.

The scripts that emit room events run against the real Redis; every event they keep in
the room's history and publish must start with ``{"type":"<t>","seq":<n>,"ts":`` (the
prefix :func:`livegift.events.head` reads without parsing), parse to the same answer,
and match what :func:`livegift.events.event` builds from the same fields.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from importlib import resources

import orjson
import pytest
from redis.asyncio import Redis

from livegift import auth, events, keys
from livegift.auth import User
from livegift.catalog import default_catalog
from livegift.config import Settings
from livegift.ledger import Ledger
from livegift.scripts import Scripts, script_names
from livegift.streams import Streams
from tests.conftest import PAYMENT_SECRET, SECRET, uid, unit

# history_len 1: every event below is recent, so the history keeps them all only if the
# scripts' emit() reads each event's "ts" (a ts it cannot read counts as ancient).
SETTINGS = Settings(
    secret=SECRET,
    payment_secret=PAYMENT_SECRET,
    gift_rate=1000,
    gift_burst=1000,
    history_len=1,
    auto_shoutout_template='Thanks "{name}" </3> for {gift} \\ ü 😀',
)
EXERCISED = {"gift_land", "shoutout", "stream_end", "stream_start"}
# The prelude's functions that emit room events.
EMITTING = ("emit(", "end_stream(")


def emitters() -> set[str]:
    """The scripts whose own source emits room events."""
    lua = resources.files("livegift").joinpath("lua")
    return {
        n
        for n in script_names()
        if any(call in lua.joinpath(f"{n}.lua").read_text("utf-8") for call in EMITTING)
    }


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url.rsplit("/", 1)[0] + "/6")
    await client.flushdb()
    yield client
    await client.aclose()


async def room_events(
    client: Redis, ender: str = "stream_end"
) -> tuple[list[tuple[bytes, float]], list[bytes], str]:
    """Run every emitting script once or more in one room: (history, published, room).
    The stream ends by ``ender``: stream_end, or stream_start (the creator goes live
    elsewhere)."""
    scripts = Scripts(client)
    ledger = Ledger(client, SETTINGS, default_catalog(), scripts)
    streams = Streams(client, SETTINGS, scripts)
    creator, fan = User(uid("c"), 'Cré"ator'), User(uid("f"), 'F "a\\n" </b> ü 😀')
    room, _ = await streams.start_stream(creator, "t/itle")
    # An ancient event: emit() trims it by its "ts" as soon as the first event lands.
    await client.zadd(keys.history(room), {b'{"type":"gift","seq":0,"ts":1,"room":"x"}': 0})
    pubsub = client.pubsub()
    await pubsub.ssubscribe(keys.channel(room))
    token = auth.mint_receipt(PAYMENT_SECRET, ledger.catalog, fan.id, "p6607", sandbox=False)
    await ledger.recharge(auth.verify_receipt(PAYMENT_SECRET, ledger.catalog, token, fan))
    await streams.remember_name(fan)
    for req, gift, count in (("r1", "rose", 1), ("r2", "rose", 2), ("r3", "galaxy", 1)):
        await ledger.gift(fan, room, req, ledger.catalog.gift(gift), count, adult=True)
    await streams.shoutout(creator, room, fan.id, 'hi "there" </x> ü/😀')
    await streams.shoutout(creator, room, uid("nobody"), "")
    if ender == "stream_end":
        await streams.end_stream(creator, room)
    else:
        await streams.start_stream(creator, "the next stream")
    history = await client.zrange(keys.history(room), 0, -1, withscores=True)
    published: list[bytes] = []
    deadline = time.monotonic() + unit(5)
    while len(published) < len(history) and time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=unit(1))
        if message is not None:
            published.append(message["data"])
    await pubsub.aclose()
    return history, published, room


@pytest.mark.parametrize("ender", ["stream_end", "stream_start"])
async def test_every_script_event_has_the_shape_head_reads(client: Redis, ender: str) -> None:
    assert emitters() == EXERCISED, "a script emits events: exercise it in room_events()"
    history, published, room = await room_events(client, ender)
    # All kept (history_len is 1): emit() read every event's ts and found it recent.
    assert [data for data, _ in history] == published
    now = int(time.time() * 1000)
    seen: list[str] = []
    for data, score in history:
        value = orjson.loads(data)
        type_, seq = value["type"], value["seq"]
        assert data.startswith(b'{"type":"%s","seq":%d,"ts":' % (type_.encode(), seq)), data
        assert list(value)[:3] == ["type", "seq", "ts"]
        assert events.head(data) == (type_, seq)
        assert seq == int(score)
        assert abs(value["ts"] - now) < unit(60) * 1000
        # emit() trims the history by the first "ts" it finds: the event's own.
        ts = re.search(rb'"ts":(\d+)', data)
        assert ts is not None and int(ts[1]) == value["ts"]
        assert value["room"] == room
        seen.append(type_)
    assert [seq for _, seq in history] == list(range(1, len(history) + 1))
    assert seen == ["gift", "gift", "gift", "shoutout", "shoutout", "shoutout", "stream_ended"]
    assert set(seen) == events.DURABLE


async def test_lua_and_python_build_the_same_event(client: Redis) -> None:
    history, _, _ = await room_events(client)
    for data, _ in history:
        value = orjson.loads(data)
        fields = {k: v for k, v in value.items() if k not in ("type", "seq", "ts")}
        built = events.event(value["type"], value["seq"], value["ts"], **fields)
        assert orjson.loads(built) == value
        assert list(orjson.loads(built)) == list(value)  # same members, same order
        assert events.head(built) == events.head(data)


def test_python_events_have_the_same_head() -> None:
    gift = events.event(events.GIFT, 7, 1700000000000, room="r", count=2)
    assert gift == b'{"type":"gift","seq":7,"ts":1700000000000,"room":"r","count":2}'
    assert events.head(gift) == ("gift", 7)
    welcome = events.event(events.WELCOME, room="r", seq_hint=3)
    assert welcome.startswith(b'{"type":"welcome",') and b'"ts"' not in welcome
    assert events.head(welcome) == ("welcome", 0)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"type":"viewers","count":3}', ("viewers", 0)),
        (b'{"type":"ack","req":"a","ok":true}', ("ack", 0)),
        (b'{"type":"leaderboard"}', ("leaderboard", 0)),
        (b'{"type":"gift","seq":9223372036854775807,"ts":1}', ("gift", 2**63 - 1)),
        (b'{"type":"gift","seq":9999999999999999999,"ts":1}', ("gift", 10**19 - 1)),
        # Not the builders' shape, but an event all the same: parsed in full.
        (b'{ "type": "gift", "seq": 4, "ts": 1 }', ("gift", 4)),
        (b'{"seq":5,"type":"shoutout","ts":1}', ("shoutout", 5)),
        (b'{"type":"gift","ts":1,"seq":6}', ("gift", 6)),
    ],
)
def test_head_reads_odd_events(data: bytes, expected: tuple[str, int]) -> None:
    assert events.head(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"[1,2]",
        b'"gift"',
        b'{"type":"gift"',
        b'{"type":7,"seq":1}',
        b'{"no_type":true}',
        b'{"type":"gift","ts":1}',  # a durable event without its seq
        b'{"type":"stream_ended","seq":-1,"ts":1}',
        b'{"type":"gift","seq":"7","ts":1}',
        b'{"type":"gift","seq":99999999999999999999999,"ts":1}',  # beyond any seq
    ],
)
def test_head_refuses_what_is_not_an_event(data: bytes) -> None:
    with pytest.raises(events.BadEvent):
        events.head(data)


def test_durable_and_live_types_are_apart() -> None:
    assert events.DURABLE.isdisjoint(events.LIVE)
    assert {events.GIFT, events.SHOUTOUT, events.STREAM_ENDED} == events.DURABLE
