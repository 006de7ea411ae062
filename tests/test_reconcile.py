"""reconcile over the partitioned ledger (PROTOCOL §7), against a real Redis and a real
3-master Valkey Cluster: consistent books across partitions pass, gifts in flight
included; every kind of corruption is named; a store taking gifts while reconcile runs is
no false alarm.

The data is written with plain commands in the layout the money scripts write
(loadtest/bench_reconcile.py ``LedgerWriter``). Reconcile reads the whole store, so these
tests run on a database of their own (``DB``), emptied before each test, and the cluster
test on a cluster of its own.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.cluster

from livegift import keys
from livegift.reconcile import PARTITIONS, Report, reconcile
from loadtest.bench_reconcile import LedgerWriter
from tests.cluster import ValkeyCluster
from tests.conftest import uid, unit

DB = 9  # this module's own database on the session's Redis


@pytest.fixture
def store(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{DB}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def users(prefix: str, count: int, avoid: set[int] | None = None) -> list[str]:
    """``count`` fresh user ids, each in a partition of its own (and none in ``avoid``)."""
    taken = set(avoid or ())
    out: list[str] = []
    while len(out) < count:
        user = uid(prefix)
        if keys.user_partition(user) not in taken:
            taken.add(keys.user_partition(user))
            out.append(user)
    return out


def partition(user: str) -> int:
    return keys.user_partition(user)


def check(client: Any) -> Report:
    return reconcile(client, progress=None)


@dataclass
class Books:
    """A small consistent data set over four partitions (see ``books``)."""

    writer: LedgerWriter
    v1: str
    v2: str
    c1: str
    c2: str
    room1: str
    room2: str
    in_flight: int  # the transfer left in flight
    lingering: int  # landed, its outbox record not removed yet


def books(client: Any) -> Books:
    """Two viewers and two creators in four partitions: purchases (one sandbox), gifts
    landed, one voided, one in flight, one landed whose outbox record lingers; a payout
    paid, one failed and one pending."""
    v1, v2, c1, c2 = users("v", 4)
    room1, room2 = keys.new_room_id(c1, "r1"), keys.new_room_id(c2, "r2")
    w = LedgerWriter(client)
    w.purchase(v1, 1000, uid("txn"))
    w.purchase(v2, 500, uid("txn"), sandbox=True)
    first = w.send(v1, c1, room1, "a", 100)
    w.land(first)
    w.drop_outbox(first, v1)
    lingering = w.send(v1, c2, room2, "b", 50)
    w.land(lingering)
    w.void(w.send(v2, c1, room1, "c", 30))
    in_flight = w.send(v2, c2, room2, "d", 20)
    w.payout(c1, keys.new_payout_id(c1, "paid"), 40, "paid")
    w.payout(c1, keys.new_payout_id(c1, "fail"), 20, "failed")
    w.payout(c2, keys.new_payout_id(c2, "pend"), 10, "pending")
    w.flush()
    return Books(w, v1, v2, c1, c2, room1, room2, in_flight, lingering)


def test_consistent_books_across_partitions_pass(store: redis.Redis) -> None:
    b = books(store)
    report = check(store)
    assert report.ok, report.render()
    assert report.entries == 2 + 2 + 2 + 1 + 1 + 4 + 1
    assert report.accounts == 4 and report.payouts == 3
    assert report.minted == 1500 and report.sandbox_minted == 500
    assert report.in_flight == 20
    assert report.coins == (1000 - 100 - 50) + (500 - 20)
    assert report.diamonds == (100 - 40) + (50 - 10)
    assert report.held == 40 + 10
    assert report.minted == report.coins + report.diamonds + report.held + report.in_flight
    text = report.render()
    assert "in flight 20" in text
    assert "OK: every balance matches its ledger and the invariant holds" in text
    # The transfer lands: nothing is in flight any more, the books still balance.
    b.writer.land(b.in_flight)
    b.writer.drop_outbox(b.in_flight, b.v2)
    b.writer.drop_outbox(b.lingering, b.v1)
    b.writer.flush()
    after = check(store)
    assert after.ok and after.in_flight == 0, after.render()


def test_a_gift_within_one_partition(store: redis.Redis) -> None:
    """Viewer and creator may share a partition: both steps then write to its ledger."""
    (creator,) = users("c", 1)
    viewer = uid("v")
    while partition(viewer) != partition(creator):
        viewer = uid("v")
    room = keys.new_room_id(creator, "r")
    w = LedgerWriter(store)
    w.purchase(viewer, 100, uid("txn"))
    w.land(w.send(viewer, creator, room, "a", 10))
    w.void(w.send(viewer, creator, room, "b", 20))
    w.send(viewer, creator, room, "c", 30)
    w.flush()
    report = check(store)
    assert report.ok, report.render()
    assert (report.entries, report.in_flight, report.diamonds) == (6, 30, 10)


def test_an_empty_store_passes(store: redis.Redis) -> None:
    report = check(store)
    assert report.ok and report.entries == 0 and report.in_flight == 0, report.render()


def raw_entry(client: Any, p: int, fields: dict[str, Any]) -> int:
    """An entry written straight into partition ``p``'s ledger, with the next id."""
    n = int(client.incr(keys.entry_seq(p)))
    eid = n * PARTITIONS + p
    client.xadd(keys.ledger(p), {"id": eid, "ts": 1, "xfer": "", **fields})
    return eid


