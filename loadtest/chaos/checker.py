"""The chaos run's checker: prove from the history and the data store that nothing
acknowledged was lost or doubled, nothing refused was applied, and no viewer missed or
saw twice a durable room event.

Two halves, so the proof itself is testable without a data store:

- :func:`snapshot` (I/O) reads the store once the run is over: every partition's ledger
  (in pages, folded into :class:`Books` as it is read, so memory grows with the ops, not
  with the entries), the listed wallets and rooms, the payouts, and a full
  :func:`livegift.reconcile.reconcile` report. One Redis or a Redis Cluster alike.
- :func:`check` (pure) compares the history with that snapshot and returns a
  :class:`Verdict`: exact counts, and at most ``EXAMPLES`` examples of each kind of
  problem, so a run that goes badly wrong still prints a readable report.

How an op is found in the ledger (docs/money.md, lua/*.lua): a gift by (viewer, req) —
its debit and refund are the viewer's entries with ref = req, its credit is the creator's
with counterparty = the viewer and ref = req, all three naming the debit's id as xfer; a
purchase by (buyer, store txn); a payout by its payout id (the ack names it; for an op
never answered, the payout's idempotency record ``pidem`` does); a failed settle by the
payout_reversal whose ref is the payout id.
"""

from __future__ import annotations

import contextlib
import gc
import time
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from livegift import keys
from livegift.reconcile import Report, reconcile
from livegift.store import connect_sync
from loadtest.chaos.history import Member, Op

EXAMPLES = 10  # examples listed per kind of problem; the counts are always exact
PAGE = 10_000  # ledger entries per XRANGE, at most
BUFFERED = 50_000  # entries fetched per round across the partitions still being read
MIN_PAGE = 256
PIPELINE = 5_000  # commands per round trip for wallets, rooms, payouts

# -- the ledger, folded ------------------------------------------------------------------


@dataclass(slots=True)
class GiftFacts:
    """Every ledger entry of one gift (viewer, req): counts, and the last of each kind.

    Counts above one are duplicates; the last entry's fields are enough to tell a
    mismatch, since a single entry is the only correct case."""

    debits: int = 0
    credits: int = 0
    refunds: int = 0
    debit_amount: int = 0
    credit_amount: int = 0
    refund_amount: int = 0
    debit_id: str = ""  # the debit's own entry id: the transfer id
    debit_xfer: str = ""
    credit_xfer: str = ""
    refund_xfer: str = ""
    creator: str = ""  # the debit's counterparty
    credited: str = ""  # the credit's account
    room: str = ""  # the debit's room

    @property
    def landed(self) -> bool:
        return self.debits == 1 and self.credits == 1 and self.refunds == 0

    @property
    def voided(self) -> bool:
        return self.debits == 1 and self.refunds == 1 and self.credits == 0

    @property
    def absent(self) -> bool:
        return self.debits == 0 and self.credits == 0 and self.refunds == 0

    @property
    def doubled(self) -> bool:
        return (
            self.debits > 1
            or self.credits > 1
            or self.refunds > 1
            or (self.credits > 0 and self.refunds > 0)
        )


