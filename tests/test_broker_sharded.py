"""The broker's sharded pub/sub on real servers: one Valkey, and a 3+3 Valkey Cluster.

On one server: SSUBSCRIBE confirmed before subscribe() returns, SPUBLISH from a client
and from a Lua script reaches it, one subscription per channel however many want it.
On the cluster: one pub/sub connection per master in use, and the broker finding each
channel again after its master is killed (replica promoted), hung (SIGSTOP), or its slot
moved, telling the hub which rooms to refill. Channels are the broker's own room
channels (``keys.channel``), placed on the masters wanted by trying room ids.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from livegift import keys, store
from livegift.broker import Broker
from livegift.errors import Unavailable
from tests.cluster import (  # noqa: F401 (fixture)
    ClusterNode,
    ValkeyCluster,
    healed_cluster_fixture,
)
from tests.conftest import uid, unit

LUA_SPUBLISH = "return redis.call('SPUBLISH', ARGV[1], ARGV[2])"


class Recorder:
    """The hub's end of a broker: what arrived per room, which rooms came back."""

    def __init__(self) -> None:
        self.got: dict[str, list[bytes]] = defaultdict(list)
        self.back: list[str] = []
        self.feed: list[bytes] = []
        self.feed_back = 0

    def message(self, room: str, data: bytes) -> None:
        self.got[room].append(data)

    def reconnected(self, room: str) -> None:
        self.back.append(room)

    def on_feed(self, data: bytes) -> None:
        self.feed.append(data)

    def on_feed_back(self) -> None:
        self.feed_back += 1


async def until(check: Callable[[], bool], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + unit(timeout)
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def slot_mate(channel: str) -> str:
    """A key in the channel's slot (same hash tag), for a script's KEYS."""
    tag = channel[channel.index("{") : channel.index("}") + 1]
    return f"lgtest:{tag}:mate"


BrokerFactory = Callable[..., Awaitable[tuple[Broker, Recorder]]]


@pytest.fixture
async def make_broker() -> AsyncIterator[BrokerFactory]:
    made: list[Broker] = []

    async def make(client: Any, **settings: float) -> tuple[Broker, Recorder]:
        recorder = Recorder()
        broker = Broker(client, recorder.message, recorder.reconnected)
        for name, value in settings.items():
            setattr(broker, name, value)
        await broker.start()
        made.append(broker)
        return broker, recorder

    yield make
    for broker in made:
        await broker.close()


# -- one server ---------------------------------------------------------------------------


@pytest.fixture
async def named(redis_url: str) -> AsyncIterator[Redis]:
    """A store client whose connections (the broker's pub/sub one too) carry a name."""
    client = Redis.from_url(redis_url, client_name=uid("brokertest"))
    yield client
    await client.aclose()


async def pubsub_connections(client: Redis, name: str) -> int:
    listed = await client.client_list(_type="pubsub")
    return sum(1 for c in listed if c["name"] == name)


async def subscribers(client: Redis, channel: str) -> int:
    reply = await client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1])


async def test_spublish_from_a_client_and_from_lua_arrives(
    named: Redis, make_broker: BrokerFactory
) -> None:
    broker, rec = await make_broker(named)
    room = uid("room")
    await broker.subscribe(room)  # confirmed: nothing published from here on is missed
    channel = keys.channel(room)
    assert await named.spublish(channel, b"one") == 1
    await named.eval(LUA_SPUBLISH, 1, slot_mate(channel), channel, b"two")
    await broker.publish(room, b"three")  # a live event, as hub.publish sends it
    await until(lambda: len(rec.got[room]) == 3, "three messages")
    assert rec.got[room] == [b"one", b"two", b"three"]
    # Classic PUBLISH is another namespace: it reaches no shard subscriber.
    assert await named.publish(channel, b"nobody") == 0