def tamper(client: Any, b: Books, how: str) -> str:
    """Corrupt the books ``how``; returns what the report must say."""
    w = b.writer
    p1 = partition(b.v1)
    if how == "gap":
        rows = client.xrange(keys.ledger(p1))  # purchase, debit a, debit b
        client.xdel(keys.ledger(p1), rows[1][0])
        return f"entry 3 (id {3 * PARTITIONS + p1}) follows entry 1"
    if how == "wrong balance":
        w.entry(client, b.v1, "purchase", "coins", 5, "store", "t-x", balance=999)
        client.incrby(keys.minted(p1), 5)
        return f"account {b.v1}: entry {4 * PARTITIONS + p1} says coins balance 999"
    if how == "wallet off its ledger":
        client.hincrby(keys.wallet(b.c1), "diamonds", -1)
        return f"account {b.c1}: diamonds 59 but ledger says 60"
    if how == "minted off":
        client.incrby(keys.minted(p1), 7)
        return f"partition {p1}: minted counter 1007 but its ledger says 1000"
    if how == "held off":
        client.incrby(keys.held(partition(b.c1)), 1)
        return f"partition {partition(b.c1)}: held counter 41 but its ledger says 40"
    if how == "entry in the wrong partition":
        raw_entry(client, p1, {"kind": "purchase", "account": b.c1, "asset": "coins"})
        return f"account {b.c1} does not live in partition {p1}"
    if how == "unknown kind":
        eid = raw_entry(client, p1, {"kind": "bonus", "account": b.v1, "asset": "coins"})
        return f"ledger entry {eid}: unknown kind 'bonus'"
    if how == "credit without debit":
        fake = (w.n[p1] + 50) * PARTITIONS + p1
        e = w.entry(client, b.c1, "gift_credit", "diamonds", 9, b.v1, "z", b.room1, str(fake))
        return f"gift_credit entry {e} names transfer {fake}, whose gift debit is not in the ledger"
    if how == "credit naming a purchase":
        purchase = 1 * PARTITIONS + p1
        e = w.entry(client, b.c1, "gift_credit", "diamonds", 9, b.v1, "z", b.room1, str(purchase))
        return f"gift_credit entry {e} names transfer {purchase}, which is no gift debit"
    if how == "double credit":
        x = w.send(b.v1, b.c1, b.room1, "dup", 5)
        w.land(x, keep=True)
        w.land(x)
        return f"transfer {x} was landed twice"
    if how == "credit and refund":
        x = w.send(b.v1, b.c1, b.room1, "both", 5)
        w.land(x, keep=True)
        w.void(x)
        return f"transfer {x} was both landed and voided"
    if how == "refund twice":
        x = w.send(b.v1, b.c1, b.room1, "twice", 5)
        w.void(x, keep=True)
        w.void(x)
        return f"transfer {x} was voided twice"
    if how == "credit off its debit":
        x = w.send(b.v1, b.c1, b.room1, "off", 5)
        e = w.entry(client, b.c1, "gift_credit", "diamonds", 6, b.v1, "off", b.room1, str(x))
        return f"gift_credit entry {e} does not match gift debit {x}: amount 6 != 5"
    if how == "in flight, not in the outbox":
        x = w.send(b.v1, b.c1, b.room1, "lost", 5, outbox=False)
        return f"gift debit {x} was neither landed nor voided and is not in the outbox: lost"
    if how == "outbox record off its debit":
        record = json.loads(client.hget(keys.outbox(partition(b.v2)), str(b.in_flight)))
        record["cost"] = 2000
        client.hset(keys.outbox(partition(b.v2)), str(b.in_flight), json.dumps(record))
        return f"outbox record of transfer {b.in_flight} does not match its gift debit: cost"
    if how == "voided, still in the outbox":
        x = w.send(b.v1, b.c1, b.room1, "void", 5)
        w.void(x)
        w.flush()
        client.hset(keys.outbox(p1), str(x), "{}")
        return f"transfer {x} was voided but is still in the outbox"
    if how == "outbox names no debit":
        client.hset(keys.outbox(p1), str(1 * PARTITIONS + p1), "{}")
        return f"outbox of partition {p1} holds transfer '{1 * PARTITIONS + p1}'"
    if how == "payout gross":
        client.hset(keys.payout(keys.new_payout_id(b.c1, "paid")), "gross", 41)
        return "gross 41 != net 20 + commission 20"
    if how == "payout hash deleted":
        pid = keys.new_payout_id(b.c1, "fail")
        client.delete(keys.payout(pid))
        return f"ledger moves diamonds for payout {pid}, which does not exist"
    if how == "failed payout without its reversal":
        pid = keys.new_payout_id(b.c2, "pend")
        client.hset(keys.payout(pid), "status", "failed")
        return f"payout {pid} is failed: expected 1 reversal of +10"
    if how == "counter ahead of the ledger":
        client.incr(keys.entry_seq(p1))
        return f"partition {p1}: ledger entry counter is 4 but the ledger ends at entry 3"
    raise AssertionError(how)


