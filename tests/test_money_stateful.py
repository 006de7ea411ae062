"""Random sequences of money operations against a real Redis, checked against a model.

Issue 4 item 6. A hypothesis ``RuleBasedStateMachine`` drives the real ``Ledger`` (the
real Lua scripts) on its own Redis database, flushed for every example: purchases,
receipt replays, gifts (single, retried with the same or other parameters, and several
at once with ``asyncio.gather``), payouts with and without idempotency keys, concurrent
payout retries, settlements and a stream ending. ``Model`` is an independent, in-memory
statement of the rules in PROTOCOL §2-4. After every step the wallets, counters, payouts
and every account's ledger entries must equal the model's; after every sequence
``reconcile()`` must pass and agree with the model's totals.

A gift is two atomic steps in two partitions (livegift/keys.py): the send step debits the
viewer, the land step credits the creator (or, the room being no longer live, gives the
coins back). Concurrent gifts are checked for linearisability of those steps: some
interleaving of them, each gift's send before its land, must give exactly the outcomes
(the balance from the send step; seq and combo from the land step) and every account's
ledger entries.

The state machine is synchronous, so each machine runs its own event loop with a
``redis.asyncio`` client created inside it.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import sys
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from math import floor
from types import SimpleNamespace
from typing import Any

import pytest
import redis as sync_redis
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from livegift import auth, keys, payouts
from livegift.auth import User
from livegift.catalog import default_catalog
from livegift.clock import today
from livegift.config import Settings
from livegift.errors import LiveGiftError
from livegift.ledger import Ledger
from livegift.reconcile import reconcile
from livegift.streams import Streams
from tests.conftest import PAYMENT_SECRET, SECRET

DB = 7
CATALOG = default_catalog()
# Each sequence redraws commission_bps, payout_daily_cap_cents and daily_spend_cap (see
# open_for_business) from values whose boundaries common amounts hit exactly: at 3,333 bps
# a 1,000-diamond payout nets 666, so a 1,332 cap takes exactly two.
SETTINGS = Settings(
    secret=SECRET,
    payment_secret=PAYMENT_SECRET,
    gift_rate=100_000,  # the token bucket is time-based; tests/test_ws.py covers it
    gift_burst=100_000,
    daily_spend_cap=5_000,
    combo_window_ms=3_600_000,  # streaks never time out within a sequence
    auto_shoutout_coins=1000,
    commission_bps=3_333,
    payout_min_diamonds=1000,
    payout_daily_cap_cents=1_332,
)

ADULTS = ("ann", "bob", "cat", "dan")
KID = "kid"
ROOMS = {"room-ann": "ann", "room-bob": "bob", "room-gone": None}
# The rooms' real ids: of their creator's partition (keys.new_room_id); none for no room.
ROOM_IDS = {room: keys.new_room_id(c, room) if c else room for room, c in ROOMS.items()}
PACKAGES = {"p65": 65, "p330": 330, "p1321": 1321, "p6607": 6607}  # coins, every region
GIFTS = {  # id: (coins, streakable), from PROTOCOL's example catalogue
    "rose": (1, True),
    "donut": (30, True),
    "hand_hearts": (100, False),
    "galaxy": (1000, False),
    "sports_car": (7000, False),
}

# Hypothesis leans towards the first choices: they are the ones that mostly succeed, and
# repeats weight them further, so that sequences build up coins, diamonds and payouts.
users = st.sampled_from(("ann", "bob", "ann", "bob", "cat", "dan"))
senders = st.sampled_from(("cat", "dan", "ann", "bob", "cat", "dan", KID))
rooms = st.sampled_from(("room-ann", "room-bob", "room-ann", "room-bob", "room-gone"))
gift_ids = st.sampled_from(
    ("galaxy", "rose", "donut", "hand_hearts", "galaxy", "rose", "sports_car")
)
counts = st.sampled_from((1, 2, 1, 3, 1, 7, 10, 99))
amounts = st.sampled_from((1000, 1500, 2999, 1001, 5000, 999, 0, 12_345))
packages = st.sampled_from(("p6607", "p1321", "p330", "p65"))

Outcome = tuple[Any, ...]
Entry = tuple[int, str, str, int, int, str, str]  # id, kind, asset, amount, after, cp, ref
Fingerprint = tuple[str, str, int]  # room, gift, count


def split(gross: int, bps: int) -> tuple[int, int]:
    """(net, commission), computed differently from livegift.money on purpose."""
    net = floor(Fraction(gross) * Fraction(10_000 - bps, 10_000))
    return net, gross - net


@dataclass
class Payout:
    user: str
    gross: int
    net: int
    commission: int
    status: str
    day: str


@dataclass(frozen=True)
class Xfer:
    """A gift its send step debited, as its req remembers it: what the land step needs,
    then what the land step did (``landed``: seq and combo; or ``voided``)."""

    sender: str
    creator: str
    room: str
    req: str
    gift: str
    count: int
    cost: int
    day: str
    balance: int  # the sender's coins right after the debit
    landed: tuple[int, int] | None = None
    voided: bool = False


@dataclass(frozen=True)
class Sent:
    """What a call's send step hands its land step: the transfer (named by the sender and
    the req) and the call's answer so far."""

    key: tuple[str, str]
    balance: int
    replay: bool