async def test_one_ssubscribe_per_channel_counted_unsubscribe_stops_delivery(
    named: Redis, make_broker: BrokerFactory
) -> None:
    broker, rec = await make_broker(named)
    name = named.connection_pool.connection_kwargs["client_name"]
    room, other = uid("room"), uid("room")
    await broker.subscribe(room)
    await broker.subscribe(room)  # a second member's join: no second SSUBSCRIBE
    await broker.subscribe(other)
    feed = keys.creator_channel(uid("c"))
    await broker.listen(feed, rec.on_feed, rec.on_feed_back)
    assert await subscribers(named, keys.channel(room)) == 1
    assert await pubsub_connections(named, name) == 1  # every channel on one connection

    await broker.unsubscribe(room)  # one of two: still subscribed
    await named.spublish(keys.channel(room), b"a")
    await named.spublish(feed, b"f")
    await until(lambda: rec.got[room] == [b"a"] and rec.feed == [b"f"], "a and f")

    await broker.unsubscribe(room)  # the last
    await broker.unlisten(feed)
    deadline = time.monotonic() + unit(5)  # the server reads the SUNSUBSCRIBE soon after
    while await subscribers(named, keys.channel(room)) or await subscribers(named, feed):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert await named.spublish(keys.channel(room), b"b") == 0
    assert await named.spublish(feed, b"g") == 0
    await named.spublish(keys.channel(other), b"c")
    await until(lambda: rec.got[other] == [b"c"], "the other room's message")
    assert rec.got[room] == [b"a"] and rec.feed == [b"f"]

    # Subscribed again after the last unsubscribe: a fresh SSUBSCRIBE, confirmed.
    await broker.subscribe(room)
    assert await subscribers(named, keys.channel(room)) == 1
    await named.spublish(keys.channel(room), b"d")
    await until(lambda: rec.got[room] == [b"a", b"d"], "d")


async def test_a_lost_connection_resubscribes_and_names_each_room(
    named: Redis, make_broker: BrokerFactory
) -> None:
    broker, rec = await make_broker(named)
    name = named.connection_pool.connection_kwargs["client_name"]
    rooms = [uid("room") for _ in range(3)]
    for room in rooms:
        await broker.subscribe(room)
    feed = keys.creator_channel(uid("c"))
    await broker.listen(feed, rec.on_feed, rec.on_feed_back)
    ids = [c["id"] for c in await named.client_list(_type="pubsub") if c["name"] == name]
    assert len(ids) == 1
    assert await named.client_kill_filter(_id=ids[0]) == 1
    await until(lambda: sorted(rec.back) == sorted(rooms) and rec.feed_back == 1, "every room")
    assert await pubsub_connections(named, name) == 1
    for room in rooms:
        await named.spublish(keys.channel(room), room.encode())
    await until(lambda: all(rec.got[r] == [r.encode()] for r in rooms), "each room's message")


# -- a cluster ------------------------------------------------------------------------------


@pytest.fixture
async def cluster_client(cluster: ValkeyCluster) -> AsyncIterator[Any]:
    """The server's kind of store client, its connections named (CLIENT LIST finds the
    broker's)."""
    cluster.heal()
    client = await store.connect(f"{cluster.url}?client_name={uid('brokertest')}", 8)
    yield client
    await client.aclose()


def rooms_on(masters: list[ClusterNode], per_master: int = 1) -> list[list[str]]:
    """Room ids whose channels live on each master, in the order of ``masters``."""
    found: list[list[str]] = [[] for _ in masters]
    while any(len(rooms) < per_master for rooms in found):
        room = keys.new_room_id(uid("c"), "room")  # of a random creator's partition
        slot = ValkeyCluster.slot(keys.channel(room))
        index = next(i for i, m in enumerate(masters) if m.owns(slot))
        if len(found[index]) < per_master:
            found[index].append(room)
    return found


def spublish(cluster: ValkeyCluster, room: str, data: bytes) -> int:
    """SPUBLISH on the master that serves the room's channel now; how many got it."""
    channel = keys.channel(room)
    node = cluster.node_client(cluster.master_for_key(channel))
    try:
        return int(node.spublish(channel, data))
    finally:
        node.close()


def connections_per_master(cluster: ValkeyCluster, name: str) -> dict[str, int]:
    """The broker's pub/sub connections on each master, by node id."""
    counts = {}
    for master in cluster.masters():
        node = cluster.node_client(master, decode_responses=True)
        try:
            listed = node.client_list(_type="pubsub")
            counts[master.id] = sum(1 for c in listed if c["name"] == name)
        finally:
            node.close()
    return counts


def client_name(client: Any) -> str:
    return str(client.get_default_node().connection_kwargs["client_name"])