CORRUPTIONS = [
    "gap",
    "wrong balance",
    "wallet off its ledger",
    "minted off",
    "held off",
    "entry in the wrong partition",
    "unknown kind",
    "credit without debit",
    "credit naming a purchase",
    "double credit",
    "credit and refund",
    "refund twice",
    "credit off its debit",
    "in flight, not in the outbox",
    "outbox record off its debit",
    "voided, still in the outbox",
    "outbox names no debit",
    "payout gross",
    "payout hash deleted",
    "failed payout without its reversal",
    "counter ahead of the ledger",
]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_each_corruption_is_named(store: redis.Redis, how: str) -> None:
    b = books(store)
    expect = tamper(store, b, how)
    b.writer.flush()
    report = check(store)
    assert not report.ok
    assert any(expect in p for p in report.problems), (expect, report.problems)
    assert "FAILED" in report.render()


def test_a_debit_that_lands_after_its_partition_was_read_is_in_flight(
    store: redis.Redis,
) -> None:
    """The outbox record is gone (the landing happened and the record was removed after
    reconcile read the creator's ledger): its ``landed`` key says where it went."""
    b = books(store)
    store.hdel(keys.outbox(partition(b.v2)), str(b.in_flight))
    store.set(keys.landed(partition(b.c2), str(b.in_flight)), "7 1")
    report = check(store)
    assert report.ok and report.in_flight == 20, report.render()


class LateReads:
    """A client on which the first ``times`` reads of one ledger miss its ``hidden``
    entries (its last ones): as if that partition was read just before they were written,
    and the others just after."""

    def __init__(self, client: Any, ledger: str, hidden: set[bytes], times: int) -> None:
        self.client, self.ledger, self.hidden, self.times = client, ledger, hidden, times

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def pipeline(self, *args: Any, **kwargs: Any) -> LatePipeline:
        return LatePipeline(self, self.client.pipeline(*args, **kwargs))


class LatePipeline:
    def __init__(self, owner: LateReads, pipe: Any) -> None:
        self.owner, self.pipe, self.late = owner, pipe, []

    def __enter__(self) -> LatePipeline:
        self.late = []
        return self

    def __exit__(self, *exc: object) -> None:
        self.pipe.reset()

    def __getattr__(self, name: str) -> Any:
        def queue(key: Any = None, *args: Any, **kwargs: Any) -> LatePipeline:
            self.late.append(name == "xrange" and key == self.owner.ledger)
            getattr(self.pipe, name)(key, *args, **kwargs)
            return self

        return queue

    def execute(self) -> list[Any]:
        replies = list(self.pipe.execute())
        if any(self.late) and self.owner.times > 0:
            self.owner.times -= 1
            for i, late in enumerate(self.late):
                if late:
                    replies[i] = [r for r in replies[i] if r[0] not in self.owner.hidden]
        return replies


@pytest.mark.parametrize("late", [2, 99])
def test_a_credit_read_before_its_debit(store: redis.Redis, late: int) -> None:
    """The credit is read, its debit (in a partition read a moment earlier) is not: the
    viewer's partition is read again before the credit is called a problem."""
    b = books(store)
    x = b.writer.send(b.v1, b.c1, b.room1, "late", 5)
    b.writer.land(x)
    b.writer.flush()
    ledger = keys.ledger(partition(b.v1))
    hidden = {store.xrevrange(ledger, count=1)[0][0]}
    report = check(LateReads(store, ledger, hidden, times=late))
    if late == 2:  # the first two reads of the viewer's ledger miss the debit
        assert report.ok and report.in_flight == 20, report.render()
    else:  # never read: the credit has no debit
        expect = f"names transfer {x}, whose gift debit is not in the ledger"
        assert any(expect in p for p in report.problems), report.problems


