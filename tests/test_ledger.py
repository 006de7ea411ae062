"""The ledger's Lua scripts against a real Redis: payouts, entries, reconcile."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from livegift import auth, keys, store
from livegift.auth import User
from livegift.catalog import default_catalog
from livegift.config import Settings
from livegift.errors import (
    BelowMinimum,
    IdempotencyConflict,
    InsufficientFunds,
    PayoutLimit,
    StreamNotLive,
)
from livegift.ledger import Ledger
from livegift.money import payout_split
from livegift.reconcile import reconcile
from livegift.streams import Streams
from tests.cluster import ValkeyCluster
from tests.conftest import CLUSTER, PAYMENT_SECRET, ROOT, SECRET, uid

SETTINGS = Settings(secret=SECRET, payment_secret=PAYMENT_SECRET, gift_rate=1000, gift_burst=1000)


def db_url(redis_url: str, db: int) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture(scope="module")
def ledger_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A data store each test empties: db 5 of the shared server, or on the cluster run
    (a cluster has only db 0) a cluster of this module's own."""
    if not CLUSTER:
        yield db_url(request.getfixturevalue("redis_url"), 5)
        return
    with ValkeyCluster(root=tmp_path_factory.mktemp("ledger-cluster")) as cluster:
        yield cluster.url


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[Ledger]:
    client = await store.connect(ledger_url, 16)
    await client.flushdb()
    yield Ledger(client, SETTINGS, default_catalog())
    await client.aclose()


@pytest.fixture
def streams(ledger: Ledger) -> Streams:
    return Streams(ledger.redis, SETTINGS, ledger.scripts)


async def buy(ledger: Ledger, user: User, package: str = "p6607") -> None:
    token = auth.mint_receipt(PAYMENT_SECRET, ledger.catalog, user.id, package, sandbox=False)
    await ledger.recharge(auth.verify_receipt(PAYMENT_SECRET, ledger.catalog, token, user))


async def test_gift_to_ended_stream_is_stream_not_live(ledger: Ledger, streams: Streams) -> None:
    creator, fan = User(uid("c"), "C"), User(uid("f"), "F")
    room, _ = await streams.start_stream(creator, "t")
    await buy(ledger, fan)
    rose = ledger.catalog.gift("rose")
    assert (await ledger.gift(fan, room, "a", rose, 1, adult=True)).seq == 1
    await streams.end_stream(creator, room)
    with pytest.raises(StreamNotLive):
        await ledger.gift(fan, room, "b", rose, 1, adult=True)
    with pytest.raises(StreamNotLive):
        await ledger.gift(fan, "never-existed", "c", rose, 1, adult=True)
    assert await ledger.wallet(fan.id) == (6606, 0)


async def test_payouts_math_limits_idempotency_and_settlement(
    ledger: Ledger, streams: Streams
) -> None:
    creator, fan = User(uid("c"), "C"), User(uid("f"), "F")
    room, _ = await streams.start_stream(creator, "t")
    for _ in range(11):
        await buy(ledger, fan)
    universe = ledger.catalog.gift("universe")
    await ledger.gift(fan, room, "big", universe, 2, adult=True)  # 69,998 diamonds
    split = payout_split(2001, SETTINGS.commission_bps)
    p1, replayed = await ledger.create_payout(creator, "po_1", split, "fp1", "key-1")
    assert (p1["gross"], p1["net"], p1["commission"], p1["status"]) == (2001, 1000, 1001, "pending")
    assert not replayed
    again, replayed = await ledger.create_payout(creator, "po_1b", split, "fp1", "key-1")
    assert replayed and again == p1
    with pytest.raises(IdempotencyConflict):
        await ledger.create_payout(creator, "po_1c", payout_split(3000, 5000), "fp2", "key-1")
    with pytest.raises(BelowMinimum):
        await ledger.create_payout(creator, "po_2", payout_split(999, 5000), "fp3", "key-2")
    with pytest.raises(InsufficientFunds):
        await ledger.create_payout(creator, "po_3", payout_split(10**6, 5000), "fp4", "key-3")
    assert await ledger.wallet(creator.id) == (0, 69998 - 2001)
    await ledger.settle_payout("po_1", "failed")
    assert await ledger.wallet(creator.id) == (0, 69998)
    assert (await ledger.payouts(creator.id))[0]["status"] == "failed"
    # The daily cap is on net cents: 100,000 net needs 200,000 gross at 50 %.
    cap_settings = Settings(
        secret=SECRET, payment_secret=PAYMENT_SECRET, payout_daily_cap_cents=20_000
    )
    capped = Ledger(ledger.redis, cap_settings, ledger.catalog)
    await capped.create_payout(creator, "po_4", payout_split(30_000, 5000), "fp5", "key-4")
    with pytest.raises(PayoutLimit):
        await capped.create_payout(creator, "po_5", payout_split(12_000, 5000), "fp6", "key-5")
    paid = await capped.settle_payout("po_4", "paid")
    assert paid["status"] == "paid"
    report = reconcile(store.connect_sync(db_url_of(ledger)), progress=None)
    assert report.ok, report.render()
    assert report.held == 30_000


