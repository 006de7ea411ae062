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


def pid(creator: User, suffix: str) -> str:
    """A payout id of the creator's partition (keys.new_payout_id)."""
    return keys.new_payout_id(creator.id, suffix)


def apart() -> tuple[User, User]:
    """A creator and a fan in partitions of their own: each ledger holds one account's
    entries, so the tests know which entry of which ledger is which."""
    creator = User(uid("c"), "C")
    fan = User(uid("f"), "F")
    while keys.user_partition(fan.id) == keys.user_partition(creator.id):
        fan = User(uid("f"), "F")
    return creator, fan


async def ledger_entry(r: Any, user: User, kind: str, ref: str) -> tuple[bytes, dict[bytes, Any]]:
    """The one entry of ``kind`` and ``ref`` in the ledger of the user's partition."""
    rows: list[tuple[bytes, dict[bytes, Any]]]
    rows = await r.xrange(keys.ledger(keys.user_partition(user.id)))
    (row,) = [
        (sid, f) for sid, f in rows if (f[b"kind"], f[b"ref"]) == (kind.encode(), ref.encode())
    ]
    return row


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
    p1, replayed = await ledger.create_payout(creator, pid(creator, "1"), split, "fp1", "key-1")
    assert (p1["gross"], p1["net"], p1["commission"], p1["status"]) == (2001, 1000, 1001, "pending")
    assert not replayed
    again, replayed = await ledger.create_payout(creator, pid(creator, "1b"), split, "fp1", "key-1")
    assert replayed and again == p1
    with pytest.raises(IdempotencyConflict):
        await ledger.create_payout(
            creator, pid(creator, "1c"), payout_split(3000, 5000), "fp2", "key-1"
        )
    with pytest.raises(BelowMinimum):
        await ledger.create_payout(
            creator, pid(creator, "2"), payout_split(999, 5000), "fp3", "key-2"
        )
    with pytest.raises(InsufficientFunds):
        await ledger.create_payout(
            creator, pid(creator, "3"), payout_split(10**6, 5000), "fp4", "key-3"
        )
    assert await ledger.wallet(creator.id) == (0, 69998 - 2001)
    await ledger.settle_payout(pid(creator, "1"), "failed")
    assert await ledger.wallet(creator.id) == (0, 69998)
    assert (await ledger.payouts(creator.id))[0]["status"] == "failed"
    # The daily cap is on net cents: 100,000 net needs 200,000 gross at 50 %.
    cap_settings = Settings(
        secret=SECRET, payment_secret=PAYMENT_SECRET, payout_daily_cap_cents=20_000
    )
    capped = Ledger(ledger.redis, cap_settings, ledger.catalog)
    await capped.create_payout(
        creator, pid(creator, "4"), payout_split(30_000, 5000), "fp5", "key-4"
    )
    with pytest.raises(PayoutLimit):
        await capped.create_payout(
            creator, pid(creator, "5"), payout_split(12_000, 5000), "fp6", "key-5"
        )
    paid = await capped.settle_payout(pid(creator, "4"), "paid")
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
                await fast.create_payout(creator, pid(creator, f"live{n}"), split, "fp", f"k{n}")
            except InsufficientFunds:  # paid ones keep the diamonds; roses refill slowly
                await asyncio.sleep(0.01)
                continue
            await fast.settle_payout(pid(creator, f"live{n}"), "paid" if n % 4 == 0 else "failed")

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
    assert final.in_flight == 0  # every gift was answered: landed
    assert final.minted == final.coins + final.diamonds + final.held + final.in_flight


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
        if match.endswith("}:payout:*") and not self.ran:
            self.ran = True
            self.then()


