"""Reconcile at scale, and the gift script's own cost (issue 4 items 4 and the closing note).

Starts a fresh Redis-compatible server (``livegift.embedded.EmbeddedRedis``, so the same
binary and ``redis.conf`` as ``livegift serve``: AOF with fsync on every write), fills it
with N ledger entries through the real Lua scripts (pipelined EVALSHA of ``recharge`` and
``gift``), then:

- reads ``INFO commandstats`` while the fill runs pure gifts (after ``CONFIG RESETSTAT``),
  so ``cmdstat_evalsha`` is the gift script alone: its ``usec_per_call`` is the server
  time one gift costs, every ``redis.call`` inside it included;
- times ``livegift.reconcile.reconcile()`` over the whole data set.

Writes ``loadtest/results/reconcile.json``. Usage::

    .venv/bin/python -m loadtest.bench_reconcile                  # 1,000,000 entries
    .venv/bin/python -m loadtest.bench_reconcile --entries 100000 # a quick run

The keys and arguments below mirror ``Ledger.recharge`` and ``Ledger.gift``, packed with
``livegift.pipeline.pack_evalsha`` and written in batches on one connection as the server's
gift pipeline does; ``reconcile()`` passing at the end shows that they agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from livegift import embedded, keys
from livegift.auth import Receipt, User
from livegift.catalog import default_catalog
from livegift.config import Settings
from livegift.embedded import EmbeddedRedis
from livegift.ledger import gift_call, recharge_call
from livegift.pipeline import pack_evalsha
from livegift.reconcile import reconcile
from livegift.scripts import script_source
from livegift.streams import stream_start_call

RESULTS = Path(__file__).resolve().parent / "results"
PIPELINE = 1000
SAMPLE_EVERY = 50_000  # gifts between commandstats samples


def commandstats(client: redis.Redis) -> dict[str, dict[str, float]]:
    raw: Any = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): dict(v) for name, v in raw.items()}


class Filler:
    def __init__(self, client: redis.Redis, settings: Settings, users: int, rooms: int) -> None:
        self.client = client
        self.settings = settings
        self.catalog = default_catalog()
        self.sha = {
            name: str(client.script_load(script_source(name)))
            for name in ("recharge", "gift", "stream_start")
        }
        self.viewers = [f"v{i:06d}" for i in range(users)]
        self.creators = [f"c{i:04d}" for i in range(rooms)]
        self.rooms = [f"room{i:04d}" for i in range(rooms)]
        self.rose = self.catalog.gift("rose")
        self.reqs = 0

    def start_rooms(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        for room, creator in zip(self.rooms, self.creators, strict=True):
            keys_, args = stream_start_call(
                self.settings, User(creator, creator), "bench", room, live=""
            )
            pipe.evalsha(self.sha["stream_start"], len(keys_), *keys_, *args)
        pipe.execute()

    def send(self, commands: list[bytes]) -> None:
        """Write packed commands in one go on one connection; raise on any error reply."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([b"".join(commands)])  # type: ignore[no-untyped-call]
            errors = []
            for _ in commands:
                try:
                    conn.read_response()
                except redis.ResponseError as exc:
                    errors.append(exc)
        finally:
            pool.release(conn)
        if errors:
            raise errors[0]

    def purchases(self, package: str = "p6607") -> int:
        """Every viewer buys one package: one ledger entry each."""
        price_list = self.catalog.price_list("US")
        pkg = price_list.package(package)
        for start in range(0, len(self.viewers), PIPELINE):
            batch = []
            for user in self.viewers[start : start + PIPELINE]:
                txn = f"bench-{user}-{package}"
                receipt = Receipt(
                    txn, user, pkg.id, "US", pkg.price, price_list.currency, pkg.coins
                )
                batch.append(pack_evalsha(self.sha["recharge"], *recharge_call(receipt)))
            self.send(batch)
        return len(self.viewers)

    def _gift(self, user: str, room_i: int, count: int) -> bytes:
        room, creator = self.rooms[room_i], self.creators[room_i]
        self.reqs += 1
        keys_, args = gift_call(
            self.settings, User(user, user), room, f"b{self.reqs}", self.rose, count, True, creator
        )
        return pack_evalsha(self.sha["gift"], keys_, args)

    def gifts(self, n: int, on_progress: Callable[[int], None]) -> None:
        """n one-rose gifts (two entries each), viewers round-robin over the rooms."""
        done = 0
        users, rooms = len(self.viewers), len(self.rooms)
        while done < n:
            batch = min(PIPELINE, n - done)
            self.send(
                [
                    self._gift(self.viewers[i % users], (i // users) % rooms, 1)
                    for i in range(done, done + batch)
                ]
            )
            done += batch
            on_progress(done)


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

    settings = Settings(gift_rate=1_000_000_000, gift_burst=1_000_000_000)
    gifts = max(0, (args.entries - args.users) // 2)
    tmp = tempfile.TemporaryDirectory(prefix="lg-bench-")
    server = EmbeddedRedis(Path(tmp.name))
    url = server.start()
    client = redis.Redis.from_url(url)
    result: dict[str, Any] = {
        "target_entries": args.entries,
        "users": args.users,
        "rooms": args.rooms,
        "server": f"{server_version(client)} ({server.binary})",
        "config": "livegift redis.conf: appendonly yes, appendfsync always",
        "host": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
    }
    try:
        filler = Filler(client, settings, args.users, args.rooms)
        filler.start_rooms()
        t0 = time.perf_counter()
        client.config_resetstat()
        filler.purchases()
        recharge = commandstats(client).get("evalsha", {})
        t1 = time.perf_counter()

        client.config_resetstat()
        samples: list[dict[str, float]] = []
        last = {"calls": 0.0, "usec": 0.0, "t": time.perf_counter(), "gifts": 0}

        def progress(done: int) -> None:
            if done - int(last["gifts"]) < SAMPLE_EVERY and done < gifts:
                return
            ev = commandstats(client).get("evalsha", {"calls": 0, "usec": 0})
            now = time.perf_counter()
            calls, usec = ev["calls"] - last["calls"], ev["usec"] - last["usec"]
            samples.append(
                {
                    "gifts": done,
                    "entries": args.users + 2 * done,
                    "usec_per_call": round(usec / calls, 2) if calls else 0.0,
                    "gifts_per_s": round((done - last["gifts"]) / (now - last["t"])),
                }
            )
            last.update(calls=ev["calls"], usec=ev["usec"], t=now, gifts=done)
            print(
                f"  {args.users + 2 * done:>10,} entries  gift script "
                f"{samples[-1]['usec_per_call']} us/call  {samples[-1]['gifts_per_s']:,} gifts/s",
                file=sys.stderr,
                flush=True,
            )

        filler.gifts(gifts, progress)
        t2 = time.perf_counter()
        stats = commandstats(client)
        inner = {
            name: {"calls": int(v["calls"]), "usec_per_call": v["usec_per_call"]}
            for name, v in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:12]
        }
        entries = int(client.xlen(keys.LEDGER))
        memory: Any = client.info("memory")
        result["fill"] = {
            "entries": entries,
            "purchases": args.users,
            "gifts": gifts,
            "seconds": round(t2 - t0, 1),
            "entries_per_s": round(entries / (t2 - t0)),
            "gifts_per_s": round(gifts / (t2 - t1)) if gifts else 0,
            "used_memory": memory["used_memory_human"],
        }
        result["recharge_script"] = {
            "calls": int(recharge.get("calls", 0)),
            "usec_per_call": recharge.get("usec_per_call"),
        }
        result["gift_script"] = {
            "calls": int(stats["evalsha"]["calls"]),
            "usec_per_call": stats["evalsha"]["usec_per_call"],
            "samples": samples,
            "commandstats_top_by_time": inner,
            "note": "cmdstat_evalsha after CONFIG RESETSTAT over a run of gifts only; "
            "includes every redis.call inside the script, excludes network and fsync",
        }

        print(f"reconcile over {entries:,} entries ...", file=sys.stderr, flush=True)
        t3 = time.perf_counter()
        report = reconcile(client, progress=sys.stderr)
        t4 = time.perf_counter()
        result["reconcile"] = {
            "entries": report.entries,
            "accounts": report.accounts,
            "seconds": round(t4 - t3, 2),
            "entries_per_s": round(report.entries / (t4 - t3)),
            "ok": report.ok,
            "problems": report.problems[:20],
            "rss_note": "bounded by accounts and payouts, not entries",
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