def db_url_of(ledger: Ledger) -> str:
    if store.is_cluster(ledger.redis):
        node = ledger.redis.get_default_node()
        return f"redis://{node.host}:{node.port}/0"
    kw = ledger.redis.connection_pool.connection_kwargs
    password = f":{kw['password']}@" if kw.get("password") else ""
    return f"redis://{password}{kw['host']}:{kw['port']}/{kw['db']}"


async def test_transactions_newest_first_with_cursor(ledger: Ledger, streams: Streams) -> None:
    creator, fan = User(uid("c"), "C"), User(uid("f"), "F")
    room, _ = await streams.start_stream(creator, "t")
    await buy(ledger, fan, "p330")
    rose = ledger.catalog.gift("rose")
    for i in range(5):
        await ledger.gift(fan, room, f"r{i}", rose, 1, adult=True)
    page, cursor = await ledger.transactions(fan.id, 4, None)
    assert [e["kind"] for e in page] == ["gift_debit"] * 4
    assert [e["balance"] for e in page] == [325, 326, 327, 328]
    rest, end = await ledger.transactions(fan.id, 4, cursor)
    assert [e["kind"] for e in rest] == ["gift_debit", "purchase"] and end is None
    assert rest[-1]["amount"] == 330 and rest[-1]["counterparty"] == "store"
    credits, _ = await ledger.transactions(creator.id, 10, None)
    assert {e["kind"] for e in credits} == {"gift_credit"} and credits[0]["counterparty"] == fan.id


