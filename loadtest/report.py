"""Writing results: JSON, a PNG plot per run, a markdown table per comparison."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import orjson


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def plot_run(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter

    series = result["series"]
    d, a = series["delivery"], series["ack"]
    fig, (ax1, ax2, ax4) = plt.subplots(
        3, 1, figsize=(10, 9), sharex=True, gridspec_kw={"height_ratios": [3, 3, 2]}
    )
    title = f"{result.get('label', result.get('kind'))}"
    fig.suptitle(title)
    if d["t"]:
        ax1.plot(
            d["t"],
            [x if x is not None else float("nan") for x in d["p50_ms"]],
            label="delivery p50",
        )
        ax1.plot(
            d["t"],
            [x if x is not None else float("nan") for x in d["p99_ms"]],
            label="delivery p99",
        )
    if a["t"]:
        ax1.plot(
            a["t"],
            [x if x is not None else float("nan") for x in a["p99_ms"]],
            label="ack p99",
            linestyle="--",
        )
    ax1.set_ylabel("latency (ms)")
    ax1.set_yscale("symlog", linthresh=10)
    # symlog leaves a narrow range with no labelled ticks; label 1-2-3-5 steps in ms.
    ax1.yaxis.set_major_locator(
        FixedLocator([v * 10**e for e in range(0, 5) for v in (1, 2, 3, 5)])
    )
    ax1.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.grid(True, which="major", alpha=0.3)
    ax1.grid(True, alpha=0.3)
    ax1.legend(loc="upper left")
    if d["t"]:
        ax2.bar(d["t"], d["deliveries_per_s"], width=0.9, label="deliveries/s", color="tab:blue")
    ax2.set_ylabel("deliveries / s")
    ax4.set_xlabel("seconds since the first send")
    ax2.grid(True, alpha=0.3)
    if a["t"]:
        ax3 = ax2.twinx()
        ax3.plot(a["t"], a["acks_per_s"], color="tab:orange", label="acked gifts/s")
        ax3.set_ylabel("acked gifts / s", color="tab:orange")
    samples = series.get("samples") or []
    if len(samples) > 1:
        ts = [s["t"] for s in samples]
        for key, label in (
            ("server_cpu_s", "server"),
            ("redis_cpu_s", "Redis"),
            ("client_cpu_s", "client"),
            ("other_cpu_s", "other processes"),
        ):
            if samples[0].get(key) is None:
                continue
            pct = [
                100 * (b[key] - a[key]) / max(1e-9, b["t"] - a["t"])
                for a, b in itertools.pairwise(samples)
            ]
            ax4.plot(ts[1:], pct, label=label)
        ax4.legend(loc="upper left", fontsize="small", ncol=4)
    ax4.set_ylabel("CPU % of a core")
    ax4.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _ratio(v: float | None, ref: float | None) -> str:
    if v is None or not ref:
        return "–"
    return f"{v / ref:.2f}×"


NAMES = {
    "livegift": "livegift (gift op: debit + seq + fan-out)",
    "raw": "raw limit (asyncio Protocol, one subscription, pre-built frames)",
    "socketio": "python-socketio (AsyncRedisManager, room emit)",
    "channels": "Django Channels (channels_redis core layer, group_send)",
    "channels-pubsub": "Django Channels (channels_redis pub/sub layer, group_send)",
}


def compare_markdown(results: list[dict[str, Any]], params: dict[str, Any]) -> str:
    ref = next((r for r in results if r.get("kind") == "livegift" and "deliveries" in r), None)
    ref_rate = ref["deliveries"]["per_s"] if ref else None
    ref_p99 = ref["delivery_latency_ms"].get("p99") if ref else None
    lines = [
        f"Workload: one room, {params['viewers']:,} viewers, {params['rate']:g} events/s for "
        f"{params['duration']:g} s (~200-byte events), codec JSON. Server on CPU "
        f"{params.get('server_cpus') or 'any'}, client on CPU {params.get('client_cpus') or 'any'}.",
        "",
        "| server | viewers joined | deliveries/s | vs livegift | steady/s | p50 ms | p99 ms | max ms "
        "| p99 vs livegift | loss % | server CPU % | Redis CPU % | client CPU % | RSS/idle conn |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        kind = r.get("kind", "?")
        name = NAMES.get(kind, kind)
        if "deliveries" not in r:
            reason = r.get("skipped") or r.get("failed") or "no result"
            lines.append(f"| {name} | {reason} |" + " |" * 12)
            continue
        d, lat = r["deliveries"], r["delivery_latency_ms"]
        srv = r.get("server", {})
        idle = r.get("server_idle", {})
        per_conn = idle.get("idle_rss_per_viewer_bytes")
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    _fmt(r["connections"]["viewers_joined"]),
                    _fmt(d["per_s"], 0),
                    _ratio(d["per_s"], ref_rate),
                    _fmt(d.get("per_s_steady"), 0),
                    _fmt(lat.get("p50")),
                    _fmt(lat.get("p99")),
                    _fmt(lat.get("max")),
                    _ratio(lat.get("p99"), ref_p99),
                    _fmt(d["loss_pct"], 2),
                    _fmt(srv.get("cpu_pct_of_core")),
                    _fmt(srv.get("redis_cpu_pct_of_core")),
                    _fmt(r["client"]["cpu_pct_of_core"]),
                    (f"{per_conn / 1024:,.1f} KiB" if per_conn is not None else "–"),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "deliveries/s = events received by all viewers / (first send → last arrival); "
        "steady/s = median of the whole seconds while sending. Latency is send → arrival at "
        "the viewer, both stamped by the client's monotonic clock. Loss = expected seqs "
        "(after each viewer's join, up to the room's last) that had not arrived when the run "
        "ended (the drain window after the last send): for a server that falls behind, that "
        "is backlog as much as drops. RSS/idle conn = (server RSS with the viewers connected "
        "and idle − RSS before) / viewers.",
    ]
    return "\n".join(lines) + "\n"


# -- Redis Cluster: per node, and the scale-out comparison ---------------------------------


# The money path's own commands come first in the printed table; commandstats also counts
# every command a script runs, and those come after, by calls.
FIRST_COMMANDS = ("evalsha", "eval", "wait", "spublish")


def _top_calls(calls: dict[str, int], wall: float, n: int = 5) -> str:
    names = [c for c in FIRST_COMMANDS if c in calls]
    names += [c for c in calls if c not in names]
    return ", ".join(f"{c} {calls[c] / wall:,.0f}" for c in names[:n])


def cluster_table(rc: dict[str, Any]) -> str:
    """What each node of a cluster did during the load, and the per-gift and spread figures."""
    wall = rc["wall_seconds"]
    ports = {r["port"] for r in rc["nodes"] if r["role"] == "master"}
    lines = [
        f"Redis Cluster: {_count(rc['masters'], 'master')} + "
        f"{_count(rc['replicas'], 'replica')} "
        f"(appendfsync {rc.get('appendfsync')}, CPUs {rc.get('redis_cpus') or 'any'}), "
        f"window {wall:g} s" + (" — A FAILOVER HAPPENED" if rc.get("failover") else ""),
        "",
        "| node | role | slots | CPU % of a core | commands/s | keys | top commands (calls/s) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rc["nodes"]:
        role = r["role"]
        if role == "replica" and r["master_port"] in ports:
            role = f"replica of :{r['master_port']}"
        lines.append(
            f"| :{r['port']} | {role} | {_fmt(r['slots']) if r['slots'] else '–'} "
            f"| {_fmt(r['cpu_pct_of_core'])} | {_fmt(r['commands_per_s'], 0)} "
            f"| {_fmt(r['keys'])} | {_top_calls(r['calls'], wall)} |"
        )
    per_gift, spread = rc["cpu_us_per_acked_gift"], rc["spread"]
    lines += [
        "",
        f"Redis CPU µs per acked gift: {_fmt(per_gift['all'])} (masters + replicas), "
        f"{_fmt(per_gift['masters'])} (masters only)",
        f"busiest / least busy master: CPU {_times(spread['cpu'])}, "
        f"commands {_times(spread['commands'])}, keys {_times(spread['keys'])}",
    ]
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _times(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def scale_markdown(rows: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """One row per cluster size (``python -m loadtest scale``)."""
    lines = [
        f"Workload: {params['gifters']:,} gifters in {params['rooms']:,} rooms "
        f"({params['viewers']:,} viewers), {params['rate']:g} gifts/s offered for "
        f"{params['duration']:g} s. Server on CPU {params.get('server_cpus') or 'any'} "
        f"({params.get('workers') or 1} process(es)), client on CPU "
        f"{params.get('client_cpus') or 'any'}, Valkey nodes on CPU "
        f"{params.get('redis_cpus') or 'any'} (appendfsync {params.get('cluster_fsync')}).",
        "",
        "| masters | acked gifts/s | ack p50 ms | ack p99 ms | not acked ok | server CPU % "
        "| Redis CPU % per master | replicas CPU % | Redis µs/gift (all) | (masters) "
        "| spread CPU | spread commands | spread keys | other load % | reconcile |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['masters']} | FAILED: {r['failed'][:120]} |" + " |" * 13)
            continue
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["masters"]) + (" (failover!)" if r.get("failover") else ""),
                    _fmt(r["acked_per_s"], 0),
                    _fmt(r["ack_p50_ms"], 2),
                    _fmt(r["ack_p99_ms"], 2),
                    _fmt(r["not_acked_ok"]),
                    _fmt(r["server_cpu_pct"]),
                    " / ".join(f"{v:.1f}" for v in r["redis_cpu_pct_per_master"]),
                    _fmt(r["replicas_cpu_pct"]),
                    _fmt(r["redis_us_per_gift_all"]),
                    _fmt(r["redis_us_per_gift_masters"]),
                    _times(r["spread_cpu"]),
                    _times(r["spread_commands"]),
                    _times(r["spread_keys"]),
                    _fmt(r["other_load_pct"]),
                    "ok" if r["reconcile_ok"] else "NOT OK" if r["reconcile_ok"] is False else "–",
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Redis CPU = user + system CPU of each valkey-server process (psutil, by pid) from the "
        "first send to the end of the drain, as % of one core; µs/gift = that CPU / acked "
        "gifts. Spread = busiest / least busy master, for CPU, commands processed (INFO "
        "total_commands_processed) and keys (DBSIZE). Other load = CPU of processes not in "
        "the test (kernel threads included) during the window.",
    ]
    return "\n".join(lines) + "\n"
