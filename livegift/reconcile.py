"""``livegift reconcile``: recompute every balance from the ledger and check PROTOCOL §2.

Checks, against the live data store (it may be taking gifts while this runs):
  1. the ledger itself: entry ids run 1, 2, 3, ... with no gap; every kind is a known one
     (``KINDS``) and moves the right asset in the right direction; every gift debit is
     followed by its matching credit;
     every entry's ``balance`` (balance after) equals the recomputed running balance;
  2. every account's coins and diamonds equal the sum of its ledger entries;
  3. the minted and held counters equal what the ledger says;
  4. every payout: gross = net + commission, a known status, exactly one payout entry for
     -gross from its owner, and a reversal entry for +gross if and only if it failed;
  5. coins minted by purchases = Σ coins + Σ diamonds + Σ diamonds held by payouts that
     have not failed.
Purchases made with sandbox receipts (development mode) count as minted like any other,
and are reported apart (``sandbox_minted``): no store was paid for those coins.

Consistent cuts, not a stop-the-world lock. Every script that moves money bumps the
ledger entry counter in the same atomic call, so reading some keys together with that
counter in one MULTI gives their state exactly as of ledger entry ``n``. Wallets and
payouts are read in such batches and compared with the ledger replayed up to each
batch's ``n``; the counters are read the same way before the scan. The payouts are listed
after the counter is read: a payout entry at or below it must name a listed payout, and
one written later (the payout was created while reconcile ran) must name a payout that
exists once the ledger has been read. Entries are read in pages with a progress bar, so
memory is bounded by the number of accounts and payouts, not by the number of entries.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import redis
import redis.cluster
from tqdm import tqdm

from livegift import keys

PAGE = 10_000
BATCH = 500

# kind -> (asset, sign of amount), as stored (bytes)
KINDS: dict[bytes, tuple[bytes, int]] = {
    b"purchase": (b"coins", 1),
    b"gift_debit": (b"coins", -1),
    b"gift_credit": (b"diamonds", 1),
    b"payout": (b"diamonds", -1),
    b"payout_reversal": (b"diamonds", 1),
}
PAYOUT_KINDS = (b"payout", b"payout_reversal")
STATUSES = ("pending", "paid", "failed")


@dataclass
class Report:
    entries: int = 0
    accounts: int = 0
    payouts: int = 0
    minted: int = 0
    coins: int = 0
    diamonds: int = 0
    held: int = 0
    # Coins minted by sandbox receipts (development mode), and how many such purchases.
    sandbox_minted: int = 0
    sandbox_purchases: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        holds = self.minted == self.coins + self.diamonds + self.held
        lines = [
            f"ledger entries: {self.entries:,}  accounts: {self.accounts:,}  "
            f"payouts: {self.payouts:,}  ({self.seconds:.2f}s)",
            f"minted {self.minted:,} = coins {self.coins:,} + diamonds {self.diamonds:,} "
            f"+ held by payouts {self.held:,}  ({'holds' if holds else 'FAILS'})",
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
class _Snapshot:
    """Live values read in one MULTI together with the ledger entry counter ``at``."""

    at: int
    values: dict[str, Any]


@dataclass
class _Replay:
    """The ledger replayed entry by entry: running balances and per-payout effects."""

    report: Report
    coins: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    diamonds: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    minted: int = 0
    held: int = 0
    last_id: int = 0
    last_sid: str = "-"
    pending_debit: dict[bytes, bytes] | None = None
    # payout id -> [(entry id, kind, account, amount)]
    payout_moves: dict[str, list[tuple[int, str, str, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    bad_running: set[tuple[str, bytes]] = field(default_factory=set)

    def problem(self, text: str) -> None:
        self.report.problems.append(text)

    def apply(self, sid: bytes, f: dict[bytes, bytes]) -> int:
        """Replay one entry; returns its id. Fields stay bytes: this runs a million times."""
        n = int(f.get(b"id", b"0"))
        if n != self.last_id + 1:
            self.problem(f"ledger entry {sid.decode()}: id {n} follows {self.last_id}")
        self.last_id, self.last_sid = n, sid.decode()
        kind, asset = f.get(b"kind", b""), f.get(b"asset", b"")
        account = f.get(b"account", b"").decode()
        amount, after = int(f.get(b"amount", b"0")), int(f.get(b"balance", b"0"))
        movement = KINDS.get(kind)
        if movement is None:
            self.problem(f"ledger entry {n}: unknown kind {kind.decode()!r}")
        elif movement != (asset, 1 if amount > 0 else -1):
            self.problem(
                f"ledger entry {n}: {kind.decode()} of {amount} {asset.decode()} "
                "is not a valid movement"
            )
        book = self.coins if asset == b"coins" else self.diamonds
        balance = book[account] = book[account] + amount
        if balance != after and (account, asset) not in self.bad_running:
            self.bad_running.add((account, asset))
            self.problem(
                f"account {account}: entry {n} says {asset.decode()} balance {after} "
                f"but the ledger sums to {balance}"
            )
        debit, self.pending_debit = self.pending_debit, None
        if debit is not None and not _pairs(debit, f):
            self.problem(f"ledger entry {_s(debit.get(b'id'))}: gift debit without its credit")
        if kind == b"gift_debit":
            self.pending_debit = f
        elif kind == b"gift_credit":
            if debit is None:
                self.problem(f"ledger entry {n}: gift credit without its debit")
        elif kind == b"purchase":
            self.minted += amount
            if f.get(b"counterparty") == b"sandbox":
                self.report.sandbox_minted += amount
                self.report.sandbox_purchases += 1
        elif kind in PAYOUT_KINDS:
            self.held -= amount
            ref = f.get(b"ref", b"").decode()
            self.payout_moves[ref].append((n, kind.decode(), account, amount))
        return n


def _pairs(debit: dict[bytes, bytes], credit: dict[bytes, bytes]) -> bool:
    """Is ``credit`` the gift credit written with ``debit`` by the same gift call?"""
    return (
        credit.get(b"kind") == b"gift_credit"
        and int(credit.get(b"amount", b"0")) == -int(debit.get(b"amount", b"0"))
        and credit.get(b"account") == debit.get(b"counterparty")
        and credit.get(b"counterparty") == debit.get(b"account")
        and credit.get(b"ref") == debit.get(b"ref")
    )


def _s(v: bytes | None) -> str:
    return v.decode() if v else ""


def _pages(client: Any, after: str) -> Iterator[list[tuple[bytes, dict[bytes, bytes]]]]:
    while True:
        rows = client.xrange(keys.LEDGER, min="-" if after == "-" else f"({after}", count=PAGE)
        if not rows:
            return
        yield rows
        after = rows[-1][0].decode()


def _snapshots(client: Any, names: list[str], read: Any) -> Iterator[_Snapshot]:
    """Read ``names`` in batches, each batch atomically with the ledger entry counter."""
    for i in range(0, len(names), BATCH):
        chunk = names[i : i + BATCH]
        with client.pipeline(transaction=True) as pipe:
            pipe.get(keys.ENTRY_SEQ)
            for name in chunk:
                read(pipe, name)
            at, *rows = pipe.execute()
        yield _Snapshot(int(at or 0), dict(zip(chunk, rows, strict=True)))


def reconcile(
    redis_client: redis.Redis | redis.cluster.RedisCluster, progress: TextIO | None = sys.stderr
) -> Report:
    """Check the live data store against its ledger; the report lists what disagrees."""
    client: Any = redis_client
    started = time.perf_counter()
    report = Report()
    replay = _Replay(report)
    counters = _Counters.read(client)
    bar = tqdm(
        total=int(client.xlen(keys.LEDGER)),
        unit="entry",
        desc="ledger",
        file=progress,
        disable=progress is None,
        mininterval=0.5,
    )
    _first_pass(client, replay, counters, bar)

    # Live wallets and payouts, batch by batch, each at a known ledger entry.
    users = {
        key.decode()[len(keys.WALLET_PREFIX) :]
        for key in client.scan_iter(match=keys.WALLET_PREFIX + "*", count=1000)
    }
    users |= set(replay.coins) | set(replay.diamonds)
    wallets = list(
        _snapshots(
            client,
            sorted(users),
            lambda pipe, user: pipe.hmget(keys.wallet(user), ["coins", "diamonds"]),
        )
    )
    listed_at, payout_ids = _list_payouts(client)
    payouts = list(_snapshots(client, payout_ids, lambda pipe, pid: pipe.hgetall(keys.payout(pid))))

    report.accounts = len(users)
    offsets = _catch_up(client, replay, wallets, bar)
    bar.close()
    if replay.pending_debit is not None:
        report.problems.append(
            f"ledger entry {_s(replay.pending_debit.get(b'id'))}: gift debit without its credit"
        )
    _check_payouts(client, payouts, listed_at, replay)
    _totals(report, replay, offsets, len(payout_ids))
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class _Counters:
    """The minted and held counters as of ledger entry ``at``."""

    at: int
    minted: int
    held: int

    @classmethod
    def read(cls, client: Any) -> _Counters:
        with client.pipeline(transaction=True) as pipe:
            pipe.get(keys.ENTRY_SEQ).get(keys.MINTED).get(keys.HELD)
            at, minted, held = pipe.execute()
        return cls(int(at or 0), int(minted or 0), int(held or 0))

    def check(self, replay: _Replay) -> None:
        """Compare with the ledger replayed up to entry ``at``."""
        if replay.minted != self.minted:
            replay.problem(
                f"minted counter {self.minted} but ledger purchases sum to {replay.minted} "
                f"(at entry {self.at})"
            )
        if replay.held != self.held:
            replay.problem(
                f"held counter {self.held} but ledger payouts hold {replay.held} "
                f"(at entry {self.at})"
            )


def _replay_from(client: Any, after: str, replay: _Replay, bar: Any) -> Iterator[int]:
    """Replay the entries after stream id ``after``, page by page; yields each entry's id."""
    for rows in _pages(client, after):
        bar.total = max(bar.total, bar.n + len(rows))
        for sid, fields in rows:
            yield replay.apply(sid, fields)
        bar.update(len(rows))