@dataclass(slots=True)
class Books:
    """The ledgers, indexed by what the checker looks an op up by.

    Fed one entry at a time (:meth:`add`), by :func:`snapshot` from the store or by a
    test by hand; keeps no entry itself."""

    gifts: dict[tuple[str, str], GiftFacts] = field(default_factory=dict)  # (viewer, req)
    purchases: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (user, txn)
    payouts: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # id: account, amt
    reversals: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    sums: dict[str, list[int]] = field(default_factory=dict)  # account -> [coins, diamonds]
    entries: int = 0
    strange: list[str] = field(default_factory=list)  # entries of no known kind or asset

    def add(
        self,
        kind: str,
        account: str,
        asset: str,
        amount: int,
        ref: str,
        counterparty: str = "",
        room: str = "",
        xfer: str = "",
        entry_id: str = "",
    ) -> None:
        """Fold one ledger entry in (fields as stored; ``entry_id`` is its ``id``)."""
        self.entries += 1
        sums = self.sums.get(account)
        if sums is None:
            sums = self.sums[account] = [0, 0]
        if asset == "coins":
            sums[0] += amount
        elif asset == "diamonds":
            sums[1] += amount
        else:
            self.strange.append(f"entry {entry_id} of {account} moves unknown asset {asset!r}")
        if kind == "gift_debit" or kind == "gift_refund":
            facts = self._gift(account, ref)
            if kind == "gift_debit":
                facts.debits += 1
                facts.debit_amount, facts.debit_xfer, facts.debit_id = amount, xfer, entry_id
                facts.creator, facts.room = counterparty, room
            else:
                facts.refunds += 1
                facts.refund_amount, facts.refund_xfer = amount, xfer
        elif kind == "gift_credit":
            facts = self._gift(counterparty, ref)
            facts.credits += 1
            facts.credit_amount, facts.credit_xfer, facts.credited = amount, xfer, account
        elif kind == "purchase":
            self.purchases.setdefault((account, ref), []).append(amount)
        elif kind == "payout":
            self.payouts.setdefault(ref, []).append((account, amount))
        elif kind == "payout_reversal":
            self.reversals.setdefault(ref, []).append((account, amount))
        else:
            self.strange.append(f"entry {entry_id} of {account} has unknown kind {kind!r}")

    def _gift(self, viewer: str, req: str) -> GiftFacts:
        facts = self.gifts.get((viewer, req))
        if facts is None:
            facts = self.gifts[(viewer, req)] = GiftFacts()
        return facts

    def balance(self, account: str) -> tuple[int, int]:
        """(coins, diamonds) as the account's entries sum up."""
        sums = self.sums.get(account)
        return (sums[0], sums[1]) if sums else (0, 0)


@dataclass(slots=True)
class Snapshot:
    """The data store after the run: the folded ledgers and what the checker compares."""

    books: Books
    wallets: dict[str, tuple[int, int]]  # user -> (coins, diamonds)
    rooms: dict[str, int]  # room -> its last seq (rooms whose hash is gone are absent)
    payouts: dict[str, dict[str, str]]  # payout id -> its hash (status, user, gross, ...)
    payout_ids: dict[tuple[str, str], str]  # (creator, Idempotency-Key) -> payout id
    report: Report
    seconds: float = 0.0


# -- reading the store -------------------------------------------------------------------


def snapshot(
    redis_url: str, users: Iterable[str], rooms: Iterable[str], ops: Iterable[Op] = ()
) -> Snapshot:
    """Read everything :func:`check` needs from the store at ``redis_url`` (a node of a
    cluster is enough). ``ops``, when given, lets the payouts never answered be found by
    their idempotency records; without it they are matched to the ledger by amount."""
    started = time.perf_counter()
    client: Any = connect_sync(redis_url)
    try:
        books = Books()
        with _no_gc():
            _read_ledgers(client, books)
        payout_keys: list[tuple[str, str]] = []
        payout_ids: set[str] = set(books.payouts) | set(books.reversals)
        for op in ops:
            if op.kind == "payout":
                payout_keys.append((op.user, op.key))
                if isinstance(op.result.get("payout"), str):
                    payout_ids.add(op.result["payout"])
            elif op.kind == "settle":
                payout_ids.add(op.key)
        idem = _read_payout_ids(client, payout_keys)
        payout_ids |= set(idem.values())
        snap = Snapshot(
            books=books,
            wallets=_read_wallets(client, sorted(set(users))),
            rooms=_read_rooms(client, sorted(set(rooms))),
            payouts=_read_payouts(client, sorted(payout_ids)),
            payout_ids=idem,
            report=reconcile(client, progress=None),
        )
    finally:
        client.close()
    snap.seconds = time.perf_counter() - started
    return snap


class _Decoded(dict[bytes, str]):
    """bytes -> str, each decoded once (a lookup in C for those seen before)."""

    def __missing__(self, raw: bytes) -> str:
        text = self[raw] = raw.decode()
        return text


