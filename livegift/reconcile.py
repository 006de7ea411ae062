"""``livegift reconcile``: recompute every balance from the partitions' ledgers, and check
PROTOCOL §2 and §7.

The money path is split into ``keys.PARTITIONS`` partitions (livegift/keys.py), each with
its own ledger stream, entry counter, ``minted`` and ``held`` counters and gift outbox.
Checks, against the live data store (one Redis or a cluster; it may be taking gifts,
purchases and payouts while this runs):

  1. each partition's ledger: its entries are n = 1, 2, 3, ... with no gap and id
     n × PARTITIONS + partition; every kind is a known one (``KINDS``) and moves the right
     asset in the right direction; every entry's account lives in the partition; every
     entry's ``balance`` (balance after) equals the recomputed running balance;
  2. every account's coins and diamonds, and the partition's minted and held counters,
     equal what its ledger says; every payout: gross = net + commission, a known status,
     exactly one payout entry for -gross from its owner, and a reversal entry for +gross if
     and only if it failed;
  3. gifts, which cross partitions in two steps (a transfer, named by its debit's id):
     every gift_credit and gift_refund matches one gift_debit (same transfer, the same two
     accounts, the opposite amount, the same req and room), and no transfer lands twice or
     both lands and is voided. A debit with neither is in flight: it must still be in its
     partition's outbox, or have landed or been voided since it was read (its ``landed``
     key says so); else it was lost. Every transfer in an outbox is a gift debit of that
     partition's ledger, and not a voided one;
  4. coins minted by purchases = Σ coins + Σ diamonds + Σ diamonds held by payouts that
     have not failed + coins in flight.
Purchases made with sandbox receipts (development mode) count as minted like any other,
and are reported apart (``sandbox_minted``): no store was paid for those coins.

Consistent cuts per partition, not a stop-the-world lock. Every script that moves money
bumps its partition's entry counter in the same atomic call, so reading some of the
partition's keys together with that counter in one atomic call (``_CUT``, one slot) gives
their state exactly as of the partition's entry ``n``. First the ledgers are replayed to
their end; then every partition's counters, outbox, wallets and payouts are read at such
cuts (a pipeline, grouped by node on a cluster); then the ledgers are read on past every
cut, and each cut is compared with its partition's ledger replayed to exactly its entry.

Bounded memory. The partitions' ledgers are read in pages, all together, oldest entries
first (``_Reader``), so the two steps of a gift are replayed close together: the transfers
held open are the few in flight, whatever the ledger's length. What grows with the data is
the accounts' balances, the payouts' entries, and one byte per ledger entry (the state of
each gift debit, to catch a transfer that lands twice).
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import redis
import redis.cluster
from tqdm import tqdm

from livegift import keys

PARTITIONS = keys.PARTITIONS
PAGE = 10_000  # entries per XRANGE, at most
BUFFERED = 20_000  # entries held in pages across the partitions read together (~30 MB)
MIN_PAGE = 64
BATCH = 500  # wallets and payouts per atomic read
PIPELINE = 20_000  # keys read per round trip
MAX_SKIP = 1_000_000  # entries an id may run ahead of the entries read and still be tracked
ROUNDS = 10  # re-reads of the viewers' partitions for credits read before their debits

# kind -> (asset, sign of amount), as stored (bytes)
KINDS: dict[bytes, tuple[bytes, int]] = {
    b"purchase": (b"coins", 1),
    b"gift_debit": (b"coins", -1),
    b"gift_credit": (b"diamonds", 1),
    b"gift_refund": (b"coins", 1),
    b"payout": (b"diamonds", -1),
    b"payout_reversal": (b"diamonds", 1),
}
GIFT_KINDS = (b"gift_debit", b"gift_credit", b"gift_refund")
PAYOUT_KINDS = (b"payout", b"payout_reversal")
STATUSES = ("pending", "paid", "failed")

# The state of a partition's entry n, one byte each: no gift debit, or a gift debit that
# is not matched yet, that landed (its credit was read) or that was voided (its refund).
NOT_A_DEBIT, PENDING, LANDED, VOIDED = 0, 1, 2, 3

# One partition's cut: its keys read in one atomic call, with its entry counter.
_CUT = """#!lua flags=no-writes
-- KEYS: entry_seq, minted, held, outbox, then ARGV[1] wallets, then payouts.
-- ARGV[1]: how many wallets; ARGV[2]: '1' to read minted, held and the outbox fields.
-- Returns {n, minted, held, outbox fields, {coins, diamonds, ...}, {payout hash, ...}}.
local wallets = tonumber(ARGV[1])
local n = redis.call('GET', KEYS[1]) or '0'
local minted, held, outbox = false, false, {}
if ARGV[2] == '1' then
  minted = redis.call('GET', KEYS[2]) or '0'
  held = redis.call('GET', KEYS[3]) or '0'
  outbox = redis.call('HKEYS', KEYS[4])