def _first_pass(client: Any, replay: _Replay, counters: _Counters, bar: Any) -> None:
    """Replay the whole ledger, checking the counters when the scan passes their entry."""
    counted = counters.at == 0
    if counted:
        counters.check(replay)
    for n in _replay_from(client, "-", replay, bar):
        if n >= counters.at and not counted:
            counted = True
            counters.check(replay)
    if replay.last_id < counters.at:
        replay.problem(
            f"ledger entry counter is {counters.at} but the ledger ends at entry {replay.last_id}"
        )


def _catch_up(client: Any, replay: _Replay, wallets: list[_Snapshot], bar: Any) -> dict[str, int]:
    """Replay the entries written meanwhile, comparing each wallet batch at its entry.

    Returns how far the live totals of coins and diamonds are off the ledger's."""
    offsets = {"coins": 0, "diamonds": 0}
    pending = iter(wallets)
    batch = next(pending, None)

    def check_wallets_upto(n: int) -> None:
        nonlocal batch
        while batch is not None and batch.at <= n:
            _check_wallets(batch, replay, offsets)
            batch = next(pending, None)

    check_wallets_upto(replay.last_id)
    for n in _replay_from(client, replay.last_sid, replay, bar):
        check_wallets_upto(n)
    while batch is not None:
        replay.problem(
            f"wallets read at entry {batch.at} but the ledger ends at entry {replay.last_id}"
        )
        batch = next(pending, None)
    return offsets


