"""``livegift reconcile``: recompute every balance from the ledger and check PROTOCOL §2.

Checks, against the live data store:
  1. every account's coins and diamonds equal the sum of its ledger entries;
  2. coins minted by purchases = Σ coins + Σ diamonds + Σ diamonds held by payouts that
     have not failed (and the minted and held counters equal what the ledger says);
  3. every payout's gross = net + commission, and its status is pending, paid or failed.
Entries are read in pages with a progress bar, so it runs in bounded memory on large data.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, TextIO

import redis
from tqdm import tqdm

from livegift import keys

PAGE = 10_000


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
        lines = [
            f"ledger entries: {self.entries:,}  accounts: {self.accounts:,}  "
            f"payouts: {self.payouts:,}  ({self.seconds:.2f}s)",
            f"minted {self.minted:,} = coins {self.coins:,} + diamonds {self.diamonds:,} "
            f"+ held by payouts {self.held:,}  "
            f"({'holds' if self.minted == self.coins + self.diamonds + self.held else 'FAILS'})",
        ]
        if self.ok:
            lines.append("OK: every balance matches its ledger and the invariant holds")
        else:
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
            lines += [f"  - {p}" for p in self.problems[:200]]
            if len(self.problems) > 200:
                lines.append(f"  ... and {len(self.problems) - 200} more")
        return "\n".join(lines)


def _s(v: bytes | None) -> str:
    return v.decode() if v else ""


def reconcile(redis_client: redis.Redis, progress: TextIO | None = sys.stderr) -> Report:
    client: Any = redis_client
    started = time.perf_counter()
    report = Report()
    ledger_coins: dict[str, int] = defaultdict(int)
    ledger_diamonds: dict[str, int] = defaultdict(int)
    minted_by_ledger = 0
    held_by_ledger = 0
    total = int(client.xlen(keys.LEDGER))
    bar = tqdm(
        total=total,
        unit="entry",
        desc="ledger",
        file=progress,
        disable=progress is None,
        mininterval=0.5,
    )
    last = "-"
    while True:
        rows = client.xrange(keys.LEDGER, min=last if last == "-" else f"({last}", count=PAGE)
        if not rows:
            break
        for sid, f in rows:
            account = _s(f[b"account"])
            amount = int(f[b"amount"])
            kind = _s(f[b"kind"])
            if f[b"asset"] == b"coins":
                ledger_coins[account] += amount
            else:
                ledger_diamonds[account] += amount
            if kind == "purchase":
                minted_by_ledger += amount
            elif kind == "payout" or kind == "payout_reversal":
                held_by_ledger -= amount
            last = sid.decode()
        report.entries += len(rows)
        bar.update(len(rows))
    bar.close()

    wallets: dict[str, tuple[int, int]] = {}
    for key in client.scan_iter(match=keys.WALLET_PREFIX + "*", count=1000):
        user = key.decode()[len(keys.WALLET_PREFIX) :]
        coins, diamonds = client.hmget(key, ["coins", "diamonds"])
        wallets[user] = (int(coins or 0), int(diamonds or 0))
    report.accounts = len(set(wallets) | set(ledger_coins) | set(ledger_diamonds))
    for user in sorted(set(wallets) | set(ledger_coins) | set(ledger_diamonds)):
        coins, diamonds = wallets.get(user, (0, 0))
        if coins != ledger_coins.get(user, 0):
            report.problems.append(
                f"account {user}: coins {coins} but ledger says {ledger_coins.get(user, 0)}"
            )
        if diamonds != ledger_diamonds.get(user, 0):
            report.problems.append(
                f"account {user}: diamonds {diamonds} but ledger says "
                f"{ledger_diamonds.get(user, 0)}"
            )
        if coins < 0 or diamonds < 0:
            report.problems.append(f"account {user}: negative balance")
        report.coins += coins
        report.diamonds += diamonds

    held_by_payouts = 0
    for key in client.scan_iter(match=keys.PAYOUT_PREFIX + "*", count=1000):
        p = client.hgetall(key)
        report.payouts += 1
        pid, status = _s(p.get(b"id")), _s(p.get(b"status"))
        gross, net, commission = (int(p.get(k, 0)) for k in (b"gross", b"net", b"commission"))
        if gross != net + commission:
            report.problems.append(
                f"payout {pid}: gross {gross} != net {net} + commission {commission}"
            )
        if status not in ("pending", "paid", "failed"):
            report.problems.append(f"payout {pid}: unknown status {status!r}")
        if status != "failed":
            held_by_payouts += gross

    report.minted = int(client.get(keys.MINTED) or 0)
    report.held = held_by_payouts
    held_counter = int(client.get(keys.HELD) or 0)
    if report.minted != minted_by_ledger:
        report.problems.append(
            f"minted counter {report.minted} but ledger purchases sum to {minted_by_ledger}"
        )
    if held_counter != held_by_payouts or held_by_ledger != held_by_payouts:
        report.problems.append(
            f"held by payouts {held_by_payouts}, counter {held_counter}, ledger {held_by_ledger}"
        )
    if report.minted != report.coins + report.diamonds + report.held:
        report.problems.append(
            f"invariant fails: minted {report.minted} != coins {report.coins} + diamonds "
            f"{report.diamonds} + held {report.held}"
        )
    report.seconds = time.perf_counter() - started
    return report
