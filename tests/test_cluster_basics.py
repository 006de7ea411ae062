"""livegift on a Redis Cluster (the first step of PROTOCOL §7): a real ``livegift serve``
pointed at one node of a 3-master, 3-replica Valkey Cluster (tests/cluster.py) finds
out that it is a cluster, serves gifts end to end, and reconcile passes. While the
master of the money slot is frozen or killed, gifts are acknowledged ``unavailable``
(never ``internal``) and /healthz is 503; after the failover a retry with the same req
succeeds and is charged once.

These always run (scripts/test also runs the WebSocket/HTTP modules on a cluster with
LIVEGIFT_TEST_CLUSTER=1). They share the session cluster and ``heal()`` it after.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio
import redis.cluster
from redis import exceptions as redis_errors

from livegift import keys, store
from livegift.errors import LiveGiftError, Unavailable
from livegift.scripts import _store_error, store_errors
from tests.cluster import (  # noqa: F401 (fixtures)
    ValkeyCluster,
    healed_cluster_fixture,
    valkey_cluster_fixture,
)
from tests.conftest import ROOT, LiveServer, unit
from tests.test_ws import stream, viewer
from tests.wsclient import Client

pytestmark = pytest.mark.slow


# -- the error map, with redis-py's real exception classes ------------------------------

CLUSTER_FAILURES = [
    redis_errors.ClusterDownError("CLUSTERDOWN The cluster is down"),
    redis_errors.MasterDownError("MASTERDOWN Link with MASTER is down"),
    redis_errors.TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
    redis_errors.MovedError("12182 127.0.0.1:7001"),
    redis_errors.AskError("12182 127.0.0.1:7002"),
    redis_errors.ClusterError("TTL exhausted."),
    redis_errors.SlotNotCoveredError("Slot 12182 is not covered by the cluster."),
    redis_errors.RedisClusterException("Redis Cluster cannot be connected."),
    redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:7001."),
    redis_errors.TimeoutError("Timeout reading from 127.0.0.1:7001"),
    redis_errors.MaxConnectionsError("Too many connections"),
    redis_errors.BusyLoadingError("LOADING Redis is loading the dataset in memory"),
    redis_errors.NoScriptError("NOSCRIPT No matching script."),
]


@pytest.mark.parametrize("exc", CLUSTER_FAILURES, ids=lambda e: type(e).__name__)
def test_every_cluster_failure_is_unavailable(exc: Exception) -> None:
    assert isinstance(_store_error(exc), Unavailable)
    with pytest.raises(Unavailable), store_errors():
        raise exc


def test_script_replies_keep_their_codes() -> None:
    err = _store_error(redis_errors.ResponseError("insufficient_funds need 5 coins"))
    assert err.code == "insufficient_funds"
    other = _store_error(redis_errors.ResponseError("ERR something else"))
    assert type(other) is LiveGiftError and other.code == "internal"


# -- a server on the cluster ------------------------------------------------------------


@pytest.fixture
def server(cluster: ValkeyCluster, tmp_path: Path) -> Iterator[LiveServer]:
    cluster.heal()
    # Any node will do, a replica too: the server asks it and finds the rest.
    url = cluster.urls[-1]
    live = LiveServer(url, log=tmp_path / "server.log").start()
    yield live
    live.close()


def test_detection(cluster: ValkeyCluster) -> None:
    assert store.probe_sync(cluster.url)
    client = store.connect_sync(cluster.urls[-1])
    assert isinstance(client, redis.cluster.RedisCluster)
    client.close()


async def test_detection_async_and_single_server(cluster: ValkeyCluster, redis_url: str) -> None:
    client = await store.connect(cluster.url, 8)
    assert store.is_cluster(client)
    await store.ping(client)
    await client.aclose()
    if not await store.probe(redis_url):  # the single server of a non-cluster run
        single = await store.connect(redis_url, 8)
        assert isinstance(single, redis.asyncio.Redis) and not store.is_cluster(single)
        await single.aclose()


def reconcile_cli(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "livegift", "reconcile", "--quiet"],
        env={"REDIS_URL": url, "PATH": ""},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=unit(60),
    )


async def test_gift_end_to_end_reconcile_and_healthz(
    cluster: ValkeyCluster, server: LiveServer
) -> None:
    assert server.get("/healthz").status_code == 200
    room, creator, creator_token = await stream(server)
    user, token = await viewer(server, name="Alice")
    watcher = await Client.open(server.ws(room, creator_token))
    assert (await watcher.next())["type"] == "welcome"
    sender = await Client.open(server.ws(room, token))
    assert (await sender.next())["type"] == "welcome"
    ack = await sender.gift("r1", "rose", 3)
    assert ack["ok"] is True and ack["balance"] == 1321 - 3 and ack["seq"] == 1, ack
    event = await watcher.until(lambda e: e["type"] == "gift")
    assert event["from"]["id"] == user and event["coins"] == 3
    assert server.get("/api/wallet", creator_token).json()["diamonds"] == 3
    # Presence lives under the room's own tag, on whichever master serves it.
    viewers = await watcher.until(lambda e: e["type"] == "viewers", timeout=6)
    assert viewers["count"] == 2
    await watcher.close()
    await sender.close()
    done = reconcile_cli(cluster.urls[-1])
    assert done.returncode == 0, done.stdout + done.stderr


class Health:
    """/healthz polled in a thread until stopped: every status seen."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=unit(10)) as http:
            while not self._stop.is_set():
                try:
                    self.statuses.append(http.get("/healthz").status_code)
                except httpx.HTTPError:
                    self.statuses.append(0)
                time.sleep(0.1)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(unit(15))
        return self.statuses


