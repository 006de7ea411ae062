"""A master killed with ``kill -9`` in the middle of gift load (PROTOCOL §7, issue 10).

A real ``livegift serve`` on a 3-master, 3-replica Valkey Cluster takes gifts from
viewers in rooms spread over the masters, each gift retried with the same req after every
``unavailable``, timeout or lost socket until it is answered, as clients do. The creators
watch their rooms and resume with ``since`` after every disconnect. Mid-load the master
with the most of the rooms is SIGKILLed; its replica takes over; the dead node comes back
as a replica. Afterwards:

- every gift was acknowledged once and is in the ledger exactly once (one debit, one
  credit, no refund), and every viewer was charged exactly once per req;
- every room's watcher saw seq 1, 2, 3, ... with no gap and no duplicate, and the seqs
  of the acks are exactly those;
- reconcile passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from livegift import keys
from tests.cluster import (  # noqa: F401 (fixtures)
    ValkeyCluster,
    healed_cluster_fixture,
    valkey_cluster_fixture,
)
from tests.conftest import LiveServer, uid, unit
from tests.test_cluster_basics import reconcile_cli
from tests.wsclient import Client

pytestmark = pytest.mark.slow

ROOMS = 3
VIEWERS = 6
GIFTS = 30  # per viewer
START_COINS = 6607


@pytest.fixture
def server(cluster: ValkeyCluster, tmp_path: Path) -> Iterator[LiveServer]:
    live = LiveServer(cluster.urls[-1], log=tmp_path / "server.log").start()
    yield live
    live.close()


LOST = (ConnectionClosed, TimeoutError, OSError, InvalidStatus)


@dataclass
class Watcher:
    """A creator's socket on its room, resumed with ``since`` after every loss."""

    server: LiveServer
    room: str
    token: str
    seqs: list[int] = field(default_factory=list)
    resumes: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            since = {"since": self.seqs[-1]} if self.seqs else {}
            try:
                client = await Client.open(self.server.ws(self.room, self.token, **since))
                try:
                    await self._read(client, stop)
                finally:
                    await client.close()
            except LOST:
                self.resumes += 1
                await asyncio.sleep(0.2)

    async def _read(self, client: Client, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                event = await client.next(timeout=0.5)
            except TimeoutError:
                continue
            if "seq" in event and event["type"] in ("gift", "shoutout"):
                self.seqs.append(int(event["seq"]))


@dataclass
class Sender:
    """A viewer sending GIFTS gifts, each retried with the same req until answered."""

    server: LiveServer
    room: str
    token: str
    user: str
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)
    retries: int = 0

    async def run(self) -> None:
        client: Client | None = None
        for n in range(GIFTS):
            req = f"{self.user}-{n}"
            while True:
                try:
                    if client is None:
                        client = await Client.open(self.server.ws(self.room, self.token))
                    await client.send({"op": "gift", "req": req, "gift": "rose", "count": 1})
                    ack = await client.ack(req, timeout=10)
                except LOST:
                    self.retries += 1
                    if client is not None:
                        await asyncio.shield(_close(client))
                    client = None
                    await asyncio.sleep(0.2)
                    continue
                if not ack["ok"] and ack["error"]["code"] == "unavailable":
                    self.retries += 1
                    await asyncio.sleep(0.2)
                    continue
                assert ack["ok"], ack
                self.acks[req] = ack
                break
        if client is not None:
            await client.close()


async def _close(client: Client) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), 2)


def entries(server: LiveServer, token: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor: int | None = None
    while True:
        params = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        body = server.get("/api/wallet/transactions", token, params=params).json()
        rows += body["transactions"]
        cursor = body["next_cursor"]
        if cursor is None:
            return rows


async def test_kill_master_mid_load_loses_and_doubles_nothing(
    cluster: ValkeyCluster, server: LiveServer
) -> None:
    creators = [(uid("c"), None) for _ in range(ROOMS)]
    rooms = []
    for creator, _ in creators:
        token = server.token(creator, name="C")
        rooms.append((server.create_stream(token), creator, token))
    viewers = []
    for i in range(VIEWERS):
        user = uid("v")
        token = server.token(user, name=f"V{i}")
        server.recharge(token, user, "p6607")
        viewers.append((user, token))

    stop = asyncio.Event()
    watchers = [Watcher(server, room, token) for room, _, token in rooms]
    watching = [asyncio.create_task(w.run(stop)) for w in watchers]
    await asyncio.sleep(1)
    senders = [
        Sender(server, rooms[i % ROOMS][0], token, user) for i, (user, token) in enumerate(viewers)
    ]
    sending = [asyncio.create_task(s.run()) for s in senders]

    # Kill the master that serves the most of the rooms (and so their creators' wallets),
    # once a third of the gifts are acknowledged.
    deadline = time.monotonic() + unit(60)
    while sum(len(s.acks) for s in senders) < VIEWERS * GIFTS // 3:
        assert time.monotonic() < deadline, "no gifts acknowledged"
        await asyncio.sleep(0.05)
    owners = Counter(cluster.master_for_key(keys.room(room)).port for room, _, _ in rooms)
    victim = cluster.node(owners.most_common(1)[0][0])
    acked_before = sum(len(s.acks) for s in senders)
    cluster.kill_master(victim)
    seconds = await asyncio.to_thread(cluster.wait_failover, victim)
    await asyncio.to_thread(cluster.restart, victim)  # back as a replica: WAIT works again

    await asyncio.wait_for(asyncio.gather(*sending), unit(120))
    # Every room's last gift reached its watcher, then stop watching.
    deadline = time.monotonic() + unit(30)
    for w, (room, _, _) in zip(watchers, rooms, strict=True):
        want = max(a["seq"] for s in senders if s.room == room for a in s.acks.values())
        while not w.seqs or w.seqs[-1] < want:
            assert time.monotonic() < deadline, (room, w.seqs[-5:], want)
            await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*watching)

    # Every viewer: charged exactly once per req, one debit per req, no refund.
    for s in senders:
        assert len(s.acks) == GIFTS
        rows = entries(server, s.token)
        debits = Counter(e["reference"] for e in rows if e["kind"] == "gift_debit")
        assert debits == Counter(list(s.acks)), (s.user, debits)
        assert not [e for e in rows if e["kind"] == "gift_refund"]
        coins = server.get("/api/wallet", s.token).json()["coins"]
        assert coins == START_COINS - GIFTS, (s.user, coins)
        assert min(a["balance"] for a in s.acks.values()) == START_COINS - GIFTS
    # Every creator: one credit per gift to the room.
    for room, _, token in rooms:
        sent = [r for s in senders if s.room == room for r in s.acks]
        credits = Counter(
            e["reference"] for e in entries(server, token) if e["kind"] == "gift_credit"
        )
        assert credits == Counter(sent)
        assert server.get("/api/wallet", token).json()["diamonds"] == len(sent)
    # Every room: seqs 1..N with no gap or duplicate, exactly the acknowledged ones.
    for w, (room, _, _) in zip(watchers, rooms, strict=True):
        acked = sorted(a["seq"] for s in senders if s.room == room for a in s.acks.values())
        assert w.seqs == list(range(1, len(w.seqs) + 1)), (room, w.seqs)
        assert acked == w.seqs, room

    done = reconcile_cli(cluster.url)
    assert done.returncode == 0, done.stdout + done.stderr
    print(
        f"failover after {seconds:.1f}s; {acked_before} acked before the kill; retries "
        f"{sum(s.retries for s in senders)}; watcher resumes {sum(w.resumes for w in watchers)}"
    )
