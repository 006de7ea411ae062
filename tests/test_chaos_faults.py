"""The chaos run's cast and faults, on real processes: every fault injected once on a
small cast (one Valkey with AOF, two livegift servers, a room with a viewer on each
server), and the cluster's store_kill (a replica takes over, the killed master comes back
as a replica). Each test checks the recovery from outside: /healthz, the store's own
subscriber counts and roles, data written before a kill read after it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from livegift import keys
from loadtest.chaos.cast import Cast, CastConfig
from loadtest.chaos.faults import (
    CLEAN_EXITS,
    LEAD,
    PUBSUB_TARGET_S,
    RESTART_CLOSES,
    TAIL,
    FaultOptions,
    Schedule,
    inject,
    plan,
)
from loadtest.lgsetup import user_token
from tests.conftest import unit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cast]:
    config = CastConfig(run_dir=tmp_path_factory.mktemp("chaos"), store="single", servers=2)
    with Cast(config) as running:
        yield running


async def _viewer(ws_url: str, room: str, token: str) -> None:
    """A viewer that comes back whenever its socket closes (servers restart under it)."""
    while True:
        with contextlib.suppress(OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
            url = f"{ws_url}/ws/{room}?token={token}"
            async with connect(url, open_timeout=unit(5)) as ws:
                async for _ in ws:
                    pass
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def room(cast: Cast) -> AsyncIterator[str]:
    """A live room with one viewer socket on each server (so each server holds a shard
    subscription to its channel)."""
    creator = user_token(cast.secrets, f"cr_{secrets.token_hex(3)}", "Creator", adult=True)
    async with httpx.AsyncClient(base_url=cast.base_urls[0], timeout=unit(10)) as http:
        r = await http.post("/api/streams", json={"title": "chaos"}, headers=_auth(creator))
        assert r.status_code == 201, r.text
        room_id = str(r.json()["room"])
    viewer = user_token(cast.secrets, f"vw_{secrets.token_hex(3)}", "Viewer", adult=False)
    tasks = [asyncio.create_task(_viewer(url, room_id, viewer)) for url in cast.ws_urls]
    try:
        await _until_subscribers(cast, room_id, len(cast.servers))
        yield room_id
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _subscribers(cast: Cast, room: str) -> int:
    client = redis.Redis.from_url(cast.store.owner_url(keys.channel(room)))
    try:
        reply = client.pubsub_shardnumsub(keys.channel(room))
    finally:
        client.close()
    return int(reply[0][1])


async def _until_subscribers(cast: Cast, room: str, wanted: int) -> None:
    for _ in range(int(unit(200))):
        if _subscribers(cast, room) >= wanted:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{room}: {_subscribers(cast, room)} subscribers, wanted {wanted}")


def _options(room: str, stall_s: float = 1.5) -> FaultOptions:
    return FaultOptions(
        rooms=lambda: [room], timeout=unit(30), stall_s=stall_s, exit_timeout=unit(15)
    )


def _all_healthy(cast: Cast) -> list[int]:
    return [cast.healthz(i) for i in cast.indices()]


# -- the plan ------------------------------------------------------------------------------


def test_plan_leaves_the_start_and_the_end_of_the_run_free() -> None:
    names = ["store_kill", "server_kill", "pubsub_cut", "rolling_restart"]
    steps = plan(100.0, names)
    assert [name for _, name in steps] == names
    assert steps[0][0] == pytest.approx(100 * LEAD)
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(steps)]
    assert gaps == pytest.approx([100 * (1 - LEAD - TAIL) / 4] * 3)
    assert steps[-1][0] < 100 * (1 - TAIL)
    assert plan(100.0, []) == []


def test_schedule_refuses_an_unknown_fault(cast: Cast) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        Schedule(cast, 10.0, ["store_kill", "meteor"])


# -- each fault on one store ------------------------------------------------------------------


async def test_store_kill_restarts_the_store_on_its_aof(cast: Cast, room: str) -> None:
    before = cast.store_pids()
    client = redis.Redis.from_url(cast.store_url)
    key = f"chaos:test:{secrets.token_hex(4)}"
    try:
        client.set(key, "acknowledged")
    finally:
        client.close()
    record = await inject("store_kill", cast, _options(room))
    assert record.ok, record
    assert record.recovery_s is not None and record.recovery_s > 0
    assert record.details["marker_survived"]
    assert record.details["healthz_503_seen"], record.details  # the outage was reported
    assert cast.store_pids() != before
    client = redis.Redis.from_url(cast.store_url)
    try:
        assert client.get(key) == b"acknowledged"  # the AOF brought it back
    finally:
        client.close()
    assert _all_healthy(cast) == [200, 200]
    await _until_subscribers(cast, room, 2)


async def test_store_stall_freezes_then_thaws_the_store(cast: Cast, room: str) -> None:
    record = await inject("store_stall", cast, _options(room, stall_s=1.5))
    assert record.ok, record
    assert record.recovery_s is not None
    assert record.details["outage_s"] >= 1.5
    assert _all_healthy(cast) == [200, 200]


async def test_server_kill_restarts_one_server_on_its_port(cast: Cast, room: str) -> None:
    ports = [s.port for s in cast.servers]
    options = _options(room)
    first = await inject("server_kill", cast, options)
    second = await inject("server_kill", cast, options)
    for record in (first, second):
        assert record.ok, record
        assert record.recovery_s is not None
        assert record.details["new_pid"] not in (None, record.details["pid"])
    assert {first.details["server"], second.details["server"]} == {0, 1}  # each in turn
    assert [s.port for s in cast.servers] == ports
    assert _all_healthy(cast) == [200, 200]
    await _until_subscribers(cast, room, 2)


async def test_pubsub_cut_servers_resubscribe_within_the_target(cast: Cast, room: str) -> None:
    await _until_subscribers(cast, room, 2)
    record = await inject("pubsub_cut", cast, _options(room))
    assert record.ok, record
    assert sum(record.details["killed"]) >= 2  # one pub/sub connection per server
    assert record.details["watched"] == 1
    assert record.recovery_s is not None
    assert record.recovery_s <= PUBSUB_TARGET_S * unit(1), record
    assert _subscribers(cast, room) == 2


async def test_pubsub_overflow_drops_subscribers_and_restores_the_limit(
    cast: Cast, room: str
) -> None:
    await _until_subscribers(cast, room, 2)
    client = redis.Redis.from_url(cast.store_url, decode_responses=True)
    try:
        limit = client.config_get("client-output-buffer-limit")["client-output-buffer-limit"]
        record = await inject("pubsub_overflow", cast, _options(room))
        assert record.ok, record
        assert record.details["disconnections"] >= 1
        assert record.details["pubsub_clients_gone"] >= 1
        assert (
            client.config_get("client-output-buffer-limit")["client-output-buffer-limit"] == limit
        )
    finally:
        client.close()
    assert record.recovery_s is not None
    assert _subscribers(cast, room) == 2
    assert _all_healthy(cast) == [200, 200]


async def test_rolling_restart_each_server_stops_by_itself(cast: Cast, room: str) -> None:
    await _until_subscribers(cast, room, 2)
    pids = cast.server_pids()
    record = await inject("rolling_restart", cast, _options(room))
    assert record.ok, record
    steps = record.details["servers"]
    assert [s["server"] for s in steps] == [0, 1]
    for step in steps:
        assert step["exit_code"] in CLEAN_EXITS, step  # SIGTERM: it stopped by itself
        assert step["close_code"] in RESTART_CLOSES, step  # its sockets were told
    assert all(new != old for new, old in zip(cast.server_pids(), pids, strict=True))
    assert _all_healthy(cast) == [200, 200]
    await _until_subscribers(cast, room, 2)


async def test_schedule_runs_its_faults_and_skips_what_is_left_at_stop(
    cast: Cast, room: str
) -> None:
    schedule = Schedule(cast, 4.0, ["pubsub_cut"], _options(room))
    records = await schedule.start()
    assert [(r.name, r.ok) for r in records] == [("pubsub_cut", True)]
    stopped = Schedule(cast, 100.0, ["server_kill"], _options(room))
    stopped.start()
    records = await stopped.stop()
    assert [(r.name, r.ok, r.details) for r in records] == [
        ("server_kill", False, {"skipped": "the run is stopping"})
    ]


# -- the cluster ---------------------------------------------------------------------------


async def test_cluster_store_kill_promotes_a_replica_and_the_master_rejoins(
    tmp_path: Path,
) -> None:
    config = CastConfig(run_dir=tmp_path / "chaos-cluster", store="cluster", servers=2)
    with Cast(config) as cluster_cast:
        harness = cluster_cast.store.harness  # type: ignore[union-attr]
        record = await inject("store_kill", cluster_cast, FaultOptions(timeout=unit(30)))
        assert record.ok, record
        victim = record.details["victim"]
        assert record.details["failover_s"] > 0
        assert record.details["promoted"] and victim not in record.details["promoted"]
        assert record.details["marker_survived"] and record.details["marker_replicas"] == 1
        assert harness.node(victim).role == "replica"  # back, as a replica
        assert record.recovery_s is not None
        assert _all_healthy(cluster_cast) == [200, 200]