@dataclass
class Model:
    """The money rules, stated independently of the Lua scripts."""

    cfg: Settings = SETTINGS
    coins: dict[str, int] = field(default_factory=dict)
    diamonds: dict[str, int] = field(default_factory=dict)
    minted: int = 0
    held: int = 0
    n: dict[int, int] = field(default_factory=dict)  # ledger entries so far, per partition
    receipts: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    reqs: dict[tuple[str, str], tuple[Fingerprint, Xfer]] = field(default_factory=dict)
    seq: dict[str, int] = field(default_factory=dict)
    live: dict[str, bool] = field(default_factory=dict)
    streak: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)
    spend: dict[tuple[str, str], int] = field(default_factory=dict)
    payouts: dict[str, Payout] = field(default_factory=dict)
    payout_keys: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = field(
        default_factory=dict
    )
    paid_today: dict[tuple[str, str], int] = field(default_factory=dict)
    entries: dict[str, list[Entry]] = field(default_factory=dict)

    def fork(self) -> Model:
        """A copy to try a step on. Every dict is new; the values in them are immutable
        (tuples, frozen Xfers, settings), except the entry lists and payouts, copied too."""
        new = copy.copy(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                setattr(new, f.name, dict(value))
        new.entries = {account: list(rows) for account, rows in self.entries.items()}
        new.payouts = {pid: copy.copy(p) for pid, p in self.payouts.items()}
        return new

    def entry(self, account: str, kind: str, asset: str, amount: int, cp: str, ref: str) -> int:
        """Append an entry to the account's partition's ledger; its ledger-wide id."""
        part = keys.user_partition(account)
        self.n[part] = self.n.get(part, 0) + 1
        n = self.n[part] * keys.PARTITIONS + part
        after = (self.coins if asset == "coins" else self.diamonds)[account]
        self.entries.setdefault(account, []).append((n, kind, asset, amount, after, cp, ref))
        return n

    @property
    def entry_count(self) -> int:
        return sum(self.n.values())

    def purchase(self, user: str, txn: str, package: str, region: str) -> Outcome:
        if txn in self.receipts:
            owner, transaction = self.receipts[txn]
            if owner != user:
                return ("error", "invalid_receipt")
            return ("ok", transaction, self.coins[user], self.diamonds[user], True)
        price_list = CATALOG.price_list(region)
        coins = PACKAGES[package]
        self.coins[user] += coins
        self.minted += coins
        n = self.entry(user, "purchase", "coins", coins, "store", txn)
        transaction = {
            "id": f"t{n}",
            "txn": txn,
            "user": user,
            "coins": coins,
            "amount": price_list.package(package).price,
            "currency": price_list.currency,
            "package": package,
            "region": region,
        }
        self.receipts[txn] = (user, transaction)
        return ("ok", transaction, self.coins[user], self.diamonds[user], False)

    def gift(self, sender: str, room: str, req: str, gift: str, count: int, day: str) -> Outcome:
        """A whole gift: its send step, then at once its land step."""
        sent = self.gift_send(sender, room, req, gift, count, day)
        return self.gift_land(sent) if isinstance(sent, Sent) else sent

    def gift_send(
        self, sender: str, room: str, req: str, gift: str, count: int, day: str
    ) -> Sent | Outcome:
        """Step 1, in the sender's partition: every check, then the debit. A req seen before
        is a replay of its transfer (or a conflict); a refused gift changes nothing."""
        fingerprint = (room, gift, count)
        if (sender, req) in self.reqs:
            first, x = self.reqs[(sender, req)]
            if first != fingerprint:
                return ("error", "idempotency_conflict")
            return Sent((sender, req), x.balance, True)
        creator = ROOMS[room]
        if creator is None:  # no such room: refused before anything is debited
            return ("error", "stream_not_live")
        if sender == KID:
            return ("error", "not_adult")
        if creator == sender:
            return ("error", "self_gift")
        cost = GIFTS[gift][0] * count
        if self.coins[sender] < cost:
            return ("error", "insufficient_funds")
        cap, spent = self.cfg.daily_spend_cap, self.spend.get((sender, day), 0)
        if cap and spent + cost > cap:
            return ("error", "rate_limited")
        self.coins[sender] -= cost
        if cap:  # with no cap, nothing counts the day's spending
            self.spend[(sender, day)] = spent + cost
        self.entry(sender, "gift_debit", "coins", -cost, creator, req)
        x = Xfer(sender, creator, room, req, gift, count, cost, day, self.coins[sender])
        self.reqs[(sender, req)] = (fingerprint, x)
        return Sent((sender, req), x.balance, False)

    def gift_land(self, sent: Sent) -> Outcome:
        """Step 2: the transfer lands in the creator's partition or, the room being no
        longer live, is void and its coins go back to the sender. Once per transfer: the
        first call to get here does it, and every call that sent it answers the same."""
        fingerprint, x = self.reqs[sent.key]
        if x.landed is None and not x.voided:
            x = self._land(x) if self.live.get(x.room, False) else self._void(x)
            self.reqs[sent.key] = (fingerprint, x)
        if x.landed is None:
            return ("error", "stream_not_live")
        seq, combo = x.landed
        return ("ok", sent.balance, seq, combo, sent.replay)

    def _land(self, x: Xfer) -> Xfer:
        self.diamonds[x.creator] += x.cost
        self.entry(x.creator, "gift_credit", "diamonds", x.cost, x.sender, x.req)
        combo = x.count
        if GIFTS[x.gift][1]:  # streakable
            last = self.streak.get((x.room, x.sender))
            if last is not None and last[0] == x.gift:
                combo = last[1] + x.count
            self.streak[(x.room, x.sender)] = (x.gift, combo)
        else:
            self.streak.pop((x.room, x.sender), None)
        self.seq[x.room] += 1
        seq = self.seq[x.room]
        if x.cost >= self.cfg.auto_shoutout_coins:
            self.seq[x.room] += 1
        return replace(x, landed=(seq, combo))

    def _void(self, x: Xfer) -> Xfer:
        """The coins, and the day's spending, go back to the sender."""
        self.coins[x.sender] += x.cost
        if self.cfg.daily_spend_cap:
            self.spend[(x.sender, x.day)] -= x.cost
        self.entry(x.sender, "gift_refund", "coins", x.cost, x.creator, x.req)
        return replace(x, voided=True)

    def payout(self, user: str, body: dict[str, Any], key: str | None, day: str) -> Outcome:
        """("ok", expected payout or first response, replayed) or ("error", code)."""
        diamonds = body["diamonds"]
        if not 1 <= diamonds <= 10**15:
            return ("error", "bad_request")
        if key is not None and (user, key) in self.payout_keys:
            first_body, first_response = self.payout_keys[(user, key)]
            if first_body != body:
                return ("error", "idempotency_conflict")
            return ("ok", first_response, True)
        net, commission = split(diamonds, self.cfg.commission_bps)
        if diamonds < self.cfg.payout_min_diamonds:
            return ("error", "below_minimum")
        if self.diamonds[user] < diamonds:
            return ("error", "insufficient_funds")
        if self.paid_today.get((user, day), 0) + net > self.cfg.payout_daily_cap_cents:
            return ("error", "payout_limit")
        expected = {
            "diamonds": diamonds,
            "gross": diamonds,
            "commission": commission,
            "net": net,
            "currency": "USD",
            "status": "pending",
        }
        return ("ok", expected, False)

    def payout_made(
        self, user: str, body: dict[str, Any], key: str | None, response: dict[str, Any], day: str
    ) -> None:
        p = response["payout"]
        self.diamonds[user] -= p["gross"]
        self.held += p["gross"]
        self.paid_today[(user, day)] = self.paid_today.get((user, day), 0) + p["net"]
        self.payouts[p["id"]] = Payout(user, p["gross"], p["net"], p["commission"], "pending", day)
        if key is not None:
            self.payout_keys[(user, key)] = (body, response)
        self.entry(user, "payout", "diamonds", -p["gross"], "payouts", p["id"])

    def settle(self, pid: str, outcome: str) -> Outcome:
        p = self.payouts.get(pid)
        if p is None:
            return ("error", "not_found")
        if p.status == outcome:
            return ("ok", outcome)
        if p.status != "pending":
            return ("error", "bad_request")
        p.status = outcome
        if outcome == "failed":
            self.diamonds[p.user] += p.gross
            self.held -= p.gross
            self.paid_today[(p.user, p.day)] -= p.net
            self.entry(p.user, "payout_reversal", "diamonds", p.gross, "payouts", pid)
        return ("ok", outcome)


def label(kind: str, outcome: Outcome) -> None:
    """Count outcomes per operation (pytest --hypothesis-show-statistics shows them)."""
    what = outcome[1] if outcome[0] == "error" else ("replay" if outcome[-1] is True else "ok")
    event(f"{kind}: {what}")


def code_of(exc: BaseException) -> Outcome:
    if isinstance(exc, LiveGiftError):
        return ("error", exc.code)
    raise exc


Call = tuple[str, str, str, str, int, str]  # sender, room, req, gift, count, day
# Where a call is: None (to send), Sent (sent, to land) or its answer (done).
Todo = Sent | Outcome | None


def interleave(
    model: Model, calls: list[Call], got: list[Outcome], actual: dict[str, list[Entry]]
) -> tuple[Model, tuple[int, ...]] | None:
    """An interleaving of the calls' steps, each call's send before its land, that answers
    ``got`` and writes exactly the ``actual`` entries: the model after it, and the calls'
    indices in the order of their steps. None if there is none.

    A gift is two atomic steps in two partitions, so concurrent gifts may interleave in
    ways no serial order of whole gifts gives. Depth first, each step checked as it is
    taken (its answer so far, and its entries against the ledger at the same places), so
    a wrong order dies at its first wrong step; 4 calls make at most 8 steps."""

    def search(
        m: Model, todo: tuple[Todo, ...], steps: tuple[int, ...]
    ) -> tuple[Model, tuple[int, ...]] | None:
        if all(isinstance(t, tuple) for t in todo):
            return (m, steps) if entries_of(m) == actual else None
        for i, t in enumerate(todo):
            if isinstance(t, tuple):
                continue
            after = m.fork()
            if t is None:
                step = after.gift_send(*calls[i])
                fits = could_answer(step, got[i])
            else:
                step = after.gift_land(t)
                fits = step == got[i]
            if fits and wrote_actual(m, after, actual):
                found = search(after, (*todo[:i], step, *todo[i + 1 :]), (*steps, i))
                if found is not None:
                    return found
        return None

    return search(model, (None,) * len(calls), ())


def serial(steps: tuple[int, ...]) -> bool:
    """Whether each call's steps are next to each other (whole gifts, one after another)."""
    return len(list(itertools.groupby(steps))) == len(set(steps))


def could_answer(sent: Sent | Outcome, answer: Outcome) -> bool:
    """Whether a call whose send step gave ``sent`` can have answered ``answer``: a
    refusal is the answer; a debit (or replay) lands with its balance, or is void."""
    if not isinstance(sent, Sent):
        return sent == answer
    if answer == ("error", "stream_not_live"):
        return True
    return answer[0] == "ok" and (answer[1], answer[4]) == (sent.balance, sent.replay)


def wrote_actual(before: Model, after: Model, actual: dict[str, list[Entry]]) -> bool:
    """Whether the entries a step added are the actual ledger's at the same places."""
    for account, rows in after.entries.items():
        start = len(before.entries.get(account, ()))
        if rows[start:] != actual.get(account, [])[start : len(rows)]:
            return False
    return True


def entries_of(model: Model) -> dict[str, list[Entry]]:
    return {user: model.entries.get(user, []) for user in (*ADULTS, KID)}


class MoneyMachine(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis: Redis = self.run(self._connect())
        self.ledger = Ledger(self.redis, SETTINGS, CATALOG)
        self.streams = Streams(self.redis, SETTINGS)
        self.services: Any = SimpleNamespace(settings=SETTINGS, ledger=self.ledger)
        self.model = Model()
        for user in (*ADULTS, KID):
            self.model.coins[user] = self.model.diamonds[user] = 0
        for room, creator in ROOMS.items():
            if creator is not None:
                real = ROOM_IDS[room]
                self.run(self.streams.start_stream_as(User(creator, creator.title()), "t", real))
                self.model.seq[room], self.model.live[room] = 0, True
        self.counter = itertools.count(1)

    async def _connect(self) -> Redis:
        client = Redis.from_url(self.url)
        await client.flushdb()
        return client

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter)}"

    def user(self, user_id: str) -> User:
        birthdate = None if user_id == KID else auth.parse_birthdate("1990-01-01")
        return User(user_id, user_id.title(), birthdate)

    # -- purchases -----------------------------------------------------------------------

    @initialize(
        cfg=st.tuples(
            st.sampled_from((3_333, 5_000, 0, 10_000)),  # commission, bps
            st.sampled_from((1_332, 666, 1_000, 100_000)),  # daily net payout cap, cents
            st.sampled_from((5_000, 3_000, 0)),  # daily coin-spend cap (0 = off)
        ),
        bought=st.lists(
            st.lists(packages, min_size=1, max_size=3), min_size=len(ADULTS), max_size=len(ADULTS)
        ),
        tips=st.lists(
            st.tuples(
                st.sampled_from(("cat", "dan")),
                st.sampled_from(("room-ann", "room-bob")),
                st.integers(1, 3),
            ),
            max_size=3,
        ),
    )
    def open_for_business(
        self, cfg: tuple[int, int, int], bought: list[list[str]], tips: list[tuple[str, str, int]]
    ) -> None:
        """This sequence's rates and limits; everyone buys coins; fans may tip creators."""
        bps, payout_cap, spend_cap = cfg
        self.settings = SETTINGS.with_(
            commission_bps=bps, payout_daily_cap_cents=payout_cap, daily_spend_cap=spend_cap
        )
        self.ledger = Ledger(self.redis, self.settings, CATALOG)
        self.services = SimpleNamespace(settings=self.settings, ledger=self.ledger)
        self.model.cfg = self.settings
        for user, basket in zip(ADULTS, bought, strict=True):
            for package in basket:
                self.purchase(user, package, "US")
        for sender, room, count in tips:
            self.fan_gift(sender, room, "galaxy", count)

    async def _recharge(self, user: str, txn: str, package: str, region: str) -> Outcome:
        token = auth.mint_receipt(
            PAYMENT_SECRET, CATALOG, user, package, region=region, txn=txn, sandbox=False
        )
        try:
            receipt = auth.verify_receipt(PAYMENT_SECRET, CATALOG, token, self.user(user))
            r = await self.ledger.recharge(receipt)
        except LiveGiftError as exc:
            return code_of(exc)
        transaction = {k: v for k, v in r.transaction.items() if k != "ts"}
        return ("ok", transaction, r.coins, r.diamonds, r.replayed)

    @rule(user=users, package=packages, region=st.sampled_from(("US", "GB", "EU", "JP")))
    def purchase(self, user: str, package: str, region: str) -> None:
        txn = self.fresh("txn-")
        got = self.run(self._recharge(user, txn, package, region))
        label("purchase", got)
        assert got == self.model.purchase(user, txn, package, region)

    @precondition(lambda self: self.model.receipts)
    @rule(data=st.data(), package=packages)
    def replay_receipt(self, data: st.DataObject, package: str) -> None:
        txn = data.draw(st.sampled_from(sorted(self.model.receipts)), label="txn")
        owner, first = self.model.receipts[txn]
        user = data.draw(st.sampled_from((owner, owner, *ADULTS)), label="user")
        # The owner resends the very receipt; anyone else presents the txn as their own.
        package = first["package"] if user == owner else package
        region = first["region"] if user == owner else "US"
        got = self.run(self._recharge(user, txn, package, region))
        label("receipt replay", got)
        assert got == self.model.purchase(user, txn, package, region)

    # -- gifts ---------------------------------------------------------------------------

    async def _gift(self, sender: str, room: str, req: str, gift: str, count: int) -> Outcome:
        try:
            o = await self.ledger.gift(
                self.user(sender),
                ROOM_IDS[room],
                req,
                CATALOG.gift(gift),
                count,
                adult=sender != KID,
            )
        except LiveGiftError as exc:
            return code_of(exc)
        return ("ok", o.balance, o.seq, o.combo, o.replay)

    def _req_for(self, data: st.DataObject, sender: str, mode: str) -> tuple[str, Any]:
        """A request id: new, or one this sender already used (with its first params)."""
        used = sorted(r for (s, r) in self.model.reqs if s == sender)
        if mode == "new" or not used:
            return self.fresh("req-"), None
        req = data.draw(st.sampled_from(used), label="req")
        return req, self.model.reqs[(sender, req)][0]

    @rule(
        data=st.data(),
        sender=senders,
        room=rooms,
        gift=gift_ids,
        count=counts,
        mode=st.sampled_from(("new", "new", "retry_same", "retry_other")),
    )
    def gift(
        self, data: st.DataObject, sender: str, room: str, gift: str, count: int, mode: str
    ) -> None:
        req, first = self._req_for(data, sender, mode)
        if mode == "retry_same" and first is not None:
            room, gift, count = first
        day = today()
        got = self.run(self._gift(sender, room, req, gift, count))
        label(f"gift {mode}", got)
        assert got == self.model.gift(sender, room, req, gift, count, day)

    @rule(
        sender=st.sampled_from(("cat", "dan")),
        room=st.sampled_from(("room-ann", "room-bob")),
        gift=st.sampled_from(("galaxy", "hand_hearts", "donut")),
        count=st.integers(1, 3),
    )
    def fan_gift(self, sender: str, room: str, gift: str, count: int) -> None:
        """A fan's new gift to a creator: what builds up diamonds (and the spend cap)."""
        req, day = self.fresh("req-"), today()
        got = self.run(self._gift(sender, room, req, gift, count))
        label("fan gift", got)
        assert got == self.model.gift(sender, room, req, gift, count, day)

    @rule(
        ops=st.lists(
            st.tuples(senders, rooms, gift_ids, counts, st.integers(0, 2)), min_size=2, max_size=4
        )
    )
    def concurrent_gifts(self, ops: list[tuple[str, str, str, int, int]]) -> None:
        batch = self.fresh("b")
        # Requests numbered alike within a batch share an id: concurrent retries.
        calls = [(s, room, f"{batch}-{s}-{r}", g, c) for s, room, g, c, r in ops]
        day = today()

        async def together() -> list[Outcome]:
            return list(await asyncio.gather(*(self._gift(*call) for call in calls)))

        got = self.run(together())
        for outcome in got:
            label("concurrent gift", outcome)
        actual = self.run(self._all_entries())
        found = interleave(self.model, [(*call, day) for call in calls], got, actual)
        if found is None:
            raise AssertionError(f"no interleaving of the steps of {calls} gives {got}")
        self.model, steps = found
        event(f"concurrent gifts: {'serial' if serial(steps) else 'interleaved'} steps")

    @precondition(lambda self: self.model.live.get("room-bob") and self.model.entry_count > 40)
    @rule()
    def end_bobs_stream(self) -> None:
        seq = self.run(self.streams.end_stream(self.user("bob"), ROOM_IDS["room-bob"]))
        self.model.seq["room-bob"] += 1
        self.model.live["room-bob"] = False
        assert seq == self.model.seq["room-bob"]

    # -- payouts -------------------------------------------------------------------------

    async def _payout(self, user: str, body: dict[str, Any], key: str | None) -> Outcome:
        try:
            result = await payouts.create(self.services, self.user(user), body, key)
        except LiveGiftError as exc:
            return code_of(exc)
        assert result.status == 201
        return ("ok", result.body)

    def _check_payout(
        self, user: str, body: dict[str, Any], key: str | None, got: Outcome, day: str
    ) -> None:
        expected = self.model.payout(user, body, key, day)
        label("payout", got if got[0] == "error" else (*got, expected[-1]))
        if expected[0] == "error":
            assert got == expected
            return
        assert got[0] == "ok", got
        response = got[1]
        if expected[2]:  # a replay: the first response, byte for byte
            assert response == expected[1]
            return
        public = {k: v for k, v in response["payout"].items() if k not in ("id", "created")}
        assert public == expected[1]
        assert response["payout"]["id"] not in self.model.payouts
        self.model.payout_made(user, body, key, response, day)

    @rule(
        user=users,
        amount=amounts,
        share=st.sampled_from((2, 1, 3, None)),
        keyed=st.sampled_from((True, True, False)),
    )
    def payout(self, user: str, amount: int, share: int | None, keyed: bool) -> None:
        # Half, all or a third of the balance when that is worth cashing out.
        if share is not None and self.model.diamonds[user] // share >= 1000:
            amount = self.model.diamonds[user] // share
        key = self.fresh("key-") if keyed else None
        body = {"diamonds": amount}
        day = today()
        got = self.run(self._payout(user, body, key))
        self._check_payout(user, body, key, got, day)

    @precondition(lambda self: self.model.payout_keys)
    @rule(data=st.data(), same=st.booleans(), amount=amounts)
    def retry_payout(self, data: st.DataObject, same: bool, amount: int) -> None:
        """A client retries with a key it used: the same body, or by mistake another one."""
        user, key = data.draw(st.sampled_from(sorted(self.model.payout_keys)), label="key")
        body = self.model.payout_keys[(user, key)][0] if same else {"diamonds": amount}
        day = today()
        got = self.run(self._payout(user, body, key))
        self._check_payout(user, body, key, got, day)

    @rule(user=users, amount=amounts, n=st.integers(2, 5))
    def concurrent_payout_retries(self, user: str, amount: int, n: int) -> None:
        key, body, day = self.fresh("key-"), {"diamonds": amount}, today()

        async def together() -> list[Outcome]:
            return list(await asyncio.gather(*(self._payout(user, body, key) for _ in range(n))))

        got = self.run(together())
        assert all(g == got[0] for g in got), got
        self._check_payout(user, body, key, got[0], day)

    @precondition(lambda self: self.model.payouts)
    @rule(data=st.data(), outcome=st.sampled_from(("paid", "failed")))
    def settle(self, data: st.DataObject, outcome: str) -> None:
        pid = data.draw(st.sampled_from([*sorted(self.model.payouts), "po_missing"]), label="pid")

        async def call() -> Outcome:
            try:
                p = await self.ledger.settle_payout(pid, outcome)
            except LiveGiftError as exc:
                return code_of(exc)
            return ("ok", p["status"])

        got = self.run(call())
        label(f"settle {outcome}", got)
        assert got == self.model.settle(pid, outcome)

    # -- after every step ----------------------------------------------------------------

    async def _all_entries(self) -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = {}
        for user in (*ADULTS, KID):
            rows, cursor = await self.ledger.transactions(user, 200, None)
            assert cursor is None or len(rows) == 200
            while cursor is not None:
                more, cursor = await self.ledger.transactions(user, 200, cursor)
                rows += more
            out[user] = [
                (
                    e["id"],
                    e["kind"],
                    e["asset"],
                    e["amount"],
                    e["balance"],
                    e["counterparty"],
                    e["reference"],
                )
                for e in reversed(rows)
            ]
        return out

    async def _state(self, day: str) -> dict[str, Any]:
        wallets = {u: await self.ledger.wallet(u) for u in (*ADULTS, KID)}
        parts = sorted({keys.user_partition(u) for u in (*ADULTS, KID)})
        minted = await self.redis.mget([keys.minted(p) for p in parts])
        held = await self.redis.mget([keys.held(p) for p in parts])
        seqs = await self.redis.mget([keys.entry_seq(p) for p in parts])
        counters: list[Any] = [
            sum(int(c or 0) for c in minted),
            sum(int(c or 0) for c in held),
            {p: int(n) for p, n in zip(parts, seqs, strict=True) if n},  # entries per partition
        ]
        daily = await self.redis.mget(
            [keys.spend(u, day) for u in ADULTS] + [keys.payout_cap(u, day) for u in ADULTS]
        )
        listed = {u: await self.ledger.payouts(u) for u in ADULTS}
        return {
            "wallets": wallets,
            "counters": counters,
            "daily": [int(c or 0) for c in daily],
            "payouts": {
                p["id"]: (u, p["gross"], p["net"], p["commission"], p["status"])
                for u, rows in listed.items()
                for p in rows
            },
            "entries": await self._all_entries(),
        }

    @invariant()
    def matches_the_model(self) -> None:
        m, day = self.model, today()
        state = self.run(self._state(day))
        assert state["wallets"] == {u: (m.coins[u], m.diamonds[u]) for u in (*ADULTS, KID)}
        assert state["counters"] == [m.minted, m.held, m.n]  # n: entries per partition
        assert state["daily"] == [m.spend.get((u, day), 0) for u in ADULTS] + [
            m.paid_today.get((u, day), 0) for u in ADULTS
        ]
        assert state["payouts"] == {
            pid: (p.user, p.gross, p.net, p.commission, p.status) for pid, p in m.payouts.items()
        }
        assert state["entries"] == entries_of(m)
        assert m.minted == sum(m.coins.values()) + sum(m.diamonds.values()) + m.held

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is not None:
                return  # a step already failed: report that, not its aftermath
            self.run(self.ledger.aclose())  # landed transfers leave their outboxes
            client = sync_redis.Redis.from_url(self.url)
            try:
                report = reconcile(client, progress=None)
            finally:
                client.close()
            assert report.ok, report.render()
            m = self.model
            assert (report.minted, report.held, report.entries) == (m.minted, m.held, m.entry_count)
            assert (report.coins, report.diamonds) == (
                sum(m.coins.values()),
                sum(m.diamonds.values()),
            )
        finally:
            self.run(self.ledger.aclose())
            self.run(self.redis.aclose())
            self.loop.close()


