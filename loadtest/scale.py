"""``python -m loadtest scale``: the same gift load on Valkey Clusters of 1, 3, ... masters.

Why: issue 10 item 8 asks, in one run, for acked gifts/s and Redis CPU per master at 1 and
at 3 masters under the same offered load spread over many viewers and creators, and for
how evenly keys and commands spread over the masters. Each size is one ``run`` against a
fresh cluster (:mod:`loadtest.rcluster`: N masters, one replica each, so every money batch
ends with a WAIT); the rows go into one ``<stamp>-scale.json`` and ``<stamp>-scale.md``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from . import probes, report, runner

# The run settings that the summary repeats (the same for every cluster size).
PARAMS = ("viewers", "rooms", "gifters", "rate", "duration", "workers", "batch_ms",
          "server_cpus", "redis_cpus", "cluster_fsync")  # fmt: skip


def parse_masters(text: str) -> list[int]:
    """``"1,3"`` → [1, 3]; each at least 1."""
    sizes = [int(x) for x in text.split(",") if x.strip()]
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--masters wants cluster sizes of at least 1, such as 1,3: {text!r}")
    return sizes


def row(masters: int, res: dict[str, Any]) -> dict[str, Any]:
    """The comparison's figures from one run's result."""
    if "failed" in res or "redis_cluster" not in res:
        return {"masters": masters, "failed": res.get("failed", "no cluster figures"),
                "json": res.get("json")}  # fmt: skip
    rc, gifts, server = res["redis_cluster"], res["gifts"], res.get("server", {})
    ack = res.get("ack_latency_ms") or {}
    load = res.get("machine_load", {})
    wall = rc["wall_seconds"]
    reconcile = res.get("reconcile", {})
    return {
        "masters": masters,
        "offered_per_s": gifts["target_rate"],
        "sent": gifts["sent"],
        "acked_ok": gifts["acked_ok"],
        "not_acked_ok": gifts["sent"] - gifts["acked_ok"],
        "acked_per_s": gifts["acked_per_s"],
        "acked_per_s_steady": gifts["acked_per_s_steady"],
        "ack_p50_ms": ack.get("p50"),
        "ack_p99_ms": ack.get("p99"),
        "errors_by_code": res.get("errors_by_code", {}),
        "server_cpu_pct": server.get("cpu_pct_of_core"),
        "redis_cpu_pct_per_master": rc["cpu_pct_of_core_per_master"],
        "replicas_cpu_pct": round(100 * rc["cpu_s"]["replicas"] / wall, 1),
        "redis_cpu_pct_all": round(100 * rc["cpu_s"]["all"] / wall, 1),
        "redis_us_per_gift_all": rc["cpu_us_per_acked_gift"]["all"],
        "redis_us_per_gift_masters": rc["cpu_us_per_acked_gift"]["masters"],
        "spread_cpu": rc["spread"]["cpu"],
        "spread_commands": rc["spread"]["commands"],
        "spread_keys": rc["spread"]["keys"],
        "failover": rc["failover"],
        "other_load_pct": load.get("other_processes_pct_of_core"),
        "reconcile_ok": reconcile.get("ok") if reconcile.get("ran") else None,
        "json": res.get("json"),
    }


def scale(base: runner.RunConfig, sizes: list[int]) -> dict[str, Any]:
    """One run per cluster size, in order; the summary with every row, written to disk."""
    base.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    prefix = base.label or f"scale-v{base.viewers}-r{base.rooms}-g{base.gifters}-rate{base.rate:g}"
    results, rows = [], []
    for n in sizes:
        cfg = dataclasses.replace(
            base, spawn=True, url=None, kind="livegift", cluster_masters=n, label=f"{prefix}-m{n}"
        )
        res = runner.run(cfg)
        results.append(res)
        rows.append(row(n, res))
    params = {k: getattr(base, k) for k in PARAMS}
    params["client_cpus"] = client_cpus()
    params["masters"] = sizes
    table = report.scale_markdown(rows, params)
    md = base.out / f"{stamp}-{prefix}.md"
    md.write_text(f"# loadtest scale {stamp}\n\n{table}")
    summary = {
        "tool": "livegift-loadtest scale",
        "params": params,
        "machine": probes.machine_info(),
        "rows": rows,
        "runs": [
            {k: r.get(k) for k in ("label", "json", "redis_cluster", "gifts", "server")}
            for r in results
        ],
        "table": table,
    }
    path = base.out / f"{stamp}-{prefix}.json"
    report.write_json(summary, path)
    summary["json"], summary["markdown"] = str(path), str(md)
    return summary


def client_cpus() -> str | None:
    """The CPUs this client may run on, when pinned (``--client-cpus``)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    mine = sorted(os.sched_getaffinity(0))
    return None if len(mine) == (os.cpu_count() or 0) else ",".join(map(str, mine))