def _list_payouts(client: Any) -> tuple[int, list[str]]:
    """The ledger entry counter, then the ids of the payouts, read in that order.

    A payout entry at or below the counter was written, with its payout, before the SCAN
    began, so the SCAN returns that payout (payouts are never deleted). A payout created
    later may or may not be listed, and its entry may still be read by the catch-up."""
    listed_at = int(client.get(keys.ENTRY_SEQ) or 0)
    ids = sorted(
        key.decode()[len(keys.PAYOUT_PREFIX) :]
        for key in client.scan_iter(match=keys.PAYOUT_PREFIX + "*", count=1000)
    )
    return listed_at, ids


def _check_payouts(client: Any, payouts: list[_Snapshot], listed_at: int, replay: _Replay) -> None:
    """Check the payouts read; every payout the ledger moves diamonds for must exist.

    A payout whose first entry is at or below ``listed_at`` must be one that was read. A
    later one was created after the listing began; it must exist now, once the ledger has
    been read past its entry (``payout_moves`` holds only replayed entries)."""
    found: set[str] = set()
    for snap in payouts:
        for pid, raw in snap.values.items():
            _check_payout(pid, raw, snap.at, replay)
            if raw:
                found.add(pid)
    unread = set(replay.payout_moves) - found
    early = {pid for pid in unread if replay.payout_moves[pid][0][0] <= listed_at}
    for pid in sorted(early | _absent(client, unread - early)):
        replay.problem(f"ledger moves diamonds for payout {pid}, which does not exist")


