"""Reconcile at scale, on the partitioned ledger (issue 4 item 4, issue 10 item 1).

Starts a fresh Redis-compatible server (``livegift.embedded.EmbeddedRedis``, so the same
binary and ``redis.conf`` as ``livegift serve``: AOF with fsync on every write), fills it
with about N ledger entries spread over the ``keys.PARTITIONS`` partitions, then times
``livegift.reconcile.reconcile()`` over the whole data set and reads its peak RSS.

The data is written by ``LedgerWriter``: plain commands, pipelined, in exactly the layout
the money scripts write (livegift/keys.py): purchases, gifts as two-step transfers
(debit and outbox record in the viewer's partition, credit and ``landed`` in the
creator's; a few voided and refunded; the last ones left in flight), payouts paid and
failed. It does not measure the scripts' own cost: the gift path is measured end to end
by ``python -m loadtest run`` (Redis CPU per acked gift). tests/test_reconcile.py writes
its data with the same writer.

Writes ``loadtest/results/reconcile.json``. Usage::

    .venv/bin/python -m loadtest.bench_reconcile                  # 1,000,000 entries
    .venv/bin/python -m loadtest.bench_reconcile --entries 100000 # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from livegift import embedded, keys
from livegift.embedded import EmbeddedRedis
from livegift.reconcile import reconcile

RESULTS = Path(__file__).resolve().parent / "results"
PIPELINE = 2000  # commands per round trip when not atomic
VOID_EVERY = 1000  # one gift in this many finds the room ended: voided, coins back
IN_FLIGHT = 100  # the last gifts are left debited, not landed


class LedgerWriter:
    """Ledger entries as the money scripts write them, with plain commands.

    It keeps its own copy of the entry counters, stream ids and balances it writes, so it
    must be the only writer of the partitions and accounts it touches (fresh ids). With
    ``atomic``, each step is one MULTI on one partition's keys (one slot), as a script is;
    else commands are queued and sent in pipelines (``flush()`` sends the rest).
    ``balance`` and the other keyword overrides write a wrong entry, for tests."""

    def __init__(self, client: Any, atomic: bool = False) -> None:
        self.client = client
        self.atomic = atomic
        with client.pipeline(transaction=False) as pipe:
            for p in range(keys.PARTITIONS):
                pipe.get(keys.entry_seq(p))
                pipe.xrevrange(keys.ledger(p), count=1)
            replies = pipe.execute()
        self.n = [int(n or 0) for n in replies[::2]]
        self.last = [_sid_of(rows) for rows in replies[1::2]]
        self.balances: dict[tuple[str, str], int] = {}
        self.transfers: dict[int, dict[str, Any]] = {}
        self.pipe = client.pipeline(transaction=False)
        self.queued = 0

    # -- steps -----------------------------------------------------------------------------

    def purchase(self, user: str, coins: int, txn: str, sandbox: bool = False) -> int:
        pipe = self._step()
        eid = self.entry(
            pipe, user, "purchase", "coins", coins, "sandbox" if sandbox else "store", txn
        )
        pipe.incrby(keys.minted(keys.user_partition(user)), coins)
        self._done(pipe)
        return eid

    def send(
        self, viewer: str, creator: str, room: str, req: str, cost: int, outbox: bool = True
    ) -> int:
        """Step 1 of a gift, in the viewer's partition: the debit and the outbox record."""
        pipe = self._step()
        x = self.entry(pipe, viewer, "gift_debit", "coins", -cost, creator, req, room, xfer=None)
        record = {
            "xfer": str(x),
            "user": viewer,
            "name": viewer,
            "creator": creator,
            "room": room,
            "req": req,
            "gift": "rose",
            "gift_name": "Rose",
            "gift_coins": cost,
            "streakable": True,
            "count": 1,
            "cost": cost,
            "ts": _now_ms(),
        }
        if outbox:
            pipe.hset(keys.outbox(keys.user_partition(viewer)), str(x), json.dumps(record))
        self._done(pipe)
        self.transfers[x] = record
        return x

    def land(self, x: int, seq: int = 1, keep: bool = False) -> int:
        """Step 2 in the creator's partition: the credit and ``landed`` (``keep``: the
        transfer can be landed or voided again, for tests)."""
        t = self.transfers[x] if keep else self.transfers.pop(x)
        pipe = self._step()
        creator = t["creator"]
        eid = self.entry(
            pipe,
            creator,
            "gift_credit",
            "diamonds",
            t["cost"],
            t["user"],
            t["req"],
            t["room"],
            xfer=str(x),
        )
        pipe.set(keys.landed(keys.user_partition(creator), str(x)), f"{seq} 1")
        self._done(pipe)
        return eid

    def drop_outbox(self, x: int, viewer: str) -> None:
        """What the server does, batched, some time after a landing."""
        pipe = self._step()
        pipe.hdel(keys.outbox(keys.user_partition(viewer)), str(x))
        self._done(pipe)

    def void(self, x: int, keep: bool = False) -> int:
        """The room was not live: ``landed`` says void, then step 3 refunds the viewer."""
        t = self.transfers[x] if keep else self.transfers.pop(x)
        pipe = self._step()
        pipe.set(keys.landed(keys.user_partition(t["creator"]), str(x)), "void")
        self._done(pipe)
        pipe = self._step()
        eid = self.entry(
            pipe,
            t["user"],
            "gift_refund",
            "coins",
            t["cost"],
            t["creator"],
            t["req"],
            t["room"],
            xfer=str(x),
        )
        pipe.hdel(keys.outbox(keys.user_partition(t["user"])), str(x))
        self._done(pipe)
        return eid

    def payout(self, user: str, pid: str, gross: int, status: str = "pending") -> None:
        """A payout in its user's partition; a failed one gives its diamonds back."""
        p = keys.user_partition(user)
        assert keys.payout_partition(pid) == p, "a payout id names its user's partition"
        net = gross // 2
        pipe = self._step()
        self.entry(pipe, user, "payout", "diamonds", -gross, "payouts", pid)
        pipe.incrby(keys.held(p), gross)
        now = _now_ms()
        pipe.hset(
            keys.payout(pid),
            mapping={
                "id": pid,
                "user": user,
                "gross": gross,
                "net": net,
                "commission": gross - net,
                "status": status,
                "day": time.strftime("%Y%m%d", time.gmtime(now / 1000)),
                "created": now,
                "json": "{}",
            },
        )
        pipe.zadd(keys.payouts(user), {pid: now})
        if status == "failed":
            self.entry(pipe, user, "payout_reversal", "diamonds", gross, "payouts", pid)
            pipe.decrby(keys.held(p), gross)
        self._done(pipe)

    def flush(self) -> None:
        if self.queued:
            self.pipe.execute()
            self.queued = 0

    # -- one entry -------------------------------------------------------------------------

    def entry(
        self,
        pipe: Any,
        user: str,
        kind: str,
        asset: str,
        amount: int,
        counterparty: str,
        ref: str,
        room: str = "",
        xfer: str | None = "",
        balance: int | None = None,
    ) -> int:
        """Queue one entry of ``user``'s partition (``xfer=None``: its own id, as a debit
        has); returns its id."""
        p = keys.user_partition(user)
        self.n[p] += 1
        eid = self.n[p] * keys.PARTITIONS + p
        after = self.balances[user, asset] = self.balances.get((user, asset), 0) + amount
        sid = self._next_sid(p)
        pipe.incr(keys.entry_seq(p))
        pipe.xadd(
            keys.ledger(p),
            {
                "id": eid,
                "ts": _now_ms(),
                "kind": kind,
                "account": user,
                "asset": asset,
                "amount": amount,
                "balance": after if balance is None else balance,
                "counterparty": counterparty,
                "ref": ref,
                "room": room,
                "xfer": str(eid) if xfer is None else xfer,
            },
            id=sid,
        )
        pipe.zadd(keys.account(user), {sid: eid})
        pipe.hincrby(keys.wallet(user), asset, amount)
        self.queued += 4
        return eid

    def _next_sid(self, p: int) -> str:
        ms, seq = self.last[p]
        now = _now_ms()
        ms, seq = (now, 0) if now > ms else (ms, seq + 1)
        self.last[p] = (ms, seq)
        return f"{ms}-{seq}"

    def _step(self) -> Any:
        return self.client.pipeline(transaction=True) if self.atomic else self.pipe

    def _done(self, pipe: Any) -> None:
        if self.atomic:
            pipe.execute()
            self.queued = 0
        elif self.queued >= PIPELINE:
            self.flush()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _sid_of(rows: list[tuple[bytes, Any]]) -> tuple[int, int]:
    if not rows:
        return (0, 0)
    ms, seq = rows[0][0].split(b"-")
    return int(ms), int(seq)


