"""The hub with an in-memory broker and in-test sinks: no Redis, no sockets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgpack
import orjson
import pytest
from prometheus_client import REGISTRY

from livegift import disconnect, events
from livegift.disconnect import Close
from livegift.hub import Hub, Member
from livegift.protocol import JSON_FRAMES, JSON_TEXT, MSGPACK_BYTES, MSGPACK_FRAMES, Wire

ROOM = "r1"


class FakeBroker:
    """A room's seq, history and pub/sub, in memory."""

    def __init__(self, on_message: Callable[[str, bytes], None], on_reconnect: Any) -> None:
        self.on_message = on_message
        self.on_reconnect = on_reconnect
        self.head = 0
        self.kept: dict[int, bytes] = {}

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def subscribe(self, room: str) -> None: ...

    async def unsubscribe(self, room: str) -> None: ...

    async def latest_seq(self, room: str) -> int:
        return self.head

    async def history(self, room: str, after: int, upto: int | None = None) -> list[bytes]:
        top = self.head if upto is None else upto
        return [self.kept[n] for n in sorted(self.kept) if after < n <= top]

    def publish(self, type_: str = events.GIFT, deliver: bool = True, **fields: Any) -> bytes:
        self.head += 1
        data = events.event(type_, self.head, 1000 + self.head, **fields)
        self.kept[self.head] = data
        if deliver:
            self.on_message(ROOM, data)
        return data


class FakeSink:
    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.closed = False
        self.on_close: Callable[[], None] | None = None
        self.got: list[Any] = []
        self.closes: list[tuple[int, str]] = []

    @property
    def writer(self) -> Callable[[Any], None]:
        return self.got.append

    def write(self, data: bytes | str) -> None:
        if not self.closed:
            self.got.append(data)

    def close(self, close: Close, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            if self.on_close is not None:
                self.on_close()
            self.closes.append((close.code, reason or close.reason))

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


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
async def hub() -> Any:
    hub = Hub(FakeBroker, batch_ms=0, linger_s=0.01)
    await hub.start()
    yield hub
    await hub.close()


def welcome(seq: int, viewers: int) -> dict[str, Any]:
    return {"type": "welcome", "seq": seq, "viewers": viewers}


async def join(hub: Hub, wire: Wire = JSON_FRAMES, since: int | None = None) -> FakeSink:
    sink = FakeSink(wire)
    await hub.join(ROOM, Member("u", sink), welcome, since)
    return sink


async def test_one_payload_per_codec_one_packed_object_per_wire(hub: Hub) -> None:
    broker: FakeBroker = hub.broker  # type: ignore[assignment]
    sinks = [await join(hub, wire) for wire in (JSON_FRAMES, JSON_FRAMES, JSON_TEXT)]
    sinks += [await join(hub, MSGPACK_FRAMES), await join(hub, MSGPACK_BYTES)]
    assert [s.events()[0] for s in sinks] == [welcome(0, n) for n in range(1, 6)]
    for _ in range(3):
        broker.publish(events.GIFT, gift="rose")
    await settle()
    for sink in sinks:
        assert len(sink.got) == 2 and sink.seqs() == [1, 2, 3]
    assert sinks[0].got[1] is sinks[1].got[1]
    assert isinstance(sinks[2].got[1], str) and isinstance(sinks[4].got[1], bytes)
    assert unframe(sinks[3].got[1]) == sinks[4].got[1]


async def test_a_gap_is_filled_from_history_before_later_events(hub: Hub) -> None:
    broker: FakeBroker = hub.broker  # type: ignore[assignment]
    sink = await join(hub)
    broker.publish()
    broker.publish(deliver=False)  # pub/sub lost it
    broker.publish()
    broker.publish()
    await settle()
    assert sink.seqs() == [1, 2, 3, 4]
    broker.on_message(ROOM, broker.kept[3])  # a late duplicate
    broker.publish()
    await settle()
    assert sink.seqs() == [1, 2, 3, 4, 5]


async def test_after_a_reconnect_what_pub_sub_missed_comes_from_history(hub: Hub) -> None:
    broker: FakeBroker = hub.broker  # type: ignore[assignment]
    sink = await join(hub)
    broker.publish()
    broker.publish(deliver=False)
    broker.publish(deliver=False)
    hub.on_reconnect()
    await settle()
    assert sink.seqs() == [1, 2, 3]


async def test_an_unreadable_event_is_logged_and_counted(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    broker: FakeBroker = hub.broker  # type: ignore[assignment]
    sink = await join(hub)
    before = REGISTRY.get_sample_value("livegift_bad_events_total") or 0
    with caplog.at_level(logging.WARNING, logger="livegift.hub"):
        hub.on_message(ROOM, b"not json")
        hub.on_message(ROOM, b'{"type":"viewers","count":3}')  # no seq: cannot be ordered
    assert REGISTRY.get_sample_value("livegift_bad_events_total") == before + 2
    assert "cannot read" in caplog.text
    broker.publish()
    await settle()
    assert sink.seqs() == [1]


async def test_stream_ended_closes_members_and_turns_joiners_away(hub: Hub) -> None:
    broker: FakeBroker = hub.broker  # type: ignore[assignment]
    sink = await join(hub)
    broker.publish(events.STREAM_ENDED)
    await settle()
    assert sink.events()[-1]["type"] == "stream_ended"
    assert sink.closes == [(1000, "stream ended")]
    late = await join(hub)
    assert late.events() == [welcome(1, 1)]
    assert late.closes == [(4404, "unknown or ended room")]


async def test_resume_replays_history_then_goes_live(hub: Hub) -> None:
    broker: FakeBroker = hub.broker  # type: ignore[assignment]
    first = await join(hub)
    for _ in range(5):
        broker.publish()
    await settle()
    sink = await join(hub, since=2)
    got = sink.events()
    assert got[0] == welcome(5, 2)
    assert [e.get("seq") for e in got[1:4]] == [3, 4, 5]
    assert got[4] == {"type": "resumed", "from": 3, "to": 5, "complete": True}
    broker.publish()
    await settle()
    assert sink.seqs() == [3, 4, 5, 6] and first.seqs() == [1, 2, 3, 4, 5, 6]


async def test_push_counts_and_drain(hub: Hub) -> None:
    assert not hub.push(ROOM, b'{"type":"viewers","count":1}')  # no such room here
    a, b = await join(hub), await join(hub, MSGPACK_FRAMES)
    assert hub.counts() == {ROOM: 2}
    assert hub.push(ROOM, b'{"type":"viewers","count":7}')
    await settle()
    assert a.events()[-1] == b.events()[-1] == {"type": "viewers", "count": 7}
    hub.drain()
    assert a.closes == b.closes == [(1013, "server shutting down")]
    assert disconnect.TRY_AGAIN_LATER.code == 1013
