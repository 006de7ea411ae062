"""Command line: ``python -m loadtest [run] ...``, ``python -m loadtest compare ...``,
``python -m loadtest scale ...`` (:mod:`loadtest.scale`) and ``python -m loadtest attacks
...`` (:mod:`loadtest.attacks`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import compare as cmp
from . import report, runner
from .targets import KINDS

SUBCOMMANDS = ("run", "compare", "scale", "attacks")


def _common(p: argparse.ArgumentParser, viewers: int, rate: float, duration: float) -> None:
    p.add_argument("-V", "--viewers", type=int, default=viewers, help="viewer connections")
    p.add_argument("--rate", type=float, default=rate, help="gifts (events) per second, in total")
    p.add_argument("-D", "--duration", type=float, default=duration, help="seconds of sending")
    p.add_argument(
        "--drain",
        type=float,
        default=10.0,
        help="at most this many seconds to wait for the last deliveries",
    )
    p.add_argument(
        "--batch-ms",
        type=int,
        default=None,
        help="LIVEGIFT_BATCH_MS for a spawned livegift (fan-out batch window)",
    )
    p.add_argument(
        "--redis-url",
        default=None,
        help="REDIS_URL for a spawned server (default: livegift's embedded one)",
    )
    p.add_argument("--out", type=Path, default=Path("loadtest/results"), help="results folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="no PNG")
    p.add_argument("--no-reconcile", action="store_true", help="skip `livegift reconcile`")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for a spawned server (repeatable)",
    )
    p.add_argument("--connect-concurrency", type=int, default=200)
    p.add_argument(
        "--warm-rooms",
        action="store_true",
        help="join each room's first member alone before the others join concurrently",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for the machine to be idle",
    )
    p.add_argument("--secret", default=None, help="LIVEGIFT_SECRET (default: env or dev default)")
    p.add_argument("--payment-secret", default=None, help="LIVEGIFT_PAYMENT_SECRET")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="load one server (default)")
    _common(r, viewers=1000, rate=200.0, duration=10.0)
    r.add_argument("-R", "--rooms", type=int, default=1)
    r.add_argument("-G", "--gifters", type=int, default=10)
    r.add_argument("--url", default=None, help="base URL of a running server (loopback only)")
    r.add_argument("--spawn", action="store_true", help="start the server locally for this run")
    r.add_argument(
        "--kind",
        choices=KINDS,
        default="livegift",
        help="which server (peers need --spawn and --redis-url)",
    )
    r.add_argument("--codec", choices=("json", "msgpack"), default="json")
    r.add_argument("--workers", type=int, default=None, help="livegift serve --workers")
    r.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="pid of the running server (with --url) to measure its CPU and RSS",
    )
    r.add_argument("--server-cpus", default=None, help="taskset -c for a spawned server")
    r.add_argument("--client-cpus", default=None, help="pin this client to these CPUs")
    r.add_argument(
        "--redis-cpus",
        default=None,
        help="with --spawn: start a Redis of our own pinned to these CPUs",
    )
    _cluster_options(r)
    r.add_argument("--label", default=None)
    r.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the spawned server during the load (collapsed stacks + top list)",
    )
    c = sub.add_parser("compare", help="the same fan-out workload against livegift and the peers")
    _common(c, viewers=5000, rate=200.0, duration=10.0)
    c.add_argument("-G", "--gifters", type=int, default=10, help="livegift gifters in the room")
    c.add_argument(
        "--servers",
        default=",".join(cmp.DEFAULT_KINDS),
        help=f"comma-separated, from: {', '.join(KINDS)}",
    )
    c.add_argument("--server-cpus", default=None, help="default: the first CPU")
    c.add_argument("--client-cpus", default=None, help="default: the second CPU")
    s = sub.add_parser(
        "scale", help="the same gift load on Valkey Clusters of 1, 3, ... masters (spawned)"
    )
    _common(s, viewers=0, rate=6000.0, duration=20.0)
    s.add_argument("--masters", default="1,3", help="cluster sizes, one run each (default 1,3)")
    s.add_argument("-R", "--rooms", type=int, default=200)
    s.add_argument("-G", "--gifters", type=int, default=400)
    s.add_argument("--codec", choices=("json", "msgpack"), default="json")
    s.add_argument("--workers", type=int, default=None, help="livegift serve --workers")
    s.add_argument("--server-cpus", default=None, help="taskset -c for the spawned server")
    s.add_argument("--client-cpus", default=None, help="pin this client to these CPUs")
    s.add_argument("--redis-cpus", default=None, help="pin every Valkey node to these CPUs")
    _cluster_options(s, sizes=False)
    s.add_argument("--label", default=None)
    return ap


def _cluster_options(p: argparse.ArgumentParser, sizes: bool = True) -> None:
    if sizes:
        p.add_argument(
            "--cluster-masters",
            type=int,
            default=0,
            metavar="N",
            help="with --spawn: start a Valkey Cluster of N masters with 1 replica each "
            "(pinned with --redis-cpus) and measure every node",
        )
    p.add_argument(
        "--cluster-fsync",
        choices=("always", "everysec"),
        default="always",
        help="the cluster nodes' appendfsync (default always, as livegift's redis.conf)",
    )


def _config(a: argparse.Namespace, **over: Any) -> runner.RunConfig:
    env = {}
    for kv in a.server_env:
        k, _, v = kv.partition("=")
        env[k] = v
    cfg = runner.RunConfig(
        viewers=a.viewers,
        rate=a.rate,
        duration=a.duration,
        drain=a.drain,
        batch_ms=a.batch_ms,
        redis_url=a.redis_url,
        out=a.out,
        progress=not a.no_progress and sys.stderr.isatty(),
        plot=not a.no_plot,
        reconcile=not a.no_reconcile,
        server_env=env,
        connect_concurrency=a.connect_concurrency,
        wait_idle=a.wait_idle,
        warm_rooms=a.warm_rooms,
        **over,
    )
    if a.secret:
        cfg.secret = a.secret
    if a.payment_secret:
        cfg.payment_secret = a.payment_secret
    return cfg


def summary(res: dict[str, Any]) -> str:
    if "failed" in res:
        return f"FAILED: {res['failed']}\n{res.get('server_log_tail', '')}"
    d, lat = res["deliveries"], res["delivery_latency_ms"]
    lines = [
        f"{res['label']}: {res['connections']['viewers_joined']:,}/"
        f"{res['connections']['viewers_requested']:,} viewers joined",
        f"  deliveries: {d['received']:,} of {d['expected']:,} (loss {d['loss_pct']} %), "
        f"{d['per_s']:,.0f}/s overall, {d['per_s_steady'] or 0:,.0f}/s steady",
        f"  delivery latency ms: p50 {lat.get('p50')} p99 {lat.get('p99')} max {lat.get('max')}",
    ]
    if res.get("ack_latency_ms"):
        g, al = res["gifts"], res["ack_latency_ms"]
        lines.append(
            f"  gifts: sent {g['sent']:,}, acked ok {g['acked_ok']:,} ({g['acked_per_s']:,}/s), "
            f"errors {g['acked_error']:,}, unacked {g['unacked']:,}"
        )
        lines.append(
            f"  ack latency ms: p50 {al.get('p50')} p90 {al.get('p90')} p99 {al.get('p99')} max {al.get('max')}"
        )
    if res.get("errors_by_code"):
        lines.append(f"  errors: {res['errors_by_code']}")
    if res.get("closes_by_code"):
        lines.append(f"  closes: {res['closes_by_code']}")
    lines.append(f"  client CPU {res['client']['cpu_pct_of_core']} % of a core")
    load = res.get("machine_load", {})
    if load.get("kernel_threads_pct_of_core"):
        lines.append(
            f"  kernel threads (softirq: loopback network work) used "
            f"{load['kernel_threads_pct_of_core']} % of a core"
        )
    other = load.get("other_user_processes_pct_of_core")
    if other is not None and other > 15:
        top = ", ".join(o["cmd"][:60] for o in load.get("other_user_processes_top", [])[:2])
        lines.append(
            f"  WARNING: other programs used {other} % of a core during the run ({top}): "
            "the figures are disturbed"
        )
    if "server" in res:
        s = res["server"]
        lines.append(
            f"  server CPU {s['cpu_pct_of_core']} %, RSS peak {s['rss_peak'] / 2**20:,.1f} MiB; "
            f"Redis CPU {s['redis_cpu_pct_of_core']} %"
        )
        if s.get("redis_cpu_us_per_acked_gift") is not None:
            lines.append(
                f"  Redis CPU µs per acked gift: {s['redis_cpu_us_per_acked_gift']:,.1f} "
                f"(server CPU µs per acked gift: {s['server_cpu_us_per_acked_gift']:,.1f})"
            )
    if "redis_cluster" in res:
        lines.append(report.cluster_table(res["redis_cluster"]))
    if res.get("server_idle", {}).get("idle_rss_per_viewer_bytes") is not None:
        lines.append(
            f"  idle RSS per viewer: {res['server_idle']['idle_rss_per_viewer_bytes']:,.0f} B"
        )
    if "reconcile" in res:
        rc = res["reconcile"]
        lines.append(
            f"  reconcile: {'ok' if rc.get('ok') else rc.get('reason') or rc.get('output', '')[-300:]}"
        )
    lines.append(f"  result: {res.get('json')}  plot: {res.get('plot')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["attacks"]:
        from . import attacks

        return attacks.main(argv[1:])
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")
    a = parser().parse_args(argv)
    if a.cmd == "compare":
        server_cpus, client_cpus = cmp.default_cpus()
        cfg = _config(a, gifters=a.gifters, server_cpus=a.server_cpus or server_cpus)
        kinds = [k.strip() for k in a.servers.split(",") if k.strip()]
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise SystemExit(f"unknown servers: {bad}")
        out = cmp.compare(cfg, kinds, a.client_cpus or client_cpus)
        print(out["table"])
        print(f"written: {out['json']} and {out['markdown']}")
        return 0 if all("failed" not in r for r in out["results"]) else 1
    from . import procs

    if a.cmd == "scale":
        return _scale(a)

    procs.pin_self(a.client_cpus)
    cfg = _config(
        a,
        kind=a.kind,
        url=a.url,
        spawn=a.spawn,
        rooms=a.rooms,
        gifters=a.gifters,
        codec=a.codec,
        workers=a.workers,
        server_pid=a.server_pid,
        server_cpus=a.server_cpus,
        redis_cpus=a.redis_cpus,
        cluster_masters=a.cluster_masters,
        cluster_fsync=a.cluster_fsync,
        profile=a.profile,
        label=a.label,
    )
    if not a.spawn and not a.url:
        raise SystemExit("give --url of a running server or --spawn")
    res = runner.run(cfg)
    print(summary(res))
    return 1 if "failed" in res else 0


def _scale(a: argparse.Namespace) -> int:
    """``scale``: one spawned run per cluster size, one summary (see :mod:`loadtest.scale`)."""
    from . import procs, scale

    sizes = scale.parse_masters(a.masters)
    if a.redis_url:
        raise SystemExit("scale starts its own clusters: drop --redis-url")
    procs.pin_self(a.client_cpus)
    cfg = _config(
        a,
        spawn=True,
        rooms=a.rooms,
        gifters=a.gifters,
        codec=a.codec,
        workers=a.workers,
        server_cpus=a.server_cpus,
        redis_cpus=a.redis_cpus,
        cluster_fsync=a.cluster_fsync,
        label=a.label,
    )
    out = scale.scale(cfg, sizes)
    for r in out["runs"]:
        if r.get("redis_cluster"):
            print(f"\n{r['label']}\n{report.cluster_table(r['redis_cluster'])}")
    print(f"\n{out['table']}")
    print(f"written: {out['json']} and {out['markdown']}")
    return 0 if all(not r.get("failed") for r in out["rows"]) else 1