async def test_reconcile_names_the_account_that_differs(ledger: Ledger, redis_url: str) -> None:
    fan = User(uid("f"), "F")
    await buy(ledger, fan, "p65")
    url = db_url_of(ledger)
    assert reconcile(store.connect_sync(url), progress=None).ok
    await ledger.redis.hincrby(keys.wallet(fan.id), "coins", 5)  # tamper outside a script
    report = reconcile(store.connect_sync(url), progress=None)
    assert not report.ok
    assert any(fan.id in p for p in report.problems)
    cli = subprocess.run(
        [sys.executable, "-m", "livegift", "reconcile", "--quiet"],
        env={"REDIS_URL": url, "PATH": ""},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1 and fan.id in cli.stdout


async def test_reconcile_is_consistent_while_money_moves(ledger: Ledger, streams: Streams) -> None:
    """A live store: reconcile reads consistent cuts, so traffic is not a false alarm."""
    fast = Ledger(ledger.redis, SETTINGS.with_(gift_rate=10**6, gift_burst=10**6), ledger.catalog)
    creator = User(uid("c"), "C")
    fans = [User(uid("f"), "F") for _ in range(4)]
    room, _ = await streams.start_stream(creator, "t")
    for fan in fans:
        await buy(fast, fan)
    await fast.gift(fans[0], room, "big", fast.catalog.gift("galaxy"), 5, adult=True)
    stop = asyncio.Event()

    async def gifting(fan: User) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await fast.gift(fan, room, f"r{n}", fast.catalog.gift("rose"), 1, adult=True)

    async def cashing_out() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            split = payout_split(1000, SETTINGS.commission_bps)
            try:
                await fast.create_payout(creator, f"po_live{n}", split, "fp", f"k{n}")
            except InsufficientFunds:  # paid ones keep the diamonds; roses refill slowly
                await asyncio.sleep(0.01)
                continue
            await fast.settle_payout(f"po_live{n}", "paid" if n % 4 == 0 else "failed")

    tasks = [asyncio.create_task(gifting(f)) for f in fans] + [asyncio.create_task(cashing_out())]
    client = store.connect_sync(db_url_of(ledger))
    try:
        await asyncio.sleep(0.2)
        reports = [await asyncio.to_thread(reconcile, client, None) for _ in range(4)]
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert all(r.ok for r in reports), [r.problems[:3] for r in reports]
    assert reports[0].entries < reports[-1].entries  # money was moving throughout
    final = reconcile(client, progress=None)
    client.close()
    assert final.ok and final.payouts > 0
    assert final.minted == final.coins + final.diamonds + final.held


class PayoutsListed:
    """A reconcile client that runs ``then`` once, right after reconcile lists the payouts:
    after its first pass over the ledger, before its catch-up reads the entries since."""

    def __init__(self, client: Any, then: Callable[[], None]) -> None:
        self.client, self.then = client, then
        self.ran = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def scan_iter(self, match: str, **kw: Any) -> Iterator[bytes]:
        yield from self.client.scan_iter(match=match, **kw)
        if match.startswith(keys.PAYOUT_PREFIX) and not self.ran:
            self.ran = True
            self.then()


IN_THE_WINDOW = {
    "payout created": "",
    "payout created and failed": "",
    "payout created, hash deleted": "ledger moves diamonds for payout po_late, which does not exist",
    "listed payout's hash deleted": "ledger moves diamonds for payout po_b, which does not exist",
}


@pytest.mark.parametrize("what", IN_THE_WINDOW)
async def test_reconcile_judges_payouts_created_after_it_lists_them(
    ledger: Ledger, streams: Streams, what: str
) -> None:
    """A payout created once reconcile has listed the payouts, whose entry it then reads, is
    live traffic, not a payout missing from the store; a payout that is truly missing is."""
    creator, fan = User(uid("c"), "C"), User(uid("f"), "F")
    room, _ = await streams.start_stream(creator, "t")
    await buy(ledger, fan)
    await ledger.gift(fan, room, "g1", ledger.catalog.gift("galaxy"), 3, adult=True)
    split = payout_split(1000, SETTINGS.commission_bps)
    await ledger.create_payout(creator, "po_a", split, "fp", "ka")
    await ledger.create_payout(creator, "po_b", split, "fp", "kb")
    await ledger.settle_payout("po_a", "failed")
    loop = asyncio.get_running_loop()

    async def meanwhile() -> None:
        if what.startswith("payout created"):
            await ledger.create_payout(creator, "po_late", split, "fp", "klate")
        if what == "payout created and failed":
            await ledger.settle_payout("po_late", "failed")
        elif what == "payout created, hash deleted":
            await ledger.redis.delete(keys.payout("po_late"))
        elif what == "listed payout's hash deleted":
            await ledger.redis.delete(keys.payout("po_b"))

    def then() -> None:
        asyncio.run_coroutine_threadsafe(meanwhile(), loop).result(timeout=30)

    client = store.connect_sync(db_url_of(ledger))
    proxy: Any = PayoutsListed(client, then)
    report = await asyncio.to_thread(reconcile, proxy, None)
    client.close()
    assert proxy.ran
    expect = IN_THE_WINDOW[what]
    if expect:
        assert report.problems == [expect], report.problems
    else:
        assert report.ok, report.problems
        assert report.entries == 6 + (2 if what == "payout created and failed" else 1)
        assert report.minted == report.coins + report.diamonds + report.held


async def test_reconcile_reports_an_unknown_kind(ledger: Ledger) -> None:
    """An entry of a kind reconcile does not know is an error, not a payout."""
    fan = User(uid("f"), "F")
    await buy(ledger, fan, "p65")
    client = store.connect_sync(db_url_of(ledger))
    assert reconcile(client, progress=None).ok
    r: Any = ledger.redis
    n = await r.incr(keys.ENTRY_SEQ)
    await r.xadd(
        keys.LEDGER,
        {
            "id": n,
            "ts": 1,
            "kind": "bonus",
            "account": fan.id,
            "asset": "diamonds",
            "amount": -5,
            "balance": -5,
            "counterparty": "payouts",
            "ref": "po_bonus",
            "room": "",
        },
    )
    await r.hincrby(keys.wallet(fan.id), "diamonds", -5)
    report = reconcile(client, progress=None)
    client.close()
    assert not report.ok
    assert f"ledger entry {n}: unknown kind 'bonus'" in report.problems, report.problems
    assert not any("payout" in p for p in report.problems), report.problems


TAMPERING = [
    "wallet",
    "minted counter",
    "held counter",
    "payout gross",
    "payout status",
    "payout unknown status",
    "payout hash deleted",
    "payout entry deleted",
    "gift entry deleted",
    "forged debit",
    "wallet before a later entry",
]


@pytest.mark.parametrize("how", TAMPERING)
async def test_reconcile_catches_tampering(ledger: Ledger, streams: Streams, how: str) -> None:
    creator, fan = User(uid("c"), "C"), User(uid("f"), "F")
    room, _ = await streams.start_stream(creator, "t")
    await buy(ledger, fan)
    await ledger.gift(fan, room, "g1", ledger.catalog.gift("galaxy"), 3, adult=True)
    split = payout_split(1000, SETTINGS.commission_bps)
    await ledger.create_payout(creator, "po_a", split, "fp", "ka")
    await ledger.create_payout(creator, "po_b", split, "fp", "kb")
    await ledger.settle_payout("po_a", "failed")
    client = store.connect_sync(db_url_of(ledger))
    assert reconcile(client, progress=None).ok
    r: Any = ledger.redis
    entries = await r.xrange(keys.LEDGER)  # purchase, debit, credit, payout, payout, reversal
    expect = {
        "wallet": f"account {creator.id}: diamonds",
        "minted counter": "minted counter",
        "held counter": "held counter",
        "payout gross": "payout po_b: gross 1001 != net 500 + commission 500",
        "payout status": "payout po_b is failed: expected 1 reversal",
        "payout unknown status": "payout po_b: unknown status 'lost'",
        "payout hash deleted": "payout po_b, which does not exist",
        "payout entry deleted": "payout po_b: expected one payout entry",
        "gift entry deleted": "id 3 follows 1",
        "forged debit": "gift debit without its credit",
        "wallet before a later entry": f"account {fan.id}: entry 7 says coins balance",
    }[how]
    if how == "wallet":
        await r.hincrby(keys.wallet(creator.id), "diamonds", -1)
    elif how == "minted counter":
        await r.incrby(keys.MINTED, 7)
    elif how == "held counter":
        await r.incrby(keys.HELD, 1)
    elif how == "payout gross":
        await r.hset(keys.payout("po_b"), "gross", 1001)
    elif how == "payout status":
        await r.hset(keys.payout("po_b"), "status", "failed")
    elif how == "payout unknown status":
        await r.hset(keys.payout("po_b"), "status", "lost")
    elif how == "payout hash deleted":
        await r.delete(keys.payout("po_b"))
    elif how == "payout entry deleted":
        await r.xdel(keys.LEDGER, entries[4][0])
    elif how == "gift entry deleted":
        await r.xdel(keys.LEDGER, entries[1][0])
    elif how == "forged debit":
        fields = {k.decode(): v for k, v in entries[1][1].items()}
        await r.xadd(keys.LEDGER, {**fields, "id": await r.incr(keys.ENTRY_SEQ)})
    elif how == "wallet before a later entry":
        await r.hincrby(keys.wallet(fan.id), "coins", 5)
        await ledger.gift(fan, room, "g2", ledger.catalog.gift("rose"), 1, adult=True)
    report = reconcile(client, progress=None)
    client.close()
    assert not report.ok
    assert any(expect in p for p in report.problems), report.problems
    assert "FAILED" in report.render()


def test_reconcile_holds_on_the_shared_test_database(redis_url: str) -> None:
    cli = subprocess.run(
        [sys.executable, "-m", "livegift", "reconcile", "--quiet"],
        env={"REDIS_URL": redis_url, "PATH": ""},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