async def retry_gift(client: Client, req: str, timeout: float) -> dict[str, Any]:
    """The same gift (same req) again until it is not `unavailable`, as clients do."""
    deadline = time.monotonic() + unit(timeout)
    while True:
        ack = await client.gift(req, "rose", 1)
        if ack["ok"] or ack.get("error", {}).get("code") != "unavailable":
            return ack
        assert time.monotonic() < deadline, ack
        await asyncio.sleep(0.3)


@pytest.mark.parametrize("how", ["freeze", "kill"])
async def test_money_master_down_then_failover(
    cluster: ValkeyCluster, server: LiveServer, how: str
) -> None:
    room, _, creator_token = await stream(server)
    user, token = await viewer(server)
    watcher = await Client.open(server.ws(room, creator_token))
    await watcher.next()
    sender = await Client.open(server.ws(room, token))
    await sender.next()
    assert (await sender.gift("g1"))["ok"]

    victim = cluster.master_for_key(keys.wallet(user))  # the gift's first step runs there
    health = Health(server.base_url)
    await asyncio.sleep(0.3)  # a 200 or two first
    if how == "freeze":
        cluster.freeze(victim)
    else:
        cluster.kill_master(victim)
    try:
        await sender.send({"op": "gift", "req": "g2", "gift": "rose", "count": 1})
        ack = await sender.ack("g2", timeout=15)
        assert ack["ok"] is False and ack["error"]["code"] == "unavailable", ack
        seconds = await asyncio.to_thread(cluster.wait_failover, victim)
        if how == "kill":
            # The promoted replica has no replica of its own: no write on it can be made
            # durable, so a gift there is answered unavailable until the old master is back.
            await sender.send({"op": "gift", "req": "g2", "gift": "rose", "count": 1})
            ack = await sender.ack("g2", timeout=15)
            assert ack["ok"] is False and ack["error"]["code"] == "unavailable", ack
    finally:
        if how == "freeze":
            cluster.thaw(victim)
    await asyncio.to_thread(cluster.heal)
    statuses = health.stop()
    assert 503 in statuses, statuses
    assert 200 in statuses[statuses.index(503) :] or server.get("/healthz").status_code == 200

    # After the failover: the same req again is charged once.
    ack = await retry_gift(sender, "g2", timeout=20)
    assert ack["ok"] is True, ack
    again = await sender.gift("g2", "rose", 1)
    assert again["ok"] and again["balance"] == ack["balance"]  # a replay, not a charge
    assert ack["balance"] == 1321 - 2, (ack, seconds)
    assert server.get("/healthz").status_code == 200
    # Room events flow again (the subscriber moved to a live node if it had to).
    event = await watcher.until(lambda e: e["type"] == "gift" and e["seq"] == ack["seq"], 20)
    assert event["coins"] == 1
    await watcher.close()
    await sender.close()
    cluster.heal()
    done = reconcile_cli(cluster.url)
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"{how}: failover after {seconds:.1f}s")


async def test_new_socket_while_cluster_down_is_1013_not_internal(
    cluster: ValkeyCluster, server: LiveServer
) -> None:
    room, _, _ = await stream(server)
    _, token = await viewer(server, coins_package=None)
    victim = cluster.master_for_key(keys.room(room))
    cluster.kill_master(victim)
    try:
        client = await Client.open(server.ws(room, token))
        with pytest.raises(Exception) as closed:
            await client.next(timeout=15)
        assert getattr(closed.value, "rcvd", None) is not None, closed.value
        assert closed.value.rcvd.code == 1013, closed.value.rcvd  # type: ignore[attr-defined]
    finally:
        await asyncio.to_thread(cluster.wait_failover, victim)
        cluster.heal()
