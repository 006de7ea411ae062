"""Measurement: what the phases recorded, turned into the run's result fields."""

from __future__ import annotations

import os
import resource
from typing import Any

from . import metrics
from .probes import cmdline
from .state import Mark, RunState, Tally, Window


def pct(cpu_s: float, wall: float) -> float:
    """CPU seconds over the wall time, as % of one core."""
    return round(100 * cpu_s / wall, 1)


def collect(st: RunState, w: Window, end: Mark, tally: Tally) -> dict[str, Any]:
    t0 = w.start.ns
    d = metrics.deliveries(st.stats.rec, st.stats.seq_sent, t0)
    a = metrics.acks(st.stats.acks, t0)
    last = max(d.get("last_ns", t0), a.get("last_ns", t0))
    span = max(1e-9, (last - t0) / 1e9)  # first send → last arrival or ack
    wall = (end.ns - t0) / 1e9
    r = st.result
    r["gifts" if st.is_lg else "published"] = sent_result(st, w, tally, a, span)
    r["ack_latency_ms"] = a["latency_ms"] if st.is_lg else None
    r["delivery_latency_ms"] = d["latency_ms"]
    r["deliveries"] = deliveries_result(st, w, tally, d, span)
    r["errors_by_code"] = dict(st.stats.errors)
    r["closes_by_code"] = dict(st.stats.closes)
    r["client"] = client_result(w.start, end, wall)
    if st.probe.watch is not None:
        r["server"] = server_result(st, w, end, wall)
    r["machine_load"] = machine_load(st, w, end, wall)
    r["series"] = {"delivery": d["series"], "ack": a["series"], "samples": w.samples}
    r["wall_seconds"] = round(wall, 3)
    return r


def send_seconds(w: Window) -> float:
    return (w.send_end_ns - w.start.ns) / 1e9


def sent_result(
    st: RunState, w: Window, tally: Tally, a: dict[str, Any], span: float
) -> dict[str, Any]:
    stats, is_lg = st.stats, st.is_lg
    send_s = send_seconds(w)
    return {
        "sent": stats.sent,
        "target_rate": st.cfg.rate,
        "send_seconds": round(send_s, 3),
        "acked_ok": stats.ack_ok,
        "acked_error": stats.ack_err,
        "unacked": tally.unacked,
        "acked_per_s": round(stats.ack_ok / span, 1) if is_lg else None,
        "acked_per_s_steady": metrics.steady_rate(a["series"]["acks_per_s"], 0, int(send_s))
        if is_lg
        else None,
    }


def deliveries_result(
    st: RunState, w: Window, tally: Tally, d: dict[str, Any], span: float
) -> dict[str, Any]:
    expected, received = tally.expected, tally.received
    lost = max(0, expected - received)
    per_s = d["series"]["deliveries_per_s"]
    return {
        "expected": expected,
        "received": received,
        "lost": lost,
        "loss_pct": round(100.0 * lost / expected, 4) if expected else 0.0,
        "duplicates_or_reordered": st.stats.duplicates,
        "not_recorded_over_cap": st.stats.rec_dropped,
        "without_send_time": d.get("without_send_time", 0),
        "per_s": round(received / span, 1),
        "per_s_steady": metrics.steady_rate(per_s, 0, int(send_seconds(w))),
        "per_s_peak": max(per_s, default=0),
        "span_seconds": round(span, 3),
        "viewers_closed_early": tally.closed_early,
        "rooms": tally.per_room[:50],
    }


def client_result(start: Mark, end: Mark, wall: float) -> dict[str, Any]:
    cpu = end.client_cpu - start.client_cpu
    return {
        "cpu_s": round(cpu, 3),
        "cpu_pct_of_core": pct(cpu, wall),
        "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def server_result(st: RunState, w: Window, end: Mark, wall: float) -> dict[str, Any]:
    s0, s1 = w.start.server, end.server
    assert st.probe.watch is not None
    acked = st.stats.ack_ok if st.is_lg else 0
    return {
        "pid": st.probe.watch.root.pid,
        "cpu_s": round(s1[0] - s0[0], 3),
        "cpu_pct_of_core": pct(s1[0] - s0[0], wall),
        "rss_peak": max((s["server_rss"] for s in w.samples), default=s1[1]),
        "rss_end": s1[1],
        "redis_cpu_s": round(s1[2] - s0[2], 3),
        "redis_cpu_pct_of_core": pct(s1[2] - s0[2], wall),
        "redis_rss_end": s1[3],
        # The yardstick: every Redis process's CPU over the window / acked gifts.
        "redis_cpu_us_per_acked_gift": round(1e6 * (s1[2] - s0[2]) / acked, 1) if acked else None,
        "server_cpu_us_per_acked_gift": round(1e6 * (s1[0] - s0[0]) / acked, 1) if acked else None,
    }


def machine_load(st: RunState, w: Window, end: Mark, wall: float) -> dict[str, Any]:
    """The whole machine over the window, and what processes other than ours used.

    Other processes' CPU is measured process by process (``probes.OtherCpu``), not as
    busy − ours, so it is never negative; kernel threads + other programs = its total.
    Without a server to watch, the server would count as "other": that total is None then.
    """
    s, other, watched = w.start, w.other, st.probe.watched
    irq = end.irq - s.irq
    return {
        "loadavg_at_end": list(os.getloadavg()),
        "busy_cpu_s": round(end.busy - s.busy, 3),
        "kernel_irq_softirq_cpu_s": round(irq, 3),
        "kernel_irq_softirq_pct_of_core": pct(irq, wall),
        "busy_pct_per_core": [pct(b - a, wall) for a, b in zip(s.cores, end.cores, strict=True)],
        "other_processes_cpu_s": round(other.total, 3) if watched else None,
        "other_processes_pct_of_core": pct(other.total, wall) if watched else None,
        "kernel_threads_pct_of_core": pct(other.kernel, wall),
        "other_user_processes_pct_of_core": pct(other.user, wall),
        "other_user_processes_top": [
            {"pid": pid, "cpu_s": cpu, "cmd": cmdline(pid)} for pid, cpu in other.top()
        ],
    }
