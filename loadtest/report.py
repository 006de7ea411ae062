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