@pytest.mark.slow
def test_money_rules_hold_over_random_sequences(redis_url: str) -> None:
    MoneyMachine.url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    run_state_machine_as_test(
        MoneyMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            database=None,  # no .hypothesis/ folder in the working tree
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_interleave_explains_crossed_gifts_and_nothing_impossible() -> None:
    """Ann and Bob gift each other at once: both sends, then both lands. No serial order
    of whole gifts writes those ledgers, an interleaving of their steps does; ledgers no
    interleaving writes (each credit before its account's own debit), or other answers,
    are refused."""
    start = Model()
    for user in (*ADULTS, KID):
        start.coins[user], start.diamonds[user] = 2000, 0
    start.seq = {"room-ann": 0, "room-bob": 0}
    start.live = {"room-ann": True, "room-bob": True}
    calls = [("ann", "room-bob", "a", "galaxy", 1, "d"), ("bob", "room-ann", "b", "galaxy", 1, "d")]
    crossed = start.fork()
    sent = [crossed.gift_send(*call) for call in calls]
    got = [crossed.gift_land(s) for s in sent if isinstance(s, Sent)]
    actual = entries_of(crossed)
    assert got == [("ok", 1000, 1, 1, False)] * 2 and len(actual["ann"]) == 2
    for order in (calls, calls[::-1]):
        whole = start.fork()
        for call in order:
            whole.gift(*call)
        assert entries_of(whole) != actual
    found = interleave(start, calls, got, actual)
    assert found is not None and entries_of(found[0]) == actual
    assert found[1] == (0, 1, 0, 1) and not serial(found[1])
    assert start.entry_count == 0  # the search leaves its starting model alone
    swapped = {
        u: [(rows[0][0], *rows[1][1:]), (rows[1][0], *rows[0][1:])] if rows else rows
        for u, rows in actual.items()
    }
    assert interleave(start, calls, got, swapped) is None
    assert interleave(start, calls, [got[0], ("ok", 1000, 2, 1, False)], actual) is None
