"""Gifts as two-step transfers between partitions (livegift.ledger, lua/gift_*.lua):
a transfer left between its steps is finished by the sweeper, once; a transfer to a room
that is no longer live is voided and the coins come back, once; a write no replica
confirms is answered unavailable and a retry with the same req gives its true outcome."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from livegift import auth, keys
from livegift.auth import User
from livegift.catalog import default_catalog
from livegift.config import Settings
from livegift.errors import StreamNotLive, Unavailable
from livegift.ledger import Ledger, Transfer
from livegift.reconcile import reconcile
from livegift.store import connect_sync
from tests.conftest import PAYMENT_SECRET, SECRET, uid

SETTINGS = Settings(secret=SECRET, payment_secret=PAYMENT_SECRET, gift_rate=1000, gift_burst=1000)
DB = 11


@pytest.fixture
async def ledger(redis_url: str) -> AsyncIterator[Ledger]:
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    client = Redis.from_url(url)
    await client.flushdb()
    ledger = Ledger(client, SETTINGS, default_catalog())
    ledger.url = url  # type: ignore[attr-defined]
    yield ledger
    await ledger.aclose()
    await client.aclose()


async def setup(ledger: Ledger) -> tuple[User, User, str]:
    from livegift.streams import Streams

    creator, fan = User(uid("c"), "C"), User(uid("f"), "F", auth.parse_birthdate("1990-01-01"))
    room, _ = await Streams(ledger.redis, SETTINGS, ledger.scripts).start_stream(creator, "t")
    receipt = auth.mint_receipt(PAYMENT_SECRET, ledger.catalog, fan.id, "p330", sandbox=False)
    await ledger.recharge(auth.verify_receipt(PAYMENT_SECRET, ledger.catalog, receipt, fan))
    return creator, fan, room


async def send_only(ledger: Ledger, fan: User, room: str, creator: str, req: str) -> Transfer:
    """Step 1 alone: what a process that crashed right after it leaves behind."""
    t, _, _ = await ledger.send(fan, room, req, ledger.catalog.gift("donut"), 1, True, creator)
    return t


def books_ok(ledger: Any) -> Any:
    report = reconcile(connect_sync(ledger.url), progress=None)
    assert report.ok, report.render()
    return report


async def test_a_transfer_left_between_its_steps_is_swept_once(ledger: Ledger) -> None:
    creator, fan, room = await setup(ledger)
    t = await send_only(ledger, fan, room, creator.id, "r1")
    assert await ledger.wallet(fan.id) == (300, 0)
    assert await ledger.wallet(creator.id) == (0, 0)
    assert books_ok(ledger).in_flight == 30  # the coins are on their way
    assert await ledger.redis.hexists(keys.outbox(t.source), t.xfer)

    assert await ledger.sweep(older_than_ms=60_000) == 0  # too young: left alone
    assert await ledger.sweep(older_than_ms=0) == 1
    await ledger.aclose()  # landed transfers leave the outbox
    assert await ledger.wallet(creator.id) == (0, 30)
    assert not await ledger.redis.hexists(keys.outbox(t.source), t.xfer)
    assert await ledger.sweep(older_than_ms=0) == 0
    # The client's retry with the same req gets the outcome the sweeper made, uncharged.
    again = await ledger.gift(fan, room, "r1", ledger.catalog.gift("donut"), 1, adult=True)
    assert (again.balance, again.seq, again.replay) == (300, 1, True)
    assert await ledger.wallet(creator.id) == (0, 30)
    assert books_ok(ledger).in_flight == 0


async def test_a_transfer_to_an_ended_room_is_void_and_refunded_once(ledger: Ledger) -> None:
    from livegift.streams import Streams

    creator, fan, room = await setup(ledger)
    t = await send_only(ledger, fan, room, creator.id, "r1")
    await Streams(ledger.redis, SETTINGS, ledger.scripts).end_stream(creator, room)
    assert await ledger.sweep(older_than_ms=0) == 1
    assert await ledger.wallet(fan.id) == (330, 0)
    assert await ledger.wallet(creator.id) == (0, 0)
    # Again, by the sweeper or the client's retry: nothing more moves.
    assert await ledger.sweep(older_than_ms=0) == 0
    with pytest.raises(StreamNotLive):
        await ledger.finish(t)
    with pytest.raises(StreamNotLive):
        await ledger.gift(fan, room, "r1", ledger.catalog.gift("donut"), 1, adult=True)
    assert await ledger.wallet(fan.id) == (330, 0)
    rows, _ = await ledger.transactions(fan.id, 10, None)
    assert [(e["kind"], e["amount"], e["transfer"]) for e in rows[:2]] == [
        ("gift_refund", 30, int(t.xfer)),
        ("gift_debit", -30, int(t.xfer)),
    ]
    assert books_ok(ledger).in_flight == 0


async def test_no_replica_confirms_then_unavailable_and_the_retry_tells_the_truth(
    ledger: Ledger,
) -> None:
    creator, fan, room = await setup(ledger)
    # This server has no replica: asking for one makes every money write time out.
    strict = Ledger(ledger.redis, SETTINGS.with_(wait_timeout_ms=50), ledger.catalog, replicas=1)
    with pytest.raises(Unavailable, match="no replica"):
        await strict.gift(fan, room, "r1", ledger.catalog.gift("donut"), 1, adult=True)
    # The write did run (it was not confirmed): the retry with the same req replays it.
    again = await ledger.gift(fan, room, "r1", ledger.catalog.gift("donut"), 1, adult=True)
    assert (again.balance, again.replay) == (300, True)
    assert await ledger.wallet(creator.id) == (0, 30)
    await strict.aclose()
    books_ok(ledger)


async def test_a_gift_voided_on_its_way_gives_the_days_spending_back(ledger: Ledger) -> None:
    from livegift.clock import today
    from livegift.streams import Streams

    capped = Ledger(ledger.redis, SETTINGS.with_(daily_spend_cap=100), ledger.catalog)
    creator, fan, room = await setup(ledger)
    await Streams(ledger.redis, SETTINGS, ledger.scripts).end_stream(creator, room)
    with pytest.raises(StreamNotLive):  # debited, found the room ended, refunded
        await capped.gift(fan, room, "r1", ledger.catalog.gift("donut"), 1, adult=True)
    assert await ledger.wallet(fan.id) == (330, 0)
    assert int(await ledger.redis.get(keys.spend(fan.id, today())) or 0) == 0
    await capped.aclose()
    books_ok(ledger)
