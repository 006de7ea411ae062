"""``python -m loadtest compare``: the same fan-out workload against every server."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from . import probes, procs, report, runner
from .targets import Kind

DEFAULT_KINDS: tuple[Kind, ...] = ("livegift", "raw", "socketio", "channels")


def missing_deps(kind: Kind) -> str | None:
    """Why this server cannot run here, or None."""
    need = {
        "raw": [],
        "livegift": [],
        "socketio": ["socketio", "engineio", "uvicorn"],
        "channels": ["channels", "channels_redis", "django", "uvicorn"],
        "channels-pubsub": ["channels", "channels_redis", "django", "uvicorn"],
    }[kind]
    lacking = [m for m in need if importlib.util.find_spec(m) is None]
    if lacking:
        return f"not installed: {', '.join(lacking)} (pip install 'livegift[loadtest]')"
    if kind == "livegift" and procs.livegift_binary() is None:
        return "the livegift command is not installed"
    if procs.redis_binary() is None:
        return "no redis-server/valkey-server found"
    return None


def compare(base: runner.RunConfig, kinds: list[Kind], client_cpus: str | None) -> dict[str, Any]:
    base.out.mkdir(parents=True, exist_ok=True)
    log_dir = base.out / "logs"
    pinned_client = procs.pin_self(client_cpus)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: list[dict[str, Any]] = []
    for kind in kinds:
        why = missing_deps(kind)
        if why:
            results.append({"kind": kind, "skipped": why})
            continue
        redis, url = procs.start_redis(base.server_cpus, log_dir)
        try:
            cfg = dataclasses.replace(
                base,
                kind=kind,
                spawn=True,
                url=None,
                redis_url=url,
                redis_pid=redis.pid,
                rooms=1,
                gifters=base.gifters if kind == "livegift" else 1,
                label=f"compare-{kind}-v{base.viewers}-rate{base.rate:g}",
            )
            res = runner.run(cfg)
        finally:
            redis.stop()
        results.append(res)
    params = {
        "viewers": base.viewers,
        "rate": base.rate,
        "duration": base.duration,
        "gifters": base.gifters,
        "batch_ms": base.batch_ms,
        "server_cpus": base.server_cpus,
        "client_cpus": client_cpus if pinned_client else None,
    }
    table = report.compare_markdown(results, params)
    md = base.out / f"{stamp}-compare.md"
    md.write_text(f"# loadtest compare {stamp}\n\n{table}")
    summary = {
        "tool": "livegift-loadtest compare",
        "params": params,
        "machine": probes.machine_info(),
        "results": [
            {
                k: r[k]
                for k in (
                    "kind",
                    "skipped",
                    "failed",
                    "json",
                    "deliveries",
                    "delivery_latency_ms",
                    "ack_latency_ms",
                    "server",
                    "client",
                    "server_idle",
                    "connections",
                    "errors_by_code",
                    "closes_by_code",
                    "gifts",
                    "published",
                    "reconcile",
                    "machine_load",
                )
                if k in r
            }
            for r in results
        ],
        "markdown": str(md),
        "table": table,
    }
    js = base.out / f"{stamp}-compare.json"
    report.write_json(summary, js)
    summary["json"] = str(js)
    return summary


def default_cpus() -> tuple[str | None, str | None]:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n >= 2:
        cpus = sorted(os.sched_getaffinity(0))
        return str(cpus[0]), str(cpus[1])
    return None, None


__all__ = ["DEFAULT_KINDS", "Path", "compare", "default_cpus", "missing_deps"]