def _absent(client: Any, payout_ids: set[str]) -> set[str]:
    """The ones among ``payout_ids`` that have no payout hash now."""
    ids = sorted(payout_ids)
    if not ids:
        return set()
    with client.pipeline(transaction=False) as pipe:
        for pid in ids:
            pipe.exists(keys.payout(pid))
        there = pipe.execute()
    return {pid for pid, n in zip(ids, there, strict=True) if not n}


def _totals(report: Report, replay: _Replay, offsets: dict[str, int], payouts: int) -> None:
    """Fill in the report's totals and check the invariant of PROTOCOL §2."""
    report.payouts = payouts
    report.entries = replay.last_id
    report.minted = replay.minted
    report.held = replay.held
    report.coins = sum(replay.coins.values()) + offsets["coins"]
    report.diamonds = sum(replay.diamonds.values()) + offsets["diamonds"]
    if report.minted != report.coins + report.diamonds + report.held:
        report.problems.append(
            f"invariant fails: minted {report.minted} != coins {report.coins} + diamonds "
            f"{report.diamonds} + held {report.held}"
        )


def _check_wallets(snap: _Snapshot, replay: _Replay, offsets: dict[str, int]) -> None:
    """Compare wallets read at entry ``snap.at`` with the ledger replayed to that entry."""
    for user, (coins_raw, diamonds_raw) in snap.values.items():
        for asset, raw, book in (
            ("coins", coins_raw, replay.coins),
            ("diamonds", diamonds_raw, replay.diamonds),
        ):
            live, ledger = int(raw or 0), book.get(user, 0)
            if live != ledger:
                replay.problem(f"account {user}: {asset} {live} but ledger says {ledger}")
                offsets[asset] += live - ledger
            if live < 0:
                replay.problem(f"account {user}: negative {asset} balance {live}")


def _check_payout(pid: str, raw: dict[bytes, bytes], at: int, replay: _Replay) -> None:
    if not raw:
        return  # gone by the read: _check_payouts reports it if the ledger moves any for it
    problem = replay.problem
    status, user = _s(raw.get(b"status")), _s(raw.get(b"user"))
    gross, net, commission = (int(raw.get(k, b"0")) for k in (b"gross", b"net", b"commission"))
    if gross != net + commission:
        problem(f"payout {pid}: gross {gross} != net {net} + commission {commission}")
    if gross <= 0 or net < 0 or commission < 0:
        problem(f"payout {pid}: gross {gross}, net {net}, commission {commission} out of range")
    if status not in STATUSES:
        problem(f"payout {pid}: unknown status {status!r}")
    moves = [m for m in replay.payout_moves.get(pid, []) if m[0] <= at]
    out = [m for m in moves if m[1] == "payout"]
    back = [m for m in moves if m[1] == "payout_reversal"]
    if len(out) != 1 or out[0][2] != user or out[0][3] != -gross:
        problem(f"payout {pid}: expected one payout entry of -{gross} from {user}, got {out}")
    want_back = 1 if status == "failed" else 0
    if len(back) != want_back or any(m[2] != user or m[3] != gross for m in back):
        problem(f"payout {pid} is {status}: expected {want_back} reversal of +{gross}, got {back}")
