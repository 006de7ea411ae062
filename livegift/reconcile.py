"""``livegift reconcile``: recompute every balance from the ledger and check PROTOCOL §2.

Checks, against the live data store (it may be taking gifts while this runs):
  1. the ledger itself: entry ids run 1, 2, 3, ... with no gap; each kind moves the right
     asset in the right direction; every gift debit is followed by its matching credit;
     every entry's ``balance`` (balance after) equals the recomputed running balance;
  2. every account's coins and diamonds equal the sum of its ledger entries;
  3. the minted and held counters equal what the ledger says;
  4. every payout: gross = net + commission, a known status, exactly one payout entry for
     -gross from its owner, and a reversal entry for +gross if and only if it failed;
  5. coins minted by purchases = Σ coins + Σ diamonds + Σ diamonds held by payouts that
     have not failed.

Consistent cuts, not a stop-the-world lock. Every script that moves money bumps the
ledger entry counter in the same atomic call, so reading some keys together with that
counter in one MULTI gives their state exactly as of ledger entry ``n``. Wallets and
payouts are read in such batches and compared with the ledger replayed up to each
batch's ``n``; the counters are read the same way before the scan. Entries are read in
pages with a progress bar, so memory is bounded by the number of accounts and payouts,
not by the number of entries.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import redis
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
        if KINDS.get(kind) != (asset, 1 if amount > 0 else -1):
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
        else:
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


def reconcile(redis_client: redis.Redis, progress: TextIO | None = sys.stderr) -> Report:
    client: Any = redis_client
    started = time.perf_counter()
    report = Report()
    replay = _Replay(report)

    # Counters as of entry n0, checked when the scan passes n0.
    with client.pipeline(transaction=True) as pipe:
        pipe.get(keys.ENTRY_SEQ).get(keys.MINTED).get(keys.HELD)
        n0_raw, minted_raw, held_raw = pipe.execute()
    n0, minted_counter, held_counter = int(n0_raw or 0), int(minted_raw or 0), int(held_raw or 0)

    def check_counters() -> None:
        if replay.minted != minted_counter:
            report.problems.append(
                f"minted counter {minted_counter} but ledger purchases sum to {replay.minted} "
                f"(at entry {n0})"
            )
        if replay.held != held_counter:
            report.problems.append(
                f"held counter {held_counter} but ledger payouts hold {replay.held} (at entry {n0})"
            )

    bar = tqdm(
        total=int(client.xlen(keys.LEDGER)),
        unit="entry",
        desc="ledger",
        file=progress,
        disable=progress is None,
        mininterval=0.5,
    )
    counted = n0 == 0
    if counted:
        check_counters()
    for rows in _pages(client, "-"):
        bar.total = max(bar.total, bar.n + len(rows))
        for sid, fields in rows:
            if replay.apply(sid, fields) >= n0 and not counted:
                counted = True
                check_counters()
        bar.update(len(rows))
    if replay.last_id < n0:
        report.problems.append(
            f"ledger entry counter is {n0} but the ledger ends at entry {replay.last_id}"
        )

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
    payout_ids = sorted(
        key.decode()[len(keys.PAYOUT_PREFIX) :]
        for key in client.scan_iter(match=keys.PAYOUT_PREFIX + "*", count=1000)
    )
    payouts = list(_snapshots(client, payout_ids, lambda pipe, pid: pipe.hgetall(keys.payout(pid))))

    # Catch up with entries written meanwhile, comparing each wallet batch at its entry.
    report.accounts = len(users)
    offsets = {"coins": 0, "diamonds": 0}
    pending = iter(wallets)
    batch = next(pending, None)

    def check_wallets_upto(n: int) -> None:
        nonlocal batch
        while batch is not None and batch.at <= n:
            _check_wallets(batch, replay, offsets)
            batch = next(pending, None)

    check_wallets_upto(replay.last_id)
    for rows in _pages(client, replay.last_sid):
        bar.total = max(bar.total, bar.n + len(rows))
        for sid, fields in rows:
            check_wallets_upto(replay.apply(sid, fields))
        bar.update(len(rows))
    bar.close()
    while batch is not None:
        report.problems.append(
            f"wallets read at entry {batch.at} but the ledger ends at entry {replay.last_id}"
        )
        batch = next(pending, None)
    if replay.pending_debit is not None:
        report.problems.append(
            f"ledger entry {_s(replay.pending_debit.get(b'id'))}: gift debit without its credit"
        )

    for snap in payouts:
        for pid, raw in snap.values.items():
            _check_payout(pid, raw, snap.at, replay)
    known = set(payout_ids)
    for pid in sorted(set(replay.payout_moves) - known):
        report.problems.append(f"ledger moves diamonds for payout {pid}, which does not exist")

    report.payouts = len(payout_ids)
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
    report.seconds = time.perf_counter() - started
    return report


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
        return  # deleted between the scan and the read; nothing to check
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