def _read_ledgers(client: Any, books: Books) -> None:
    """Every partition's ledger, a page of each partition still unread per round trip."""
    after = {p: "-" for p in range(keys.PARTITIONS)}
    s = _Decoded()  # kinds, assets, accounts, rooms: few, decoded once
    add = books.add
    while after:
        parts = list(after)
        size = max(MIN_PAGE, min(PAGE, BUFFERED // len(parts)))
        with client.pipeline(transaction=False) as pipe:
            for p in parts:
                start = after[p]
                pipe.xrange(keys.ledger(p), min=start if start == "-" else f"({start}", count=size)
            pages = pipe.execute()
        for p, rows in zip(parts, pages, strict=True):
            for _sid, f in rows:
                add(
                    s[f[b"kind"]],
                    s[f[b"account"]],
                    s[f[b"asset"]],
                    int(f[b"amount"]),
                    f[b"ref"].decode(),
                    s[f.get(b"counterparty", b"")],
                    s[f.get(b"room", b"")],
                    f.get(b"xfer", b"").decode(),
                    f.get(b"id", b"").decode(),
                )
            if len(rows) < size:
                del after[p]
            else:
                after[p] = rows[-1][0].decode()


def _pipelined(client: Any, names: list[Any], command: str, *args: Any) -> list[Any]:
    """``command`` on each of ``names``, ``PIPELINE`` per round trip."""
    out: list[Any] = []
    for i in range(0, len(names), PIPELINE):
        with client.pipeline(transaction=False) as pipe:
            for name in names[i : i + PIPELINE]:
                getattr(pipe, command)(name, *args)
            out += pipe.execute()
    return out


def _read_wallets(client: Any, users: list[str]) -> dict[str, tuple[int, int]]:
    rows = _pipelined(client, [keys.wallet(u) for u in users], "hmget", ["coins", "diamonds"])
    return {u: (int(c or 0), int(d or 0)) for u, (c, d) in zip(users, rows, strict=True)}


def _read_rooms(client: Any, rooms: list[str]) -> dict[str, int]:
    rows = _pipelined(client, [keys.room(r) for r in rooms], "hget", "seq")
    out = {}
    for room, seq in zip(rooms, rows, strict=True):
        if seq is not None:
            out[room] = int(seq)
    return out


def _read_payouts(client: Any, ids: list[str]) -> dict[str, dict[str, str]]:
    rows = _pipelined(client, [keys.payout(pid) for pid in ids], "hgetall")
    return {
        pid: {k.decode(): v.decode() for k, v in row.items()}
        for pid, row in zip(ids, rows, strict=True)
        if row
    }


def _read_payout_ids(client: Any, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """The payout id each (creator, Idempotency-Key) created, from its idempotency record
    ("<fingerprint>\\n<first response JSON>", lua/payout_create.lua); none when no
    attempt of the op ever reached the store."""
    rows = _pipelined(client, [keys.payout_idem(u, k) for u, k in wanted], "get")
    out = {}
    for pair, raw in zip(wanted, rows, strict=True):
        if raw:
            _, _, body = raw.partition(b"\n")
            out[pair] = str(orjson.loads(body)["id"])
    return out


# -- the verdict -------------------------------------------------------------------------


@dataclass(slots=True)
class Verdict:
    """What :func:`check` found. Every count is exact; ``problems`` lists at most
    ``EXAMPLES`` examples of each kind, then how many more there were."""

    ops: int = 0
    acked: int = 0
    refused: int = 0
    unknown: int = 0
    unknown_present: int = 0  # unknown ops that did take effect (once)
    lost: int = 0  # acknowledged, or debited, and not (wholly) in the store
    duplicated: int = 0  # in the store more than once
    phantom: int = 0  # refused, or asked by no op, yet in the store
    mismatched: int = 0  # present, but with the wrong amount, account, seq or status
    wallets: int = 0  # wallets that disagree with their entries or with the ops
    gaps: int = 0  # durable event seqs a viewer was owed and never got
    duplicates_events: int = 0  # durable events a viewer got more than once
    disordered_events: int = 0  # events out of seq order, or outside the room's seqs
    members: int = 0
    reconcile_ok: bool = False
    unknown_ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def other(self) -> int:
        """Failures the one-line summary has no field of its own for."""
        return (
            self.phantom + self.mismatched + self.wallets + self.duplicates_events
            + self.disordered_events
        )  # fmt: skip

    @property
    def ok(self) -> bool:
        return (
            self.reconcile_ok
            and not (self.lost or self.duplicated or self.gaps or self.other)
            and not self.problems
        )

    def line(self, faults: int) -> str:
        """The run's one-line result; ``other=`` is added only when it is not zero."""
        out = (
            f"chaos: ops={self.ops} faults={faults} acked={self.acked} lost={self.lost} "
            f"duplicated={self.duplicated} gaps={self.gaps} "
            f"reconcile={'ok' if self.reconcile_ok else 'FAIL'} unknown={self.unknown}"
        )
        return out + (f" other={self.other}" if self.other else "")


class _Findings:
    """Counts problems by kind (a Verdict field) and keeps the first few of each."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, kind: str, text: str, weight: int = 1) -> None:
        setattr(self.verdict, kind, getattr(self.verdict, kind) + weight)
        self.counts[kind] += 1
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(f"{kind}: {text}")

    def note(self, kind: str, text: str) -> None:
        """A problem that has no count of its own (reconcile's)."""
        self.counts[kind] += 1
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(f"{kind}: {text}")

    def finish(self) -> None:
        for kind, examples in self.examples.items():
            self.verdict.problems += examples
            more = self.counts[kind] - len(examples)
            if more:
                self.verdict.problems.append(f"{kind}: ... and {more} more")


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Millions of small objects are made and kept here; the cyclic collector would walk
    them all again and again (a third of the time) and find no cycle."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def check(ops: list[Op], members: list[Member], snap: Snapshot) -> Verdict:
    """Compare the history with the store; see the module's docstring."""
    with _no_gc():
        return _check(ops, members, snap)


def _check(ops: list[Op], members: list[Member], snap: Snapshot) -> Verdict:
    started = time.perf_counter()
    verdict = Verdict(ops=len(ops), members=len(members))
    found = _Findings(verdict)
    implied: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # user -> [coins, diamonds]
    by_kind: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.outcome == "ok":
            verdict.acked += 1
        elif op.outcome == "refused":
            verdict.refused += 1
        else:
            verdict.unknown += 1
            verdict.unknown_ids.append(op.id)
            if op.outcome != "unknown":
                found.add("mismatched", f"op {op.id} has outcome {op.outcome!r}")
        by_kind[op.kind].append(op)
    for kind in set(by_kind) - {"gift", "purchase", "payout", "settle"}:
        found.add("mismatched", f"{len(by_kind[kind])} op(s) of unknown kind {kind!r}")
    _check_gifts(by_kind["gift"], snap, found, implied)
    _check_purchases(by_kind["purchase"], snap, found, implied)
    _check_payouts(by_kind["payout"], by_kind["settle"], snap, found, implied)
    for text in snap.books.strange:
        found.add("mismatched", text)
    _check_wallets(snap, found, implied)
    _check_members(members, snap, found)
    report = snap.report
    verdict.reconcile_ok = report.ok and report.in_flight == 0
    for text in report.problems:
        found.note("reconcile", text)
    if report.in_flight:
        found.note("reconcile", f"{report.in_flight} coins still in flight after the sweep")
    found.finish()
    verdict.seconds = time.perf_counter() - started
    return verdict


# -- ops ---------------------------------------------------------------------------------


def _int(value: Any) -> int | None:
    """An op's number from its args or result (JSON), or None when it has none."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _group(ops: list[Op]) -> dict[tuple[str, str], list[Op]]:
    """Ops by (user, key): ops that share a key (a purchase sent again with the same
    receipt, as a replay test) are one effect, which may happen once."""
    groups: dict[tuple[str, str], list[Op]] = {}
    for op in ops:
        group = groups.get((op.user, op.key))
        if group is None:
            groups[(op.user, op.key)] = [op]
        else:
            group.append(op)
    return groups


def _label(kind: str, group: list[Op], key: tuple[str, str]) -> str:
    ids = ",".join(op.id for op in group[:3]) + (",..." if len(group) > 3 else "")
    return f"{kind} {ids} ({key[0]} {key[1]})"


def _refused_yet_present(group: list[Op], label: str, found: _Findings, allowed: str = "") -> None:
    """A definite refusal of an effect that happened (``allowed``: a code that may come
    with it), and the unknown ops whose effect is there."""
    for op in group:
        if op.outcome == "refused" and op.code != allowed:
            found.add("phantom", f"{label}: {op.id} refused ({op.code}), yet it took effect")
        elif op.outcome == "unknown":
            found.verdict.unknown_present += 1


def _check_gifts(
    ops: list[Op], snap: Snapshot, found: _Findings, implied: dict[str, list[int]]
) -> None:
    gifts = snap.books.gifts
    groups = _group(ops)
    seqs: dict[tuple[str, int], str] = {}  # (room, acked seq) -> op id
    for key, group in groups.items():
        facts = gifts.get(key)
        acked = [op for op in group if op.outcome == "ok"]
        if facts is None or facts.absent:
            if acked:
                found.add("lost", f"{_label('gift', group, key)} acked, not in the ledger")
            continue
        label = _label("gift", group, key)
        if facts.doubled:
            found.add("duplicated", f"{label}: {_counts(facts)}")
        elif facts.debits == 0:
            found.add("phantom", f"{label}: credited or refunded, never debited")
        elif not (facts.landed or facts.voided):
            found.add("lost", f"{label}: debited, neither landed nor refunded")
        elif acked and facts.voided:
            found.add("lost", f"{label} acked, but refunded instead of landed")
        elif facts.landed:
            _refused_yet_present(group, label, found)
        else:  # voided: the room was not live, which is what stream_not_live says
            _refused_yet_present(group, label, found, allowed="stream_not_live")
        op = group[0]
        _gift_fields(op, facts, label, found)
        cost = _int(op.args.get("coins")) or 0
        if facts.debits:
            implied[op.user][0] -= cost
        if facts.refunds:
            implied[op.user][0] += cost
        if facts.credits:
            implied[str(op.args.get("creator", ""))][1] += cost
        if acked and facts.landed:
            _gift_seq(acked, snap, seqs, found)
    for viewer, req in gifts.keys() - groups.keys():
        found.add("phantom", f"gift {viewer} req {req} in the ledger, no op sent it")


def _counts(facts: GiftFacts) -> str:
    return f"{facts.debits} debit(s), {facts.credits} credit(s), {facts.refunds} refund(s)"


def _gift_fields(op: Op, facts: GiftFacts, label: str, found: _Findings) -> None:
    """The entries of a gift say what the op asked: amounts, creator, room, transfer."""
    cost, wrong = _int(op.args.get("coins")), []
    if facts.debits and facts.debit_amount != -(cost or 0):
        wrong.append(f"debit {facts.debit_amount} != -{cost}")
    if facts.credits and facts.credit_amount != cost:
        wrong.append(f"credit {facts.credit_amount} != {cost}")
    if facts.refunds and facts.refund_amount != cost:
        wrong.append(f"refund {facts.refund_amount} != {cost}")
    creator, room = op.args.get("creator"), op.args.get("room")
    if facts.debits and facts.creator != creator:
        wrong.append(f"debit names creator {facts.creator!r}, op {creator!r}")
    if facts.credits and facts.credited != creator:
        wrong.append(f"credit went to {facts.credited!r}, op names {creator!r}")
    if facts.debits and facts.room != room:
        wrong.append(f"debit names room {facts.room!r}, op {room!r}")
    if facts.debits and facts.debit_xfer != facts.debit_id:
        wrong.append(f"debit {facts.debit_id} names transfer {facts.debit_xfer}")
    if facts.credits and facts.debits and facts.credit_xfer != facts.debit_xfer:
        wrong.append(f"credit names transfer {facts.credit_xfer}, debit {facts.debit_xfer}")
    if facts.refunds and facts.debits and facts.refund_xfer != facts.debit_xfer:
        wrong.append(f"refund names transfer {facts.refund_xfer}, debit {facts.debit_xfer}")
    if wrong:
        found.add("mismatched", f"{label}: " + "; ".join(wrong))


def _gift_seq(
    acked: list[Op], snap: Snapshot, seqs: dict[tuple[str, int], str], found: _Findings
) -> None:
    """An acked gift's seq is its own in its room, and no later than the room's last."""
    op = acked[0]
    room, seq = str(op.args.get("room", "")), _int(op.result.get("seq"))
    if seq is None or any(_int(o.result.get("seq")) != seq for o in acked):
        found.add("mismatched", f"gift {op.id} acked with seq(s) {[o.result for o in acked]}")
        return
    other = seqs.setdefault((room, seq), op.id)
    if other != op.id:
        found.add("mismatched", f"gifts {other} and {op.id} both acked with seq {seq} in {room}")
    last = snap.rooms.get(room)
    if last is not None and not 0 < seq <= last:
        found.add("mismatched", f"gift {op.id} acked with seq {seq}, room {room} ends at {last}")


def _check_purchases(
    ops: list[Op], snap: Snapshot, found: _Findings, implied: dict[str, list[int]]
) -> None:
    purchases = snap.books.purchases
    groups = _group(ops)
    for key, group in groups.items():
        amounts = purchases.get(key, [])
        acked = [op for op in group if op.outcome == "ok"]
        label = _label("purchase", group, key)
        if not amounts:
            if acked:
                found.add("lost", f"{label} acked, not in the ledger")
            continue
        if len(amounts) > 1:
            found.add("duplicated", f"{label} credited {len(amounts)} times")
        else:
            _refused_yet_present(group, label, found)
        coins = _int(group[0].args.get("coins"))
        txns = {op.result.get("transaction_id") for op in acked}
        answered = {_int(op.result.get("coins")) for op in acked}
        if any(a != coins for a in amounts) or len(txns) > 1 or answered - {coins}:
            found.add(
                "mismatched",
                f"{label} of {coins} coins: credited {amounts}, answered "
                f"{[op.result for op in acked]}",
            )
        implied[key[0]][0] += coins or 0
    for user, txn in purchases.keys() - groups.keys():
        found.add("phantom", f"purchase {user} txn {txn} in the ledger, no op made it")


def _check_payouts(
    payouts: list[Op],
    settles: list[Op],
    snap: Snapshot,
    found: _Findings,
    implied: dict[str, list[int]],
) -> None:
    """Payouts by id, then settles per payout (several settle ops may name one payout)."""
    entries = snap.books.payouts
    owner: dict[str, Op] = {}  # payout id -> the payout op that created it
    unmatched: dict[str, list[Op]] = defaultdict(list)  # user -> unknown ops with no id
    for op in payouts:
        pid = _payout_id(op, snap, found)
        if pid is None:
            if op.outcome == "ok":
                found.add("lost", f"payout {op.id} acked without a payout id")
            elif op.outcome == "unknown":
                unmatched[op.user].append(op)
            continue
        if pid in owner:
            found.add("duplicated", f"payouts {owner[pid].id} and {op.id} both made {pid}")
            continue
        owner[pid] = op
        _payout_present(op, pid, entries.get(pid, []), found, implied)
    for pid in sorted(entries.keys() - owner.keys()):
        (account, amount), *_ = entries[pid]
        pool = unmatched.get(account, [])
        match = next((o for o in pool if -amount == _int(o.args.get("diamonds"))), None)
        if match is None:
            found.add("phantom", f"payout {pid} of {account} in ledger, no op made it")
            continue
        pool.remove(match)
        owner[pid] = match
        _payout_present(match, pid, entries[pid], found, implied)
    _check_settles(settles, owner, snap, found, implied)


def _payout_id(op: Op, snap: Snapshot, found: _Findings) -> str | None:
    """The payout an op made: its ack says, else its idempotency record does."""
    recorded = snap.payout_ids.get((op.user, op.key))
    acked = op.result.get("payout") if op.outcome == "ok" else None
    if op.outcome == "refused" and recorded is not None:
        found.add("phantom", f"payout {op.id} refused ({op.code}), but made {recorded}")
    if acked is not None and recorded is not None and acked != recorded:
        found.add("mismatched", f"payout {op.id} acked {acked}, its key recorded {recorded}")
    if isinstance(acked, str):
        return acked
    return recorded


def _payout_present(
    op: Op,
    pid: str,
    rows: list[tuple[str, int]],
    found: _Findings,
    implied: dict[str, list[int]],
) -> None:
    """The payout entries of a payout op: exactly one, from its creator, for -diamonds."""
    diamonds = _int(op.args.get("diamonds"))
    if not rows:
        if op.outcome == "ok":
            found.add("lost", f"payout {op.id} ({pid}) acked, not in ledger")
        return
    if len(rows) > 1:
        found.add("duplicated", f"payout {op.id} ({pid}) has {len(rows)} payout entries")
    elif op.outcome == "unknown":
        found.verdict.unknown_present += 1
    wrong = [(a, n) for a, n in rows if a != op.user or n != -(diamonds or 0)]
    gross = _int(op.result.get("gross"))
    if wrong or (op.outcome == "ok" and gross is not None and gross != diamonds):
        found.add("mismatched", f"payout {op.id} ({pid}) of {diamonds}: entries {rows}")
    implied[op.user][1] -= diamonds or 0


def _check_settles(
    settles: list[Op],
    owner: dict[str, Op],
    snap: Snapshot,
    found: _Findings,
    implied: dict[str, list[int]],
) -> None:
    """Per payout: one reversal if a failed settle was acked, none if paid was; a reversal
    only if some failed settle may have made it; the payout's status agrees."""
    by_payout: dict[str, list[Op]] = defaultdict(list)
    for op in settles:
        by_payout[op.key].append(op)
    reversals = snap.books.reversals
    for pid in sorted(by_payout.keys() | reversals.keys()):
        ops, rows = by_payout.get(pid, []), reversals.get(pid, [])
        acked = {str(op.args.get("outcome")) for op in ops if op.outcome == "ok"}
        maybe = {str(op.args.get("outcome")) for op in ops if op.outcome != "refused"}
        status = snap.payouts.get(pid, {}).get("status")
        name = ",".join(op.id for op in ops) or "no settle op"
        if acked == {"paid", "failed"}:
            found.add("mismatched", f"payout {pid} acked as both paid and failed ({name})")
        if len(rows) > 1:
            found.add("duplicated", f"payout {pid} reversed {len(rows)} times ({name})")
        elif rows and "paid" in acked:
            found.add("phantom", f"payout {pid} acked paid ({name}), but reversed")
        elif rows and "failed" not in maybe:
            found.add("phantom", f"payout {pid} reversed, but no failed settle may have ({name})")
        elif not rows and "failed" in acked:
            found.add("lost", f"payout {pid} acked failed ({name}), not reversed")
        for outcome in acked:
            if status != outcome:
                found.add("mismatched", f"payout {pid} acked {outcome} ({name}), is {status}")
        for op in ops:
            if op.outcome == "unknown" and status == op.args.get("outcome"):
                found.verdict.unknown_present += 1
        if rows and "failed" in maybe:
            _reversal_amount(pid, rows, owner.get(pid), snap, found, implied)


def _reversal_amount(
    pid: str,
    rows: list[tuple[str, int]],
    made_by: Op | None,
    snap: Snapshot,
    found: _Findings,
    implied: dict[str, list[int]],
) -> None:
    """A reversal gives the payout's gross back to its creator (once, in the implied
    wallets: a second one is already a duplicate)."""
    held = snap.payouts.get(pid, {})
    gross = _int(made_by.args.get("diamonds")) if made_by else None
    if gross is None and held.get("gross", "").lstrip("-").isdigit():
        gross = int(held["gross"])
    user = made_by.user if made_by else held.get("user", "")
    account, amount = rows[0]
    if account != user or amount != gross:
        found.add("mismatched", f"payout {pid} of {user} ({gross}) reversed as {rows}")
    implied[user][1] += gross or 0


# -- wallets -----------------------------------------------------------------------------


def _check_wallets(snap: Snapshot, found: _Findings, implied: dict[str, list[int]]) -> None:
    """Each wallet = the sum of its account's entries = what the ops that took effect
    imply (purchases - gifts sent + refunds; gifts received - payouts + reversals)."""
    for user, wallet in snap.wallets.items():
        books = snap.books.balance(user)
        ops = (implied[user][0], implied[user][1]) if user in implied else (0, 0)
        if wallet != books:
            found.add("wallets", f"{user} holds {wallet} (coins, diamonds), ledger says {books}")
        elif wallet != ops:
            found.add("wallets", f"{user} holds {wallet} (coins, diamonds), ops imply {ops}")


# -- events ------------------------------------------------------------------------------


def _check_members(members: list[Member], snap: Snapshot, found: _Findings) -> None:
    for m in members:
        last = snap.rooms.get(m.room)
        if last is None:
            found.add("mismatched", f"{m.member} in {m.room}: the room's hash is gone, no seq")
            continue
        _check_member(m, last, found)


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, inclusive ranges covering the same seqs."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[0] <= r[1]):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _excused(seq: int, ranges: list[tuple[int, int]], starts: list[int]) -> bool:
    i = bisect_right(starts, seq) - 1
    return i >= 0 and seq <= ranges[i][1]


def _check_member(m: Member, last: int, found: _Findings) -> None:
    """``seen``, less the seqs a ``resumed`` said history no longer held, must be
    exactly first_seq..last, each once, in order."""
    first = m.first_seq
    if not m.incomplete and m.seen == list(range(first, last + 1)):
        return  # the usual case, at C speed
    ranges = _merged(m.incomplete)
    starts = [a for a, _ in ranges]
    seen = [s for s in m.seen if not _excused(s, ranges, starts)] if ranges else m.seen
    got: set[int] = set()
    top = 0
    dups: list[int] = []
    disorder: list[int] = []
    for s in seen:
        if s in got:
            dups.append(s)
            continue
        got.add(s)
        if s < top or not first <= s <= last:
            disorder.append(s)
        else:
            top = s
    where = f"{m.member} in {m.room}"
    if dups:
        found.add("duplicates_events", f"{where} got seqs twice: {_ranges(dups)}", len(dups))
    if disorder:
        text = f"{where} got seqs out of order or outside {first}..{last}"
        found.add("disordered_events", f"{text}: {_ranges(disorder)}", len(disorder))
    owed = max(0, last - first + 1) - _overlap(ranges, first, last)
    have = sum(1 for s in got if first <= s <= last)
    if have < owed:
        missing = [
            s for s in range(first, last + 1) if s not in got and not _excused(s, ranges, starts)
        ]
        found.add("gaps", f"{where} never got seqs {_ranges(missing)}", len(missing))


def _overlap(ranges: list[tuple[int, int]], lo: int, hi: int) -> int:
    """How many seqs of lo..hi the (disjoint) ranges cover."""
    return sum(max(0, min(b, hi) - max(a, lo) + 1) for a, b in ranges)


def _ranges(seqs: list[int], limit: int = EXAMPLES) -> str:
    """``[1, 2, 3, 7]`` as "1-3, 7", at most ``limit`` runs."""
    runs: list[str] = []
    ordered = sorted(set(seqs))
    i = 0
    while i < len(ordered) and len(runs) < limit:
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    more = " ..." if i < len(ordered) else ""
    return ", ".join(runs) + more