# -- the benchmark -----------------------------------------------------------------------


def fill(writer: LedgerWriter, entries: int, users: int, rooms: int) -> dict[str, int]:
    """Purchases, then one-coin gifts round robin over the rooms, then payouts."""
    viewers = [f"v{i:06d}" for i in range(users)]
    creators = [f"c{i:04d}" for i in range(rooms)]
    room_ids = [keys.new_room_id(c, f"bench{i:04d}") for i, c in enumerate(creators)]
    for i, user in enumerate(viewers):
        writer.purchase(user, 6607, f"bench-{i}")
    gifts = max(0, (entries - users - 3 * rooms) // 2)
    for i in range(gifts):
        r = (i // users) % rooms
        viewer = viewers[i % users]
        x = writer.send(viewer, creators[r], room_ids[r], f"b{i}", 1)
        if i >= gifts - IN_FLIGHT:
            continue
        if i % VOID_EVERY == VOID_EVERY - 1:
            writer.void(x)
        else:
            writer.land(x, seq=i + 1)
            writer.drop_outbox(x, viewer)
        if i % 50_000 == 0 and i:
            print(f"  {i:>10,} gifts", file=sys.stderr, flush=True)
    for i, creator in enumerate(creators):
        earned = writer.balances.get((creator, "diamonds"), 0)
        if earned >= 2:
            writer.payout(creator, keys.new_payout_id(creator, f"p{i}"), earned // 2, "paid")
            writer.payout(creator, keys.new_payout_id(creator, f"f{i}"), earned // 2, "failed")
    writer.flush()
    return {"purchases": users, "gifts": gifts, "in_flight": min(gifts, IN_FLIGHT)}


def server_version(client: redis.Redis) -> str:
    info: Any = client.info("server")
    name = "valkey" if "valkey_version" in info else "redis"
    return f"{name} {info.get('valkey_version') or info.get('redis_version')}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--rooms", type=int, default=100)
    p.add_argument("--out", type=Path, default=RESULTS / "reconcile.json")
    p.add_argument(
        "--server",
        help="redis-server or valkey-server binary (default: what `livegift serve` would pick)",
    )
    args = p.parse_args(argv)
    if args.server:
        binary = args.server
        embedded.find_server_binary = lambda: binary

    tmp = tempfile.TemporaryDirectory(prefix="lg-bench-")
    server = EmbeddedRedis(Path(tmp.name))
    url = server.start()
    client = redis.Redis.from_url(url)
    result: dict[str, Any] = {
        "target_entries": args.entries,
        "users": args.users,
        "rooms": args.rooms,
        "partitions": keys.PARTITIONS,
        "server": f"{server_version(client)} ({server.binary})",
        "config": "livegift redis.conf: appendonly yes, appendfsync always",
        "host": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "load_before": os.getloadavg(),
    }
    try:
        t0 = time.perf_counter()
        counts = fill(LedgerWriter(client), args.entries, args.users, args.rooms)
        t1 = time.perf_counter()
        memory: Any = client.info("memory")
        entries = sum(int(client.xlen(keys.ledger(q))) for q in range(keys.PARTITIONS))
        result["fill"] = {
            "entries": entries,
            **counts,
            "seconds": round(t1 - t0, 1),
            "entries_per_s": round(entries / (t1 - t0)),
            "used_memory": memory["used_memory_human"],
        }
        print(f"reconcile over {entries:,} entries ...", file=sys.stderr, flush=True)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t2 = time.perf_counter()
        report = reconcile(client, progress=sys.stderr)
        t3 = time.perf_counter()
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["reconcile"] = {
            "entries": report.entries,
            "accounts": report.accounts,
            "in_flight": report.in_flight,
            "seconds": round(t3 - t2, 2),
            "entries_per_s": round(report.entries / (t3 - t2)),
            "ok": report.ok,
            "problems": report.problems[:20],
            "max_rss_mb": round(rss_after / 1024, 1),
            "max_rss_growth_mb": round((rss_after - rss_before) / 1024, 1),
            "load_after": os.getloadavg(),
        }
        cli = subprocess.run(
            [sys.executable, "-m", "livegift", "reconcile", "--quiet", "--json"],
            env={**os.environ, "REDIS_URL": url},
            capture_output=True,
            text=True,
            check=False,
        )
        result["reconcile"]["cli_exit"] = cli.returncode
        print(report.render(), file=sys.stderr)
    finally:
        client.close()
        server.stop()
        tmp.cleanup()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result.get("reconcile", {}).get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
