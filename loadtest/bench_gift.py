"""Redis CPU per gift: the data store's own cost of the money path, without a server.

    python -m loadtest.bench_gift [--gifts 20000] [--rooms 50] [--viewers 200]
        [--concurrency 200] [--redis-cpus 1] [--out loadtest/results]

Starts a private embedded Valkey (livegift's own, with the repo's redis.conf: AOF with
``appendfsync always``), makes ``--rooms`` live rooms and ``--viewers`` viewers with coins,
then sends ``--gifts`` gifts through ``Ledger.gift`` with ``--concurrency`` in flight
(so they batch as they do in a server), and reads the Valkey process's CPU time
(user + system, from /proc) before and after. CPU time is what the process used, not
wall time, so other load on the machine changes it much less than a latency; the
machine's load average is printed and written beside the figure anyway. Writes
``<stamp>-bench-gift.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from livegift import auth
from livegift.auth import User
from livegift.catalog import default_catalog
from livegift.config import Settings
from livegift.embedded import EmbeddedRedis
from livegift.ledger import Ledger
from livegift.store import connect
from livegift.streams import Streams

SECRET = "bench-secret-0123456789-0123456789-abcdef"
PAYMENT = "bench-payment-secret-0123456789-0123456789"


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


async def _run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    settings = Settings(
        secret=SECRET, payment_secret=PAYMENT, gift_rate=100_000, gift_burst=100_000
    )
    client = await connect(url, 64)
    if args.appendfsync:
        await client.config_set("appendfsync", args.appendfsync)
    catalog = default_catalog()
    ledger = Ledger(client, settings, catalog)
    streams = Streams(client, settings, ledger.scripts)
    await ledger.scripts.load()
    rooms = []
    for i in range(args.rooms):
        creator = User(f"bc{i}", f"C{i}", auth.parse_birthdate("1990-01-01"))
        room, _ = await streams.start_stream(creator, "bench")
        rooms.append((room, creator.id))
    viewers = []
    for i in range(args.viewers):
        v = User(f"bv{i}", f"V{i}", auth.parse_birthdate("1990-01-01"))
        for _ in range(3):
            token = auth.mint_receipt(PAYMENT, catalog, v.id, "p6607", sandbox=False)
            await ledger.recharge(auth.verify_receipt(PAYMENT, catalog, token, v))
        viewers.append(v)
    rose = catalog.gift("rose")
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(args.gifts):
        queue.put_nowait(n)

    async def worker() -> None:
        while not queue.empty():
            n = queue.get_nowait()
            v = viewers[n % len(viewers)]
            room, creator = rooms[n % len(rooms)]
            await ledger.gift(v, room, f"b{n}", rose, 1, adult=True, creator=creator)

    pid = int((await client.info("server"))["process_id"])
    await client.config_resetstat()
    load_before = os.getloadavg()
    cpu0, t0 = _cpu(pid), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    if hasattr(ledger, "aclose"):  # the outboxes' clean-up is part of the cost
        await ledger.aclose()
    seconds = time.perf_counter() - t0
    cpu = _cpu(pid) - cpu0
    stats = await client.info("commandstats")
    per_gift = {
        name.removeprefix("cmdstat_"): round(v["usec"] / args.gifts, 1)
        for name, v in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:12]
    }
    calls = {
        name.removeprefix("cmdstat_"): round(v["calls"] / args.gifts, 2)
        for name, v in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:12]
    }
    await client.aclose()
    return {
        "gifts": args.gifts,
        "appendfsync": args.appendfsync or "always",
        "seconds": round(seconds, 3),
        "gifts_per_s": round(args.gifts / seconds),
        "redis_cpu_s": round(cpu, 3),
        "redis_cpu_us_per_gift": round(cpu / args.gifts * 1e6, 1),
        "command_usec_per_gift": per_gift,
        "command_calls_per_gift": calls,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gifts", type=int, default=20_000)
    p.add_argument("--rooms", type=int, default=50)
    p.add_argument("--viewers", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--redis-cpus", default=None, help="taskset -c for the Valkey server")
    p.add_argument(
        "--appendfsync",
        choices=("always", "everysec", "no"),
        default=None,
        help="CONFIG SET appendfsync first (default: redis.conf's, always)",
    )
    p.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gift-") as tmp:
        server = EmbeddedRedis(Path(tmp))
        url = server.start()
        try:
            if args.redis_cpus and server.process is not None:
                subprocess.run(
                    ["taskset", "-pc", args.redis_cpus, str(server.process.pid)],
                    check=True,
                    capture_output=True,
                )
            result = asyncio.run(_run(args, url))
        finally:
            server.stop()
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"{stamp}-bench-gift.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
