"""The chaos run's checker (loadtest/chaos/checker.py): check() on small hand-made
histories and ledgers, each failure it must name; the history file round trip; and one
snapshot() of a real store (this module's own database on the session's Redis) written
by the real money scripts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from livegift import auth, keys
from livegift.auth import User
from livegift.catalog import default_catalog
from livegift.config import Settings
from livegift.ledger import Ledger
from livegift.reconcile import Report
from livegift.streams import Streams
from loadtest.chaos.checker import EXAMPLES, Books, Snapshot, Verdict, check, snapshot
from loadtest.chaos.history import Member, Op, read_history, write_history
from tests.conftest import PAYMENT_SECRET, SECRET, uid

DB = 14  # this module's own database: snapshot() and reconcile read all of it
SETTINGS = Settings(secret=SECRET, payment_secret=PAYMENT_SECRET, gift_rate=1000, gift_burst=1000)
ROOM = "r1"


# -- building histories and ledgers by hand -----------------------------------------------


class Store:
    """A ledger written by hand as the money scripts would, and the wallets it implies."""

    def __init__(self) -> None:
        self.books = Books()
        self.n = 0
        self.room_seq = 0
        self.extra: dict[str, tuple[int, int]] = {}  # wallet overrides

    def entry(self, kind: str, account: str, asset: str, amount: int, ref: str, **kw: str) -> str:
        self.n += 1
        eid = str(self.n)
        xfer = kw.pop("xfer", "")
        self.books.add(kind, account, asset, amount, ref, xfer=eid if xfer == "self" else xfer,
                       entry_id=eid, **kw)  # fmt: skip
        return eid

    def purchase(self, user: str, txn: str, coins: int) -> None:
        self.entry("purchase", user, "coins", coins, txn, counterparty="store")

    def gift(self, viewer: str, creator: str, req: str, coins: int, how: str = "land") -> None:
        """how: land | void | debit (left between its steps)."""
        x = self.entry("gift_debit", viewer, "coins", -coins, req, counterparty=creator,
                       room=ROOM, xfer="self")  # fmt: skip
        if how == "land":
            self.entry("gift_credit", creator, "diamonds", coins, req, counterparty=viewer,
                       room=ROOM, xfer=x)  # fmt: skip
            self.room_seq += 1
        elif how == "void":
            self.entry("gift_refund", viewer, "coins", coins, req, counterparty=creator,
                       room=ROOM, xfer=x)  # fmt: skip

    def payout(self, creator: str, pid: str, diamonds: int) -> None:
        self.entry("payout", creator, "diamonds", -diamonds, pid, counterparty="payouts")

    def reversal(self, creator: str, pid: str, diamonds: int) -> None:
        self.entry("payout_reversal", creator, "diamonds", diamonds, pid, counterparty="payouts")

    def snapshot(self, **kw: Any) -> Snapshot:
        users = {u for u in self.books.sums} | set(self.extra)
        wallets = {u: self.extra.get(u, self.books.balance(u)) for u in users}
        return Snapshot(
            books=self.books,
            wallets=wallets,
            rooms=kw.pop("rooms", {ROOM: self.room_seq}),
            payouts=kw.pop("payouts", {}),
            payout_ids=kw.pop("payout_ids", {}),
            report=kw.pop("report", Report()),
        )


def gift_op(
    oid: str, req: str, coins: int = 10, outcome: str = "ok", seq: int = 1, code: str = ""
) -> Op:
    args = {"room": ROOM, "creator": "c", "gift": "rose", "count": 1, "coins": coins}
    result = {"seq": seq, "balance": 0} if outcome == "ok" else {}
    return Op(oid, "gift", "v", req, args, 1, outcome, code, result)


def purchase_op(oid: str, txn: str, coins: int = 100, outcome: str = "ok", code: str = "") -> Op:
    result = {"transaction_id": f"t{txn}", "coins": coins} if outcome == "ok" else {}
    return Op(oid, "purchase", "v", txn, {"package": "p", "coins": coins}, 1, outcome, code,
              result)  # fmt: skip


def funded() -> tuple[Store, list[Op]]:
    """A viewer v who bought 100 coins and sent creator c one 10-coin gift, all acked."""
    store = Store()
    store.purchase("v", "T1", 100)
    store.gift("v", "c", "g1", 10)
    return store, [purchase_op("p1", "T1"), gift_op("o1", "g1")]


def assert_fails(verdict: Verdict, **counts: int) -> None:
    assert not verdict.ok, verdict.problems
    for name, want in counts.items():
        assert getattr(verdict, name) == want, (name, verdict)


# -- ops against the ledger ---------------------------------------------------------------


def test_acked_ops_present_once_are_ok() -> None:
    store, ops = funded()
    verdict = check(ops, [], store.snapshot())
    assert verdict.ok, verdict.problems
    assert (verdict.ops, verdict.acked, verdict.lost, verdict.duplicated) == (2, 2, 0, 0)
    assert verdict.line(faults=3) == (
        "chaos: ops=2 faults=3 acked=2 lost=0 duplicated=0 gaps=0 reconcile=ok unknown=0"
    )


def test_an_acked_gift_missing_from_the_ledger_is_lost() -> None:
    store, ops = funded()
    verdict = check([*ops, gift_op("o2", "g2", seq=2)], [], store.snapshot())
    assert_fails(verdict, lost=1, duplicated=0)
    assert any("o2" in p and "lost" in p for p in verdict.problems)
    assert "lost=1" in verdict.line(faults=0)


def test_an_acked_gift_that_was_refunded_instead_is_lost() -> None:
    store = Store()
    store.purchase("v", "T1", 100)
    store.gift("v", "c", "g1", 10, how="void")
    assert_fails(check([purchase_op("p1", "T1"), gift_op("o1", "g1")], [], store.snapshot()),
                 lost=1)  # fmt: skip


def test_a_purchase_credited_twice_is_duplicated() -> None:
    store, ops = funded()
    store.purchase("v", "T1", 100)
    verdict = check(ops, [], store.snapshot())
    assert_fails(verdict, duplicated=1, lost=0)
    # The wallet agrees with its entries (200 - 10) but not with what the ops imply.
    assert verdict.wallets == 1


def test_a_purchase_sent_twice_with_one_receipt_is_one_credit() -> None:
    store, ops = funded()
    verdict = check([*ops, purchase_op("p2", "T1")], [], store.snapshot())
    assert verdict.ok, verdict.problems


def test_a_gift_credited_twice_is_duplicated() -> None:
    store, ops = funded()
    x = store.books.gifts[("v", "g1")].debit_xfer
    store.entry("gift_credit", "c", "diamonds", 10, "g1", counterparty="v", room=ROOM, xfer=x)
    assert_fails(check(ops, [], store.snapshot()), duplicated=1)


def test_unknown_ops_absent_or_present_once_are_ok_and_named() -> None:
    store, ops = funded()
    store.gift("v", "c", "g2", 10)  # an unknown gift that took effect
    store.purchase("v", "T2", 50)  # an unknown purchase that took effect
    unknown = [
        gift_op("u1", "g2", outcome="unknown"),
        gift_op("u2", "g3", outcome="unknown"),  # never reached the store
        purchase_op("u3", "T2", coins=50, outcome="unknown"),
    ]
    verdict = check(ops + unknown, [], store.snapshot())
    assert verdict.ok, verdict.problems
    assert (verdict.unknown, verdict.unknown_present) == (3, 2)
    assert verdict.unknown_ids == ["u1", "u2", "u3"]
    assert verdict.line(faults=0).endswith("reconcile=ok unknown=3")


def test_an_unknown_gift_present_twice_is_duplicated() -> None:
    store, ops = funded()
    store.gift("v", "c", "g2", 10)
    store.gift("v", "c", "g2", 10)
    store.room_seq = 1
    verdict = check([*ops, gift_op("u1", "g2", outcome="unknown")], [], store.snapshot())
    assert_fails(verdict, duplicated=1, unknown=1)


def test_a_refused_op_that_took_effect_is_a_problem() -> None:
    store, ops = funded()
    store.purchase("v", "T2", 50)
    verdict = check([*ops, purchase_op("r1", "T2", 50, "refused", "invalid_receipt")], [],
                    store.snapshot())  # fmt: skip
    assert_fails(verdict, phantom=1, lost=0, duplicated=0)
    assert "other=1" in verdict.line(faults=0)


def test_a_gift_refused_stream_not_live_may_be_debited_and_refunded_once() -> None:
    store, ops = funded()
    store.gift("v", "c", "g2", 10, how="void")
    refused = gift_op("r1", "g2", outcome="refused", code="stream_not_live")
    assert check([*ops, refused], [], store.snapshot()).ok
    # Any other refusal says nothing happened, so a debit and refund contradicts it.
    other = gift_op("r1", "g2", outcome="refused", code="insufficient_funds")
    assert_fails(check([*ops, other], [], store.snapshot()), phantom=1)


def test_a_gift_debited_and_never_finished_is_lost_even_if_refused() -> None:
    store, ops = funded()
    store.gift("v", "c", "g2", 10, how="debit")
    refused = gift_op("r1", "g2", outcome="refused", code="stream_not_live")
    assert_fails(check([*ops, refused], [], store.snapshot()), lost=1)


def test_ledger_entries_no_op_asked_for_are_a_problem() -> None:
    store, ops = funded()
    store.purchase("v", "T9", 5)
    verdict = check(ops, [], store.snapshot())
    assert_fails(verdict, phantom=1)
    assert verdict.wallets == 1  # the wallet has 5 coins the ops do not account for


def test_a_wallet_that_disagrees_with_its_ledger_is_a_problem() -> None:
    store, ops = funded()
    store.extra["v"] = (91, 0)  # the ledger says 90
    verdict = check(ops, [], store.snapshot())
    assert_fails(verdict, wallets=1, lost=0, duplicated=0)
    assert any("v holds (91, 0)" in p for p in verdict.problems)


def test_an_amount_that_differs_from_the_op_is_a_mismatch() -> None:
    store, ops = funded()
    verdict = check([ops[0], gift_op("o1", "g1", coins=12)], [], store.snapshot())
    assert verdict.mismatched == 1 and not verdict.ok


def test_two_acked_gifts_with_one_seq_are_a_mismatch() -> None:
    store, ops = funded()
    store.gift("v", "c", "g2", 10)
    verdict = check([*ops, gift_op("o2", "g2", seq=1)], [], store.snapshot())
    assert_fails(verdict, mismatched=1)


def test_payouts_and_settles() -> None:
    store, ops = funded()
    store.payout("c", "po_1", 10)
    store.reversal("c", "po_1", 10)
    store.payout("c", "po_2", 10)
    pay = [
        Op("o5", "payout", "c", "k1", {"diamonds": 10}, 1, "ok", "", {"payout": "po_1",
                                                                      "gross": 10}),
        Op("o6", "settle", "c", "po_1", {"payout": "po_1", "outcome": "failed"}, 1, "ok"),
        # never answered, but its idempotency record names the payout it made
        Op("o7", "payout", "c", "k2", {"diamonds": 10}, 1, "unknown"),
        # never answered and never made (no record)
        Op("o8", "payout", "c", "k3", {"diamonds": 10}, 1, "unknown"),
    ]  # fmt: skip
    payouts = {"po_1": {"status": "failed", "user": "c", "gross": "10"},
               "po_2": {"status": "pending", "user": "c", "gross": "10"}}  # fmt: skip
    snap = store.snapshot(payouts=payouts, payout_ids={("c", "k1"): "po_1", ("c", "k2"): "po_2"})
    verdict = check(ops + pay, [], snap)
    assert verdict.ok, verdict.problems
    assert (verdict.unknown, verdict.unknown_present) == (2, 1)

    # Without the idempotency records, the unknown payout is matched by amount.
    snap.payout_ids = {}
    assert check(ops + pay, [], snap).ok

    # A settle acked failed whose reversal is missing lost the creator's diamonds.
    store2, ops2 = funded()
    store2.payout("c", "po_1", 10)
    snap2 = store2.snapshot(payouts={"po_1": {"status": "failed", "user": "c", "gross": "10"}})
    assert_fails(check(ops2 + pay[:2], [], snap2), lost=1)

    # Reversed twice: duplicated.
    store.reversal("c", "po_1", 10)
    assert_fails(check(ops + pay, [], store.snapshot(payouts=payouts)), duplicated=1)


def test_reconcile_failure_or_coins_in_flight_fail_the_run() -> None:
    store, ops = funded()
    report = Report(problems=["invariant fails"])
    verdict = check(ops, [], store.snapshot(report=report))
    assert not verdict.ok and not verdict.reconcile_ok
    assert "reconcile=FAIL" in verdict.line(faults=1)
    assert not check(ops, [], store.snapshot(report=Report(in_flight=10))).ok


def test_problems_list_a_few_examples_and_exact_counts() -> None:
    store, ops = funded()
    missing = [gift_op(f"m{i}", f"x{i}", seq=100 + i) for i in range(25)]
    verdict = check(ops + missing, [], store.snapshot(rooms={ROOM: 200}))
    assert verdict.lost == 25
    lost = [p for p in verdict.problems if p.startswith("lost:")]
    assert len(lost) == EXAMPLES + 1 and lost[-1] == "lost: ... and 15 more"


# -- events ------------------------------------------------------------------------------


def member(seen: list[int], first: int = 1, incomplete: list[tuple[int, int]] | None = None
           ) -> Member:  # fmt: skip
    return Member("v", ROOM, first, seen, incomplete or [], 0)


def events(*members: Member, last: int = 5) -> Verdict:
    store, ops = funded()
    return check(ops, list(members), store.snapshot(rooms={ROOM: last}))


def test_every_event_once_in_order_is_ok() -> None:
    assert events(member([1, 2, 3, 4, 5]), member([3, 4, 5], first=3), member([], first=6)).ok


def test_a_missing_event_is_a_gap() -> None:
    verdict = events(member([1, 2, 5]))
    assert_fails(verdict, gaps=2)
    assert any("never got seqs 3-4" in p for p in verdict.problems)
    assert "gaps=2" in verdict.line(faults=0)


def test_a_missing_last_event_is_a_gap() -> None:
    assert_fails(events(member([1, 2, 3, 4])), gaps=1)


def test_an_event_seen_twice_is_a_duplicate() -> None:
    verdict = events(member([1, 2, 3, 3, 4, 5, 5]))
    assert_fails(verdict, duplicates_events=2, gaps=0)


def test_events_out_of_order_or_beyond_the_room_are_disordered() -> None:
    assert_fails(events(member([1, 3, 2, 4, 5])), disordered_events=1, gaps=0)
    assert_fails(events(member([1, 2, 3, 4, 5, 6])), disordered_events=1)


def test_ranges_a_resume_said_were_incomplete_are_excused() -> None:
    assert events(member([1, 4, 5], incomplete=[(2, 3)])).ok
    assert events(member([1, 2, 4, 5], incomplete=[(2, 3)])).ok  # part of it came
    assert events(member([1, 5], incomplete=[(2, 3), (3, 4)])).ok  # overlapping ranges
    assert_fails(events(member([1, 5], incomplete=[(2, 3)])), gaps=1)


def test_gap_counts_are_exact_beyond_the_examples() -> None:
    members = [Member(f"m{i}", ROOM, 1, [1], [], 0) for i in range(30)]
    verdict = events(*members, last=3)
    assert verdict.gaps == 60
    assert len([p for p in verdict.problems if p.startswith("gaps:")]) == EXAMPLES + 1


# -- the history file ---------------------------------------------------------------------


def test_history_round_trip(tmp_path: Path) -> None:
    ops = [gift_op("o1", "g1"), Op("o2", "purchase", "v", "T1", {"coins": 1})]
    members = [member([1, 2], incomplete=[(3, 9)])]
    path = tmp_path / "history.jsonl"
    write_history(path, ops, members)
    got_ops, got_members = read_history(path)
    assert got_ops == ops and got_members == members
    assert isinstance(got_members[0].incomplete[0], tuple)


def test_a_bad_history_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_bytes(b'{"t": "op", "id": "o1"}\n')
    with pytest.raises(ValueError, match=r"history.jsonl:1: bad history record"):
        read_history(path)


# -- snapshot() of a real store -------------------------------------------------------------


@pytest.fixture
async def ledger(redis_url: str) -> AsyncIterator[Ledger]:
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    client = Redis.from_url(url)
    await client.flushdb()
    ledger = Ledger(client, SETTINGS, default_catalog())
    ledger.url = url  # type: ignore[attr-defined]
    yield ledger
    await ledger.aclose()
    await client.flushdb()
    await client.aclose()


async def test_snapshot_of_a_real_store_checks_out(ledger: Ledger) -> None:
    creator, fan = User(uid("c"), "C"), User(uid("f"), "F", auth.parse_birthdate("1990-01-01"))
    room, _ = await Streams(ledger.redis, SETTINGS, ledger.scripts).start_stream(creator, "t")
    start = int(await ledger.redis.hget(keys.room(room), "seq") or 0)
    signed = auth.mint_receipt(PAYMENT_SECRET, ledger.catalog, fan.id, "p330", sandbox=False)
    receipt = auth.verify_receipt(PAYMENT_SECRET, ledger.catalog, signed, fan)
    bought = await ledger.recharge(receipt)
    donut = ledger.catalog.gift("donut")
    sent = await ledger.gift(fan, room, "req1", donut, 2, adult=True)
    await ledger.aclose()

    args = {"room": room, "creator": creator.id, "gift": "donut", "count": 2,
            "coins": donut.coins * 2}  # fmt: skip
    ops = [
        Op("p1", "purchase", fan.id, receipt.txn, {"package": "p330", "coins": receipt.coins},
           1, "ok", "", {"transaction_id": bought.transaction["id"], "coins": receipt.coins}),
        Op("g1", "gift", fan.id, "req1", args, 1, "ok", "",
           {"seq": sent.seq, "balance": sent.balance}),
    ]  # fmt: skip
    members = [Member(fan.id, room, start + 1, [sent.seq], [], 0)]
    url: str = ledger.url  # type: ignore[attr-defined]
    snap = await asyncio.to_thread(snapshot, url, [fan.id, creator.id], [room], ops)
    assert snap.books.entries == 3
    assert snap.wallets[fan.id] == (receipt.coins - 2 * donut.coins, 0)
    assert snap.wallets[creator.id] == (0, 2 * donut.coins)
    assert snap.rooms[room] == sent.seq
    verdict = check(ops, members, snap)
    assert verdict.ok, verdict.problems
    assert verdict.line(faults=0).startswith("chaos: ops=2 faults=0 acked=2 lost=0")

    # An acked gift that never happened is lost.
    ghost = Op("g2", "gift", fan.id, "req2", args, 1, "ok", "", {"seq": sent.seq + 1})
    verdict = check([*ops, ghost], members, snap)
    assert_fails(verdict, lost=1, duplicated=0)
