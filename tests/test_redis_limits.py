"""Redis does not grow without bound (issue 9): one live stream per creator, ended rooms
expire, and at ``maxmemory`` (noeviction) writes are refused as ``unavailable`` while
reads keep working. Real servers and real Redis processes, no mocks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from livegift import auth, keys
from livegift.auth import User
from livegift.catalog import default_catalog
from livegift.config import Settings
from livegift.embedded import EmbeddedRedis
from livegift.errors import NotFound
from livegift.ledger import Ledger
from livegift.reconcile import reconcile
from livegift.streams import Streams
from tests.conftest import PAYMENT_SECRET, SECRET, LiveServer, uid, unit
from tests.wsclient import Client

DB = 13
SETTINGS = Settings(secret=SECRET, payment_secret=PAYMENT_SECRET, gift_rate=1000, gift_burst=1000)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{DB}")
    await client.flushdb()
    yield client
    await client.aclose()


async def buy(ledger: Ledger, user: User) -> None:
    receipt = auth.mint_receipt(PAYMENT_SECRET, ledger.catalog, user.id, "p6607", sandbox=False)
    await ledger.recharge(auth.verify_receipt(PAYMENT_SECRET, ledger.catalog, receipt, user))


# -- one live stream per creator -------------------------------------------------------


async def test_going_live_again_ends_the_other_stream(live_server: LiveServer) -> None:
    creator = uid("c")
    ctoken = live_server.token(creator)
    first = live_server.create_stream(ctoken)
    viewer = await Client.open(live_server.ws(first, live_server.token(uid())))
    assert (await viewer.next())["type"] == "welcome"
    r = live_server.post("/api/streams", {"title": "second"}, token=ctoken)
    assert r.status_code == 201, r.text
    second = r.json()["room"]
    ended = await viewer.until(lambda e: e["type"] == "stream_ended")
    assert ended["room"] == first
    with pytest.raises(ConnectionClosed) as closed:
        await viewer.next()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    assert live_server.get(f"/api/streams/{first}").json()["live"] is False
    assert live_server.get(f"/api/streams/{second}").json()["live"] is True


async def test_concurrent_go_lives_leave_one_stream_live(live_server: LiveServer) -> None:
    ctoken = live_server.token(uid("c"))
    headers = {"authorization": f"Bearer {ctoken}"}
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=unit(10)) as http:
        answers = await asyncio.gather(
            *(http.post("/api/streams", json={"title": f"t{i}"}, headers=headers) for i in range(8))
        )
        assert all(a.status_code == 201 for a in answers), [
            (a.status_code, a.text) for a in answers
        ]
        rooms = [a.json()["room"] for a in answers]
        states = [(await http.get(f"/api/streams/{room}")).json()["live"] for room in rooms]
    assert sorted(states) == [False] * 7 + [True]


# -- ended rooms expire ----------------------------------------------------------------


async def test_an_ended_room_expires_and_a_reopened_one_does_not(client: Redis) -> None:
    settings = SETTINGS.with_(history_seconds=120, ended_room_ttl=3600)
    streams = Streams(client, settings)
    ledger = Ledger(client, settings, default_catalog(), streams.scripts)
    creator, fan = User(uid("c"), "C"), User(uid("f"), "F")
    room, _ = await streams.start_stream_as(creator, "t", keys.new_room_id(creator.id, uid("room")))
    await buy(ledger, fan)
    await ledger.gift(fan, room, "r1", ledger.catalog.gift("rose"), 2, adult=True)
    kept = [keys.room(room), keys.history(room), keys.top(room)]
    assert [await client.ttl(k) for k in kept] == [-1, -1, -1]
    assert 0 < await client.pttl(keys.combo(room, fan.id)) <= settings.combo_window_ms + 1000

    await streams.end_stream(creator, room)
    room_ttl, hist_ttl, top_ttl = [await client.pttl(k) for k in kept]
    assert 3590_000 < room_ttl <= 3600_000 and 3590_000 < top_ttl <= 3600_000
    assert 110_000 < hist_ttl <= 120_000
    assert (await streams.room(room))["live"] == "0"  # stats stay readable meanwhile

    await streams.start_stream_as(creator, "again", room)  # the demo re-opens its room
    assert [await client.ttl(k) for k in kept] == [-1, -1, -1]
    assert (await streams.room(room))["live"] == "1"


async def test_an_ended_room_is_gone_after_its_ttl(client: Redis) -> None:
    streams = Streams(client, SETTINGS.with_(history_seconds=1, ended_room_ttl=1))
    creator = User(uid("c"), "C")
    room, _ = await streams.start_stream(creator, "t")
    await streams.end_stream(creator, room)
    deadline = time.monotonic() + unit(5)
    while await client.exists(keys.room(room), keys.history(room)):
        assert time.monotonic() < deadline, "the ended room did not expire"
        await asyncio.sleep(0.1)
    with pytest.raises(NotFound):
        await streams.room(room)


async def test_the_server_expires_ended_rooms_and_presence(
    live_server: LiveServer, redis_url: str
) -> None:
    store = Redis.from_url(redis_url)
    try:
        creator = uid("c")
        ctoken = live_server.token(creator)
        room = live_server.create_stream(ctoken)
        viewer = await Client.open(live_server.ws(room, live_server.token(uid())))
        await viewer.next()
        deadline = time.monotonic() + unit(6)
        while not await store.exists(keys.presence(room)):  # written every 2 s
            assert time.monotonic() < deadline, "no presence written"
            await asyncio.sleep(0.2)
        assert 0 < await store.pttl(keys.presence(room)) <= 12_000
        assert live_server.delete(f"/api/streams/{room}", ctoken).status_code == 200
        assert 86_000 < await store.ttl(keys.room(room)) <= 86_400  # the defaults
        assert 0 < await store.ttl(keys.history(room)) <= 600
        await viewer.close()
    finally:
        await store.aclose()


# -- at the memory limit -----------------------------------------------------------------


def ledger_size(client: Any) -> int:
    """Ledger entries in every partition."""
    return sum(int(client.xlen(keys.ledger(p))) for p in range(keys.PARTITIONS))


def fill(store: sync_redis.Redis) -> None:
    """Fill the store up to a limit just above what it holds, then put the limit below
    what it holds (a write that fails frees its own buffer, so a store filled to the brim
    may take the next small write): from then on every write is refused."""
    info: Any = store.info("memory")
    store.config_set("maxmemory", int(info["used_memory"]) + 2_000_000)
    with pytest.raises(sync_redis.exceptions.OutOfMemoryError):
        for i in range(100_000):
            store.set(f"filler:{i}", "x" * 1000)
    info = store.info("memory")
    store.config_set("maxmemory", int(info["used_memory"]) - 500_000)


async def test_a_full_store_answers_unavailable_and_changes_nothing(
    tmp_path: Path, server_factory: Any
) -> None:
    embedded = EmbeddedRedis(tmp_path / "data")
    url = embedded.start()
    store = sync_redis.Redis.from_url(url)
    try:
        limits = store.config_get("maxmemory*")
        assert limits["maxmemory"] == str(1 << 30)  # redis.conf: 1gb
        assert limits["maxmemory-policy"] == "noeviction"
        server: LiveServer = server_factory(url=url)
        creator, user = uid("c"), uid()
        ctoken, token = server.token(creator), server.token(user)
        room = server.create_stream(ctoken)
        server.recharge(token, user, "p330")
        sender = await Client.open(server.ws(room, token))
        await sender.next()
        entries = ledger_size(store)

        fill(store)
        ack = await sender.gift("when-full", "rose", 5)
        assert ack["ok"] is False and ack["error"]["code"] == "unavailable", ack
        bought = server.post("/api/wallet/recharge", {"receipt": server.receipt(user)}, token=token)
        assert bought.status_code == 503 and bought.json()["error"]["code"] == "unavailable"
        assert server.post("/api/streams", {}, token=server.token(uid("c2"))).status_code == 503
        # Nothing changed, and reads work: wallets, rooms, joining a room to watch.
        assert ledger_size(store) == entries
        assert server.get("/api/wallet", token).json()["coins"] == 330
        assert server.get("/api/wallet", ctoken).json()["diamonds"] == 0
        assert server.get(f"/api/streams/{room}").json()["live"] is True
        watcher = await Client.open(server.ws(room, server.token(uid())))
        assert (await watcher.next())["type"] == "welcome"

        store.config_set("maxmemory", "1gb")  # room again: the same gift goes through
        ack = await sender.gift("when-full", "rose", 5)
        assert ack["ok"] is True and ack["balance"] == 325
        assert (await watcher.until(lambda e: e["type"] == "gift"))["coins"] == 5
        assert reconcile(store, progress=None).ok
        await watcher.close()
        await sender.close()
    finally:
        store.close()
        embedded.stop()