end
local w, p = {}, {}
for i = 5, 4 + wallets do
  local v = redis.call('HMGET', KEYS[i], 'coins', 'diamonds')
  w[#w + 1] = v[1]
  w[#w + 1] = v[2]
end
for i = 5 + wallets, #KEYS do
  p[#p + 1] = redis.call('HGETALL', KEYS[i])
end
return {n, minted, held, outbox, w, p}
"""


@dataclass
class Report:
    entries: int = 0
    accounts: int = 0
    payouts: int = 0
    minted: int = 0
    coins: int = 0
    diamonds: int = 0
    held: int = 0
    # Coins debited by gifts that had neither landed nor been voided in the ledgers read.
    in_flight: int = 0
    # Coins minted by sandbox receipts (development mode), and how many such purchases.
    sandbox_minted: int = 0
    sandbox_purchases: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        holds = self.minted == self.coins + self.diamonds + self.held + self.in_flight
        lines = [
            f"ledger entries: {self.entries:,}  accounts: {self.accounts:,}  "
            f"payouts: {self.payouts:,}  ({self.seconds:.2f}s)",
            f"minted {self.minted:,} = coins {self.coins:,} + diamonds {self.diamonds:,} "
            f"+ held by payouts {self.held:,} + in flight {self.in_flight:,}  "
            f"({'holds' if holds else 'FAILS'})",
        ]
        if self.sandbox_purchases:
            lines.append(
                f"sandbox: {self.sandbox_minted:,} minted coins come from "
                f"{self.sandbox_purchases:,} sandbox receipt(s) (development mode, unpaid)"
            )
        if self.ok:
            lines.append("OK: every balance matches its ledger and the invariant holds")
        else:
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
            lines += [f"  - {p}" for p in self.problems[:200]]
            if len(self.problems) > 200:
                lines.append(f"  ... and {len(self.problems) - 200} more")
        return "\n".join(lines)


@dataclass
class _Cut:
    """Live values of one partition, read in one atomic call with its entry counter."""

    at: int
    counters: tuple[int, int] | None  # minted, held: in a partition's first cut only
    outbox: list[bytes]
    wallets: dict[bytes, tuple[int, int]]
    payouts: dict[str, dict[bytes, bytes]]


@dataclass
class _Partition:
    """One partition's ledger, replayed so far."""

    index: int
    n: int = 0  # the last entry replayed
    entries: int = 0
    minted: int = 0
    held: int = 0
    books: dict[bytes, list[int]] = field(default_factory=dict)  # account -> [coins, diamonds]
    cuts: deque[_Cut] = field(default_factory=deque)
    states: bytearray = field(default_factory=bytearray)

    def state(self, n: int) -> int:
        return self.states[n] if 0 <= n < len(self.states) else NOT_A_DEBIT

    def mark(self, n: int, state: int) -> None:
        if n >= len(self.states):
            self.states.extend(bytes(max(n + 1, 2 * len(self.states)) - len(self.states)))
        self.states[n] = state


@dataclass(slots=True)
class _Debit:
    """A gift debit read, whose credit or refund has not been read yet."""

    viewer: bytes
    creator: bytes
    coins: int
    ref: bytes
    room: bytes


@dataclass(slots=True)
class _Outcome:
    """A gift credit or refund: the end of the transfer ``xfer``."""

    partition: int
    entry: int
    kind: bytes
    account: bytes
    counterparty: bytes
    amount: int
    ref: bytes
    room: bytes
    xfer: int


@dataclass
class _Books:
    """Every partition's ledger replayed entry by entry, and the transfers between them."""

    report: Report
    parts: list[_Partition] = field(
        default_factory=lambda: [_Partition(p) for p in range(PARTITIONS)]
    )
    pending: dict[int, _Debit] = field(default_factory=dict)  # transfer -> its debit
    orphans: dict[int, list[_Outcome]] = field(default_factory=dict)  # debit not read yet
    # payout id -> [(partition, entry n, kind, account, amount)]
    payout_moves: dict[str, list[tuple[int, int, str, str, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    payouts_read: set[str] = field(default_factory=set)
    offsets: dict[str, int] = field(default_factory=lambda: {"coins": 0, "diamonds": 0})
    bad_running: set[tuple[bytes, bytes]] = field(default_factory=set)

    def problem(self, text: str) -> None:
        self.report.problems.append(text)

    # -- one entry -------------------------------------------------------------------------

    def apply(self, p: int, sid: bytes, f: dict[bytes, bytes]) -> None:
        """Replay one entry of partition ``p``. Fields stay bytes: this runs a million times."""
        part = self.parts[p]
        eid = _int(f.get(b"id"))
        n = eid // PARTITIONS
        self._order(part, sid, eid, n)
        while part.cuts and part.cuts[0].at < n:
            self._check_cut(part, part.cuts.popleft())
        kind, asset, account = f.get(b"kind", b""), f.get(b"asset", b""), f.get(b"account", b"")
        amount = _int(f.get(b"amount"))
        self._movement(eid, kind, asset, amount, f.get(b"xfer", b""))
        self._running(part, eid, account, asset, amount, _int(f.get(b"balance")))
        part.n, part.entries = n, part.entries + 1
        if kind == b"purchase":
            part.minted += amount
            if f.get(b"counterparty") == b"sandbox":
                self.report.sandbox_minted += amount
                self.report.sandbox_purchases += 1
        elif kind in PAYOUT_KINDS:
            self._payout_move(part, n, kind, account, amount, f.get(b"ref", b"").decode())
        elif kind == b"gift_debit":
            self._debit(part, n, eid, account, amount, f)
        elif kind in GIFT_KINDS:
            self._outcome(part, eid, kind, account, amount, f)
        if self.orphans and eid in self.orphans:
            for outcome in self.orphans.pop(eid):
                self._settle(outcome)

    def _order(self, part: _Partition, sid: bytes, eid: int, n: int) -> None:
        where = f"partition {part.index}: ledger entry {sid.decode()}"
        if eid % PARTITIONS != part.index:
            self.problem(f"{where}: id {eid} is not an id of this partition")
        if n != part.n + 1:
            self.problem(f"{where}: entry {n} (id {eid}) follows entry {part.n}")

    def _movement(self, eid: int, kind: bytes, asset: bytes, amount: int, xfer: bytes) -> None:
        movement = KINDS.get(kind)
        if movement is None:
            self.problem(f"ledger entry {eid}: unknown kind {kind.decode()!r}")
        elif movement != (asset, 1 if amount > 0 else -1):
            self.problem(
                f"ledger entry {eid}: {kind.decode()} of {amount} {asset.decode()} "
                "is not a valid movement"
            )
        if (kind in GIFT_KINDS) != bool(xfer):
            self.problem(f"ledger entry {eid}: {kind.decode()} with xfer {xfer.decode()!r}")

    def _running(
        self, part: _Partition, eid: int, account: bytes, asset: bytes, amount: int, after: int
    ) -> None:
        book = part.books.get(account)
        if book is None:
            book = part.books[account] = [0, 0]
            if keys.user_partition(account.decode()) != part.index:
                self.problem(
                    f"ledger entry {eid}: account {account.decode()} "
                    f"does not live in partition {part.index}"
                )
        i = 0 if asset == b"coins" else 1
        book[i] += amount
        if book[i] != after and (account, asset) not in self.bad_running:
            self.bad_running.add((account, asset))
            self.problem(
                f"account {account.decode()}: entry {eid} says {asset.decode()} balance "
                f"{after} but the ledger sums to {book[i]}"
            )

    def _payout_move(
        self, part: _Partition, n: int, kind: bytes, account: bytes, amount: int, ref: str
    ) -> None:
        part.held -= amount
        if keys.payout_partition(ref) != part.index:
            self.problem(
                f"payout {ref}: {kind.decode()} entry {n * PARTITIONS + part.index} is in "
                f"partition {part.index}, the payout in {keys.payout_partition(ref)}"
            )
        self.payout_moves[ref].append((part.index, n, kind.decode(), account.decode(), amount))

    # -- transfers -------------------------------------------------------------------------

    def _debit(
        self, part: _Partition, n: int, eid: int, account: bytes, amount: int, f: dict[bytes, bytes]
    ) -> None:
        if f.get(b"xfer") != str(eid).encode():
            self.problem(f"gift debit {eid}: xfer {_s(f.get(b'xfer'))!r} is not its own id")
        if n > part.entries + MAX_SKIP:
            return  # an id far out of order (reported): not worth a byte per entry up to it
        part.mark(n, PENDING)
        self.pending[eid] = _Debit(
            account, f.get(b"counterparty", b""), -amount, f.get(b"ref", b""), f.get(b"room", b"")
        )

    def _outcome(
        self,
        part: _Partition,
        eid: int,
        kind: bytes,
        account: bytes,
        amount: int,
        f: dict[bytes, bytes],
    ) -> None:
        raw = f.get(b"xfer", b"")
        if not raw.isdigit():
            return  # _movement reported an empty xfer; a garbled one names no debit
        outcome = _Outcome(
            part.index,
            eid,
            kind,
            account,
            f.get(b"counterparty", b""),
            amount,
            f.get(b"ref", b""),
            f.get(b"room", b""),
            int(raw),
        )
        if kind == b"gift_refund" and outcome.xfer % PARTITIONS != part.index:
            self.problem(
                f"gift_refund entry {eid}: transfer {raw.decode()} is of another partition"
            )
            return
        self._settle(outcome)

    def _settle(self, o: _Outcome) -> None:
        """Match a credit or refund with its debit, or hold it until the debit is read."""
        debits = self.parts[o.xfer % PARTITIONS]
        n = o.xfer // PARTITIONS
        if n > debits.n:
            self.orphans.setdefault(o.xfer, []).append(o)
            return
        state = debits.state(n)
        kind = o.kind.decode()
        if state == PENDING:
            debits.mark(n, LANDED if o.kind == b"gift_credit" else VOIDED)
            self._match(o, self.pending.pop(o.xfer))
        elif state == NOT_A_DEBIT:
            self.problem(f"{kind} entry {o.entry} names transfer {o.xfer}, which is no gift debit")
        elif (state == LANDED) == (o.kind == b"gift_credit"):
            was = "landed" if state == LANDED else "voided"
            self.problem(f"transfer {o.xfer} was {was} twice: {kind} entry {o.entry}")
        else:
            self.problem(f"transfer {o.xfer} was both landed and voided: {kind} entry {o.entry}")

    def _match(self, o: _Outcome, d: _Debit) -> None:
        credit = o.kind == b"gift_credit"
        want: dict[str, tuple[bytes | int, bytes | int]] = {
            "account": (o.account, d.creator if credit else d.viewer),
            "counterparty": (o.counterparty, d.viewer if credit else d.creator),
            "amount": (o.amount, d.coins),
            "ref": (o.ref, d.ref),
            "room": (o.room, d.room),
        }
        wrong = [
            f"{name} {_v(got)} != {_v(exp)}" for name, (got, exp) in want.items() if got != exp
        ]
        if wrong:
            self.problem(
                f"{o.kind.decode()} entry {o.entry} does not match gift debit {o.xfer}: "
                + ", ".join(wrong)
            )

    # -- cuts ------------------------------------------------------------------------------

    def add_cut(self, p: int, cut: _Cut) -> None:
        """Compare ``cut`` with partition ``p`` once its ledger is replayed to the cut."""
        part = self.parts[p]
        if cut.at < part.n:
            self.problem(
                f"partition {p}: its ledger holds entry {part.n} "
                f"but its entry counter says {cut.at}"
            )
            return
        part.cuts.append(cut)
        self.flush_cuts(part)

    def flush_cuts(self, part: _Partition) -> None:
        """Check the cuts of ``part`` that its replay has reached."""
        while part.cuts and part.cuts[0].at <= part.n:
            self._check_cut(part, part.cuts.popleft())

    def _check_cut(self, part: _Partition, cut: _Cut) -> None:
        """Compare live values read at entry ``cut.at`` with the ledger replayed to it."""
        if cut.counters is not None:
            for name, live, ledger in (
                ("minted", cut.counters[0], part.minted),
                ("held", cut.counters[1], part.held),
            ):
                if live != ledger:
                    self.problem(
                        f"partition {part.index}: {name} counter {live} but its ledger says "
                        f"{ledger} (at entry {cut.at})"
                    )
        for account, live_pair in cut.wallets.items():
            book = part.books.get(account, [0, 0])
            for i, asset in enumerate(("coins", "diamonds")):
                live, ledger = live_pair[i], book[i]
                if live != ledger:
                    self.problem(
                        f"account {account.decode()}: {asset} {live} but ledger says {ledger}"
                    )
                    self.offsets[asset] += live - ledger
                if live < 0:
                    self.problem(f"account {account.decode()}: negative {asset} balance {live}")
        for pid, raw in cut.payouts.items():
            self._check_payout(part.index, pid, raw, cut.at)
        for xfer in cut.outbox:
            self._check_outbox(part, xfer, cut.at)

    def _check_outbox(self, part: _Partition, raw: bytes, at: int) -> None:
        x = int(raw) if raw.isdigit() else -1
        state = part.state(x // PARTITIONS) if x % PARTITIONS == part.index else NOT_A_DEBIT
        if x < 0 or x // PARTITIONS > at or state == NOT_A_DEBIT:
            self.problem(
                f"outbox of partition {part.index} holds transfer {raw.decode()!r}, "
                "which is no gift debit of its ledger"
            )
        elif state == VOIDED:
            self.problem(f"transfer {x} was voided but is still in the outbox")

    def _check_payout(self, p: int, pid: str, raw: dict[bytes, bytes], at: int) -> None:
        self.payouts_read.add(pid)
        moves = [m for m in self.payout_moves.get(pid, ()) if m[0] == p and m[1] <= at]
        if not raw:
            if moves:
                self.problem(f"ledger moves diamonds for payout {pid}, which does not exist")
            return
        self.report.payouts += 1
        status, user = _s(raw.get(b"status")), _s(raw.get(b"user"))
        gross, net, commission = (_int(raw.get(k)) for k in (b"gross", b"net", b"commission"))
        if gross != net + commission:
            self.problem(f"payout {pid}: gross {gross} != net {net} + commission {commission}")
        if gross <= 0 or net < 0 or commission < 0:
            self.problem(
                f"payout {pid}: gross {gross}, net {net}, commission {commission} out of range"
            )
        if status not in STATUSES:
            self.problem(f"payout {pid}: unknown status {status!r}")
        out = [m[1:] for m in moves if m[2] == "payout"]
        back = [m[1:] for m in moves if m[2] == "payout_reversal"]
        if len(out) != 1 or out[0][2] != user or out[0][3] != -gross:
            self.problem(
                f"payout {pid}: expected one payout entry of -{gross} from {user}, got {out}"
            )
        want_back = 1 if status == "failed" else 0
        if len(back) != want_back or any(m[2] != user or m[3] != gross for m in back):
            self.problem(
                f"payout {pid} is {status}: expected {want_back} reversal of +{gross}, got {back}"
            )


def _int(v: bytes | None) -> int:
    try:
        return int(v or 0)
    except ValueError:
        return 0


def _s(v: bytes | None) -> str:
    return v.decode() if v else ""


def _v(v: bytes | int) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _ms(sid: bytes) -> int:
    return int(sid[: sid.index(b"-")])


class _Reader:
    """Reads partitions' ledgers page by page, all of them together, oldest entries first.

    Each round fetches a page of every partition that has none buffered (one pipeline),
    then replays, from every buffer, the entries no newer than the newest entry buffered
    by the partition that is least far along: its buffer empties, and it is fetched again.
    So the two steps of a gift, in two partitions and a few milliseconds apart, are
    replayed close together, and memory holds at most ``BUFFERED`` entries."""

    def __init__(self, client: Any, apply: Callable[[int, bytes, dict[bytes, bytes]], None]):
        self.client = client
        self.apply = apply
        self.after = ["-"] * PARTITIONS  # the last stream id read, per partition
        self.pages: dict[int, deque[tuple[bytes, dict[bytes, bytes]]]] = {}
        self.bar: Any = None

    def drain(self, parts: Collection[int]) -> None:
        """Replay ``parts`` to the end of their ledgers as they are now."""
        size = max(MIN_PAGE, min(PAGE, BUFFERED // max(1, len(parts))))
        more = set(parts)  # not read to the end yet
        while more or self.pages:
            more -= self._fetch([p for p in more if p not in self.pages], size)
            upto = min((_ms(self.pages[p][-1][0]) for p in more), default=None)
            self._replay(upto)

    def _fetch(self, need: list[int], size: int) -> set[int]:
        """Fetch a page of each of ``need``; returns those read to their end."""
        if not need:
            return set()
        with self.client.pipeline(transaction=False) as pipe:
            for p in need:
                after = self.after[p]
                pipe.xrange(keys.ledger(p), min=after if after == "-" else f"({after}", count=size)
            pages = pipe.execute()
        ended = set()
        for p, rows in zip(need, pages, strict=True):
            if rows:
                self.pages[p] = deque(rows)
                self.after[p] = rows[-1][0].decode()
            if len(rows) < size:
                ended.add(p)
        return ended

    def _replay(self, upto: int | None) -> None:
        emptied = []
        for p, page in self.pages.items():
            count = 0
            while page and (upto is None or _ms(page[0][0]) <= upto):
                sid, fields = page.popleft()
                self.apply(p, sid, fields)
                count += 1
            if not page:
                emptied.append(p)
            if self.bar is not None and count:
                self.bar.total = max(self.bar.total, self.bar.n + count)
                self.bar.update(count)
        for p in emptied:
            del self.pages[p]


def reconcile(
    redis_client: redis.Redis | redis.cluster.RedisCluster, progress: TextIO | None = sys.stderr
) -> Report:
    """Check the live data store against its ledgers; the report lists what disagrees."""
    client: Any = redis_client
    started = time.perf_counter()
    books = _Books(Report())
    reader = _Reader(client, books.apply)
    everything = range(PARTITIONS)
    with tqdm(
        total=_ledger_length(client),
        unit="entry",
        desc="ledger",
        file=progress,
        disable=progress is None,
        mininterval=0.5,
    ) as bar:
        reader.bar = bar
        reader.drain(everything)  # the ledgers as they are
        plan = _plan(client, books)
        for p, cut in _read_cuts(client, plan):
            books.add_cut(p, cut)
        reader.drain(everything)  # on past every cut
        for part in books.parts:
            books.flush_cuts(part)
        _reread_viewers(books, reader)
    _check_in_flight(client, books)
    _finish(client, books)
    books.report.seconds = time.perf_counter() - started
    return books.report


def _ledger_length(client: Any) -> int:
    with client.pipeline(transaction=False) as pipe:
        for p in range(PARTITIONS):
            pipe.xlen(keys.ledger(p))
        return sum(int(n) for n in pipe.execute())


# -- what to read at the cuts ------------------------------------------------------------


@dataclass
class _Plan:
    """Per partition: the accounts whose wallets and the payouts to read at its cuts."""

    wallets: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    payouts: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))


def _plan(client: Any, books: _Books) -> _Plan:
    """Every wallet and payout in the store, and every one the ledgers name.

    Read after the ledgers: an account or payout whose first entry is in what was read
    has its key by now (the entry and the key are written by one script), so the SCAN or
    the ledger names it; one created later is read at no cut and checked next time."""
    plan = _Plan()
    for user in _scan(client, "w", keys.wallet, books):
        plan.wallets[keys.user_partition(user)].add(user)
    for pid in _scan(client, "payout", keys.payout, books):
        plan.payouts[keys.payout_partition(pid)].add(pid)
    for part in books.parts:
        for account in part.books:
            user = account.decode()
            if keys.user_partition(user) == part.index:  # else reported by _running
                plan.wallets[part.index].add(user)
    for pid in books.payout_moves:
        plan.payouts[keys.payout_partition(pid)].add(pid)
    books.report.accounts = sum(len(users) for users in plan.wallets.values())
    return plan


def _scan(client: Any, kind: str, key_of: Callable[[str], str], books: _Books) -> Iterator[str]:
    """The names in keys ``lg:{<partition tag>}:<kind>:<name>``; one in a key that is not
    where ``key_of(name)`` puts it is a problem (the app would never see it)."""
    marker = f"}}:{kind}:"
    for raw in client.scan_iter(match=f"{keys.PREFIX}:{{p*{marker}*", count=1000):
        key = raw.decode()
        tag_end = key.find("}:")
        if key[tag_end : tag_end + len(marker)] != marker:
            continue  # another key whose name happens to match
        name = key[tag_end + len(marker) :]
        if not keys.ID.fullmatch(name):
            continue  # no user or payout id: some other key
        if key_of(name) == key:
            yield name
        else:
            books.problem(f"key {key} is not where the {kind} {name!r} lives")


def _read_cuts(client: Any, plan: _Plan) -> Iterator[tuple[int, _Cut]]:
    """Every partition's cuts: its counters and outbox, then its wallets and payouts in
    batches, each batch read atomically with the partition's entry counter."""
    calls: list[tuple[int, list[bytes], list[str], bool]] = []
    for p in range(PARTITIONS):
        items = [("w", u) for u in sorted(plan.wallets.get(p, ()))]
        items += [("p", pid) for pid in sorted(plan.payouts.get(p, ()))]
        for i in range(0, max(1, len(items)), BATCH):
            chunk = items[i : i + BATCH]
            users = [u.encode() for what, u in chunk if what == "w"]
            calls.append((p, users, [pid for what, pid in chunk if what == "p"], i == 0))
    start = 0
    while start < len(calls):
        end, size = start, 0
        while end < len(calls) and (end == start or size < PIPELINE):
            size += len(calls[end][1]) + len(calls[end][2]) + 4
            end += 1
        yield from _read_batch(client, calls[start:end])
        start = end


def _read_batch(
    client: Any, calls: list[tuple[int, list[bytes], list[str], bool]]
) -> Iterator[tuple[int, _Cut]]:
    with client.pipeline(transaction=False) as pipe:
        for p, users, pids, first in calls:
            names = [keys.entry_seq(p), keys.minted(p), keys.held(p), keys.outbox(p)]
            names += [keys.wallet(u.decode()) for u in users]
            names += [keys.payout(pid) for pid in pids]
            # execute_command: a cluster pipeline has no eval(), but routes EVAL by its keys
            pipe.execute_command("EVAL", _CUT, len(names), *names, len(users), int(first))
        replies = pipe.execute()
    for (p, users, pids, first), (n, minted, held, outbox, w, hashes) in zip(
        calls, replies, strict=True
    ):
        wallets = {u: (_int(w[2 * i]), _int(w[2 * i + 1])) for i, u in enumerate(users)}
        payouts = {
            pid: dict(zip(flat[::2], flat[1::2], strict=True))
            for pid, flat in zip(pids, hashes, strict=True)
        }
        counters = (_int(minted), _int(held)) if first else None
        yield p, _Cut(_int(n), counters, list(outbox), wallets, payouts)


# -- transfers at the end ----------------------------------------------------------------


def _reread_viewers(books: _Books, reader: _Reader) -> None:
    """Read on in the partitions of the debits that credits read name but that were not
    read yet: the debit is written before its credit, but partitions are read at
    different moments. Those reads may bring credits of their own; a few rounds."""
    for _ in range(ROUNDS):
        if not books.orphans:
            return
        viewers = {x % PARTITIONS for x in books.orphans}
        reader.drain(viewers)
        for p in viewers:
            books.flush_cuts(books.parts[p])
    for xfer, outcomes in sorted(books.orphans.items()):
        for o in outcomes:
            books.problem(
                f"{o.kind.decode()} entry {o.entry} names transfer {xfer}, "
                "whose gift debit is not in the ledger"
            )
    books.orphans.clear()


def _check_in_flight(client: Any, books: _Books) -> None:
    """A debit read without its credit or refund is in flight: still in its outbox (its
    record matching the debit), or landed or voided since it was read (its ``landed`` key
    in the creator's partition, set by the step that writes the credit or the void, before
    any step removes the outbox record, so checked after the outbox). Else it was lost."""
    pending = sorted(books.pending)
    records = _outbox_records(client, pending)
    missing = [x for x in pending if records[x] is None]
    with client.pipeline(transaction=False) as pipe:
        for x in missing:
            creator = books.pending[x].creator.decode()
            pipe.get(keys.landed(keys.user_partition(creator), str(x)))
        landed = dict(zip(missing, pipe.execute() if missing else [], strict=True))
    for x in pending:
        debit, record = books.pending[x], records[x]
        if record is not None:
            _check_record(books, x, debit, record)
        elif not landed[x]:
            books.problem(
                f"gift debit {x} was neither landed nor voided and is not in the outbox: lost"
            )
            continue
        books.report.in_flight += debit.coins


def _outbox_records(client: Any, xfers: list[int]) -> dict[int, bytes | None]:
    by_partition: dict[int, list[int]] = defaultdict(list)
    for x in xfers:
        by_partition[x % PARTITIONS].append(x)
    if not by_partition:
        return {}
    with client.pipeline(transaction=False) as pipe:
        for p, xs in by_partition.items():
            pipe.hmget(keys.outbox(p), [str(x) for x in xs])
        replies = pipe.execute()
    out: dict[int, bytes | None] = {}
    for xs, values in zip(by_partition.values(), replies, strict=True):
        out.update(zip(xs, values, strict=True))
    return out


def _check_record(books: _Books, x: int, debit: _Debit, record: bytes) -> None:
    """The outbox record is what the sweeper lands: it must say what the debit says."""
    try:
        rec = json.loads(record)
        got = {k: str(rec.get(k)) for k in ("xfer", "user", "creator", "cost", "req", "room")}
    except (ValueError, AttributeError):
        books.problem(f"outbox record of transfer {x} is not a transfer: {record[:80]!r}")
        return
    want = {
        "xfer": str(x),
        "user": debit.viewer.decode(),
        "creator": debit.creator.decode(),
        "cost": str(debit.coins),
        "req": debit.ref.decode(),
        "room": debit.room.decode(),
    }
    wrong = [f"{k} {got[k]} != {want[k]}" for k in want if got[k] != want[k]]
    if wrong:
        books.problem(
            f"outbox record of transfer {x} does not match its gift debit: " + ", ".join(wrong)
        )


# -- the end -----------------------------------------------------------------------------


def _finish(client: Any, books: _Books) -> None:
    """Cuts the ledgers never reached, payouts read at no cut, and the invariant."""
    report = books.report
    for part in books.parts:
        if part.cuts:
            books.problem(
                f"partition {part.index}: ledger entry counter is {part.cuts[-1].at} "
                f"but the ledger ends at entry {part.n}"
            )
    unread = sorted(set(books.payout_moves) - books.payouts_read)
    if unread:
        with client.pipeline(transaction=False) as pipe:
            for pid in unread:
                pipe.exists(keys.payout(pid))
            there = pipe.execute()
        for pid, n in zip(unread, there, strict=True):
            if not n:
                books.problem(f"ledger moves diamonds for payout {pid}, which does not exist")
    report.entries = sum(part.entries for part in books.parts)
    report.minted = sum(part.minted for part in books.parts)
    report.held = sum(part.held for part in books.parts)
    report.coins = books.offsets["coins"]
    report.diamonds = books.offsets["diamonds"]
    for part in books.parts:
        for coins, diamonds in part.books.values():
            report.coins += coins
            report.diamonds += diamonds
    if report.minted != report.coins + report.diamonds + report.held + report.in_flight:
        books.problem(
            f"invariant fails: minted {report.minted} != coins {report.coins} + diamonds "
            f"{report.diamonds} + held {report.held} + in flight {report.in_flight}"
        )