# What happens in the window -> the payout (its id's suffix) reported missing, if any.
IN_THE_WINDOW = {
    "payout created": "",
    "payout created and failed": "",
    "payout created, hash deleted": "late",
    "listed payout's hash deleted": "b",
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
    await ledger.create_payout(creator, pid(creator, "a"), split, "fp", "ka")
    await ledger.create_payout(creator, pid(creator, "b"), split, "fp", "kb")
    await ledger.settle_payout(pid(creator, "a"), "failed")
    loop = asyncio.get_running_loop()

    async def meanwhile() -> None:
        if what.startswith("payout created"):
            await ledger.create_payout(creator, pid(creator, "late"), split, "fp", "klate")
        if what == "payout created and failed":
            await ledger.settle_payout(pid(creator, "late"), "failed")
        elif what == "payout created, hash deleted":
            await ledger.redis.delete(keys.payout(pid(creator, "late")))
        elif what == "listed payout's hash deleted":
            await ledger.redis.delete(keys.payout(pid(creator, "b")))

    def then() -> None:
        asyncio.run_coroutine_threadsafe(meanwhile(), loop).result(timeout=30)

    client = store.connect_sync(db_url_of(ledger))
    proxy: Any = PayoutsListed(client, then)
    report = await asyncio.to_thread(reconcile, proxy, None)
    client.close()
    assert proxy.ran
    missing = IN_THE_WINDOW[what]
    if missing:
        expect = f"ledger moves diamonds for payout {pid(creator, missing)}, which does not exist"
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
    part = keys.user_partition(fan.id)
    eid = await r.incr(keys.entry_seq(part)) * keys.PARTITIONS + part
    await r.xadd(
        keys.ledger(part),
        {
            "id": eid,
            "ts": 1,
            "kind": "bonus",
            "account": fan.id,
            "asset": "diamonds",
            "amount": -5,
            "balance": -5,
            "counterparty": "payouts",
            "ref": "po_bonus",
            "room": "",
            "xfer": "",
        },
    )
    await r.hincrby(keys.wallet(fan.id), "diamonds", -5)
    report = reconcile(client, progress=None)
    client.close()
    assert not report.ok
    assert f"ledger entry {eid}: unknown kind 'bonus'" in report.problems, report.problems
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
    creator, fan = apart()
    room, _ = await streams.start_stream(creator, "t")
    await buy(ledger, fan)
    await ledger.gift(fan, room, "g1", ledger.catalog.gift("galaxy"), 3, adult=True)
    split = payout_split(1000, SETTINGS.commission_bps)
    await ledger.create_payout(creator, pid(creator, "a"), split, "fp", "ka")
    await ledger.create_payout(creator, pid(creator, "b"), split, "fp", "kb")
    await ledger.settle_payout(pid(creator, "a"), "failed")
    client = store.connect_sync(db_url_of(ledger))
    assert reconcile(client, progress=None).ok
    r: Any = ledger.redis
    # The fan's ledger: purchase, debit. The creator's: credit, payout, payout, reversal.
    pf, pc, b = keys.user_partition(fan.id), keys.user_partition(creator.id), pid(creator, "b")
    debit_sid, debit = await ledger_entry(r, fan, "gift_debit", "g1")
    _, credit = await ledger_entry(r, creator, "gift_credit", "g1")
    expect = {
        "wallet": [f"account {creator.id}: diamonds"],
        "minted counter": [f"partition {pf}: minted counter"],
        "held counter": [f"partition {pc}: held counter"],
        "payout gross": [f"payout {b}: gross 1001 != net 500 + commission 500"],
        "payout status": [f"payout {b} is failed: expected 1 reversal"],
        "payout unknown status": [f"payout {b}: unknown status 'lost'"],
        "payout hash deleted": [f"ledger moves diamonds for payout {b}, which does not exist"],
        "payout entry deleted": [f"payout {b}: expected one payout entry"],
        "gift entry deleted": [
            f"gift_credit entry {credit[b'id'].decode()} names transfer "
            f"{debit[b'id'].decode()}, whose gift debit is not in the ledger",
            f"partition {pf}: ledger entry counter is 2 but the ledger ends at entry 1",
        ],
        "forged debit": [
            f"gift debit {3 * keys.PARTITIONS + pf} was neither landed nor voided "
            "and is not in the outbox: lost"
        ],
        "wallet before a later entry": [
            f"account {fan.id}: entry {3 * keys.PARTITIONS + pf} says coins balance"
        ],
    }[how]
    if how == "wallet":
        await r.hincrby(keys.wallet(creator.id), "diamonds", -1)
    elif how == "minted counter":
        await r.incrby(keys.minted(pf), 7)
    elif how == "held counter":
        await r.incrby(keys.held(pc), 1)
    elif how == "payout gross":
        await r.hset(keys.payout(pid(creator, "b")), "gross", 1001)
    elif how == "payout status":
        await r.hset(keys.payout(pid(creator, "b")), "status", "failed")
    elif how == "payout unknown status":
        await r.hset(keys.payout(pid(creator, "b")), "status", "lost")
    elif how == "payout hash deleted":
        await r.delete(keys.payout(pid(creator, "b")))
    elif how == "payout entry deleted":
        sid, _ = await ledger_entry(r, creator, "payout", b)
        await r.xdel(keys.ledger(pc), sid)
    elif how == "gift entry deleted":
        await r.xdel(keys.ledger(pf), debit_sid)
    elif how == "forged debit":  # a copy of the debit, balanced, in its own name: no credit
        eid = await r.incr(keys.entry_seq(pf)) * keys.PARTITIONS + pf
        left = await r.hincrby(keys.wallet(fan.id), "coins", -3000)
        fields = {k.decode(): v for k, v in debit.items()}
        await r.xadd(keys.ledger(pf), {**fields, "id": eid, "xfer": eid, "balance": left})
    elif how == "wallet before a later entry":
        await r.hincrby(keys.wallet(fan.id), "coins", 5)
        await ledger.gift(fan, room, "g2", ledger.catalog.gift("rose"), 1, adult=True)
    report = reconcile(client, progress=None)
    client.close()
    assert not report.ok
    for text in expect:
        assert any(text in p for p in report.problems), (text, report.problems)
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