# -- a live store ------------------------------------------------------------------------


class Traffic(threading.Thread):
    """Gifts, purchases and payouts between users of many partitions, each step one MULTI
    on one partition (as a script is), with transfers left in flight for a while, some
    voided, and outbox records removed in batches, until ``stop``."""

    def __init__(self, client: Any, viewers: list[str], creators: list[str]) -> None:
        super().__init__(daemon=True)
        self.client, self.viewers, self.creators = client, viewers, creators
        self.stop = threading.Event()
        self.steps = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _run(self) -> None:
        w = LedgerWriter(self.client, atomic=True)
        for v in self.viewers:
            w.purchase(v, 10**6, uid("txn"))
        rooms = {c: keys.new_room_id(c, "live") for c in self.creators}
        flying: deque[tuple[int, str]] = deque()
        landed: list[tuple[int, str]] = []
        i = 0
        while not self.stop.is_set():
            i += 1
            v, c = self.viewers[i % len(self.viewers)], self.creators[i % len(self.creators)]
            flying.append((w.send(v, c, rooms[c], f"r{i}", 1 + i % 5), v))
            if len(flying) > 4:
                x, viewer = flying.popleft()
                if i % 13 == 0:
                    w.void(x)
                else:
                    w.land(x, seq=i)
                    landed.append((x, viewer))
            if len(landed) >= 6:
                for x, viewer in landed:
                    w.drop_outbox(x, viewer)
                landed.clear()
            if i % 40 == 0:
                w.purchase(v, 100, uid("txn"))
            if i % 60 == 0 and w.balances.get((c, "diamonds"), 0) >= 10:
                status = ("paid", "failed", "pending")[i % 3]
                w.payout(c, keys.new_payout_id(c, f"x{i}"), 10, status)
            self.steps = i


def run_while_traffic(client: Any, traffic_client: Any, rounds: int = 3) -> list[Report]:
    viewers = users("v", 6)
    creators = users("c", 4, avoid={partition(v) for v in viewers})
    traffic = Traffic(traffic_client, viewers, creators)
    traffic.start()
    try:
        while traffic.steps < 50 and traffic.is_alive():
            traffic.stop.wait(0.01)
        reports = [check(client) for _ in range(rounds)]
        seen = traffic.steps
    finally:
        traffic.stop.set()
        traffic.join(unit(10))
    assert traffic.error is None, traffic.error
    assert traffic.steps > seen  # money was moving while reconcile ran
    reports.append(check(client))
    return reports


def test_a_live_store_is_no_false_alarm(store: redis.Redis, redis_url: str) -> None:
    writer_client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{DB}")
    try:
        reports = run_while_traffic(store, writer_client)
    finally:
        writer_client.close()
    assert all(r.ok for r in reports), [r.problems[:5] for r in reports]
    assert reports[0].entries < reports[-1].entries
    final = reports[-1]
    assert final.minted == final.coins + final.diamonds + final.held + final.in_flight
    assert final.in_flight > 0  # the traffic leaves its last transfers in flight


# -- on a Redis Cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """A cluster of this module's own: reconcile reads the whole store, and the session's
    cluster holds other modules' data."""
    with ValkeyCluster(root=tmp_path_factory.mktemp("reconcile-cluster")) as c:
        yield c


@pytest.mark.slow
def test_on_a_cluster_books_on_every_master(cluster: ValkeyCluster) -> None:
    client = cluster.client()
    traffic_client = cluster.client()
    try:
        books(client)
        masters = {cluster.master_for_key(keys.ledger(p)).port for p in range(PARTITIONS)}
        assert len(masters) == 3
        report = check(client)
        assert report.ok and report.in_flight == 20, report.render()
        reports = run_while_traffic(client, traffic_client, rounds=2)
        assert all(r.ok for r in reports), [r.problems[:5] for r in reports]
        used = {
            cluster.master_for_key(keys.ledger(p)).port
            for p in range(PARTITIONS)
            if client.xlen(keys.ledger(p))
        }
        assert used == masters  # the data is on all three
        # A writer of its own: the traffic moved the counters of partitions it shares.
        w = LedgerWriter(client)
        v, c = users("v", 2)
        w.purchase(v, 10, uid("txn"))
        x = w.send(v, c, keys.new_room_id(c, "r"), "dup", 5)
        w.land(x, keep=True)
        w.land(x)
        w.flush()
        bad = check(client)
        assert [p for p in bad.problems if "was landed twice" in p] == [
            f"transfer {x} was landed twice: gift_credit entry {w.n[partition(c)] * PARTITIONS + partition(c)}"
        ], bad.problems
    finally:
        client.close()
        traffic_client.close()