async def test_cluster_one_connection_per_master_and_delivery(
    cluster: ValkeyCluster, cluster_client: Any, make_broker: BrokerFactory
) -> None:
    broker, rec = await make_broker(cluster_client)
    placed = rooms_on(cluster.masters(), per_master=3)
    rooms = [room for group in placed for room in group]
    await asyncio.gather(*(broker.subscribe(room) for room in rooms))
    feed = keys.creator_channel(uid("c"))
    await broker.listen(feed, rec.on_feed, rec.on_feed_back)
    counts = connections_per_master(cluster, client_name(cluster_client))
    assert list(counts.values()) == [1, 1, 1]

    for room in rooms:
        assert spublish(cluster, room, b"client") == 1
    first = placed[1][0]
    channel = keys.channel(first)
    mate = cluster.node_client(cluster.master_for_key(channel))
    try:
        mate.eval(LUA_SPUBLISH, 1, slot_mate(channel), channel, b"lua")
    finally:
        mate.close()
    await broker.publish(placed[2][0], b"live")  # SPUBLISH through the cluster client
    await cluster_client.spublish(feed, b"feed")
    await until(lambda: all(rec.got[r][:1] == [b"client"] for r in rooms), "every room")
    await until(lambda: b"lua" in rec.got[first] and b"live" in rec.got[placed[2][0]], "lua")
    await until(lambda: rec.feed == [b"feed"], "the feed")
    assert rec.back == [] and rec.feed_back == 0


async def test_cluster_master_killed_replica_promoted(
    cluster: ValkeyCluster, cluster_client: Any, make_broker: BrokerFactory
) -> None:
    broker, rec = await make_broker(cluster_client)
    masters = cluster.masters()
    placed = rooms_on(masters)
    rooms = [group[0] for group in placed]
    for room in rooms:
        await broker.subscribe(room)
    victim_room = rooms[0]
    try:
        victim = cluster.kill_master(masters[0])
        seconds = await asyncio.to_thread(cluster.wait_failover, victim)
        await until(lambda: victim_room in rec.back, "the room on the dead master", 20)
        # Only the room whose master went away is refilled.
        assert rec.back == [victim_room], (rec.back, seconds)
        for room in rooms:
            assert spublish(cluster, room, b"after") == 1, room
        await until(lambda: all(rec.got[r] == [b"after"] for r in rooms), "every room")
        counts = connections_per_master(cluster, client_name(cluster_client))
        assert list(counts.values()) == [1, 1, 1]  # the promoted replica's among them
    finally:
        cluster.heal()


async def test_cluster_slot_moved(
    cluster: ValkeyCluster, cluster_client: Any, make_broker: BrokerFactory
) -> None:
    broker, rec = await make_broker(cluster_client)
    masters = cluster.masters()
    placed = rooms_on(masters)
    room, stays = placed[0][0], placed[1][0]
    await broker.subscribe(room)
    await broker.subscribe(stays)
    slot = cluster.slot(keys.channel(room))
    try:
        # The old master pushes sunsubscribe; the broker finds the slot's new master.
        await asyncio.to_thread(cluster.move_slot, slot, masters[1])
        await until(lambda: rec.back == [room], "the moved room back")
        assert cluster.master_for_key(keys.channel(room)).id == masters[1].id
        assert spublish(cluster, room, b"moved") == 1
        assert spublish(cluster, stays, b"stayed") == 1
        await until(lambda: rec.got[room] == [b"moved"], "a message on the new owner")
        await until(lambda: rec.got[stays] == [b"stayed"], "the other room")
        # Both rooms now on master 1's one connection; master 0 has none left.
        counts = connections_per_master(cluster, client_name(cluster_client))
        assert counts == {masters[0].id: 0, masters[1].id: 1, masters[2].id: 0}
    finally:
        await asyncio.to_thread(cluster.move_slot, slot, masters[0])


async def test_cluster_hung_master_subscribe_unavailable_then_failover(
    cluster: ValkeyCluster, cluster_client: Any, make_broker: BrokerFactory
) -> None:
    confirm = unit(1.0)
    broker, rec = await make_broker(
        cluster_client,
        confirm_timeout=confirm,
        ping_interval=unit(0.5),
        connect_timeout=unit(1.0),
    )
    masters = cluster.masters()
    placed = rooms_on(masters, per_master=2)
    alive, frozen = placed[2]
    await broker.subscribe(alive)  # confirmed while the master answers
    victim = cluster.freeze(masters[2])
    try:
        began = time.monotonic()
        with pytest.raises(Unavailable):
            await broker.subscribe(frozen)
        assert time.monotonic() - began < confirm + unit(1)
        await broker.unsubscribe(frozen)  # as the hub does after a failed join
        # Still hung: the heartbeat gives its connection up, and once a replica took
        # over, the room is subscribed through it.
        await asyncio.to_thread(cluster.wait_failover, victim)
        await until(lambda: rec.back == [alive], "the room on the hung master", 20)
        assert spublish(cluster, alive, b"after") == 1
        await until(lambda: rec.got[alive] == [b"after"], "a message on the new master")
    finally:
        cluster.thaw(victim)
        cluster.heal()
