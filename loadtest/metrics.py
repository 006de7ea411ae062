"""Turning the raw records of a run into latencies, rates and loss (numpy)."""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

MAX_EXPANDED = 40_000_000


def percentiles_ms(lat_ns: I64 | F64, qs: tuple[float, ...] = (50, 90, 99, 99.9)) -> dict[str, Any]:
    if lat_ns.size == 0:
        return {"count": 0}
    ms = lat_ns.astype(np.float64) / 1e6
    out: dict[str, Any] = {"count": int(ms.size)}
    for q, v in zip(qs, np.percentile(ms, qs), strict=True):
        out[f"p{q:g}".replace(".", "_")] = round(float(v), 3)
    out["max"] = round(float(ms.max()), 3)
    out["mean"] = round(float(ms.mean()), 3)
    return out


def send_lookup(seq_sent: list[dict[int, int]]) -> tuple[I64, I64]:
    """One flat array of send times per (room, seq), with each room's offset."""
    sizes = [(max(d) + 1 if d else 1) for d in seq_sent]
    offsets = np.zeros(len(sizes), dtype=np.int64)
    if sizes:
        offsets[1:] = np.cumsum(sizes)[:-1]
    flat = np.full(int(sum(sizes)), -1, dtype=np.int64)
    for r, d in enumerate(seq_sent):
        if d:
            seqs = np.fromiter(d.keys(), dtype=np.int64, count=len(d))
            times = np.fromiter(d.values(), dtype=np.int64, count=len(d))
            flat[offsets[r] + seqs] = times
    return flat, offsets


def deliveries(
    rec: array[int],
    seq_sent: list[dict[int, int]],
    t0: int,
    rng_seed: int = 1,
) -> dict[str, Any]:
    """Delivery latency and per-second series from (room, first, last, t) records."""
    r = (
        np.frombuffer(rec, dtype=np.int64).reshape(-1, 4)
        if len(rec)
        else np.zeros((0, 4), np.int64)
    )
    room, first, last, t = r[:, 0], r[:, 1], r[:, 2], r[:, 3]
    counts = last - first + 1
    total = int(counts.sum())
    out: dict[str, Any] = {"recorded": total}
    if total == 0:
        out["latency_ms"] = {"count": 0}
        out["series"] = {"t": [], "deliveries_per_s": [], "p50_ms": [], "p99_ms": []}
        return out
    sec = (t - t0) // 1_000_000_000
    nsec = int(sec.max()) + 1
    per_s = np.bincount(sec, weights=counts, minlength=nsec)

    sampled = False
    if total > MAX_EXPANDED:
        # Keep a uniform sample of the chunks; percentiles become estimates.
        keep = np.random.default_rng(rng_seed).random(len(counts)) < MAX_EXPANDED / total
        room, first, t, counts, sec = room[keep], first[keep], t[keep], counts[keep], sec[keep]
        sampled = True
    idx = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    seq = first[idx] + (np.arange(int(counts.sum())) - starts[idx])
    flat, offsets = send_lookup(seq_sent)
    pos = offsets[room[idx]] + seq
    inside = pos < flat.size
    # Later rooms' offsets can hide an out-of-range seq; check it against the room size too.
    sizes = np.diff(np.append(offsets, flat.size))
    inside &= seq < sizes[room[idx]]
    sent = np.full(seq.size, -1, dtype=np.int64)
    sent[inside] = flat[pos[inside]]
    ok = sent >= 0
    lat = (t[idx] - sent)[ok]
    lat_sec = sec[idx][ok]
    del idx, seq, pos, sent
    out["latency_ms"] = percentiles_ms(lat)
    out["latency_ms"]["sampled"] = sampled
    out["without_send_time"] = int((~ok).sum())

    order = np.argsort(lat_sec, kind="stable")
    lat_sorted, sec_sorted = lat[order], lat_sec[order]
    bounds = np.searchsorted(sec_sorted, np.arange(nsec + 1))
    p50: list[float | None] = []
    p99: list[float | None] = []
    for s in range(nsec):
        chunk = lat_sorted[bounds[s] : bounds[s + 1]]
        if chunk.size:
            a, b = np.percentile(chunk, (50, 99)) / 1e6
            p50.append(round(float(a), 3))
            p99.append(round(float(b), 3))
        else:
            p50.append(None)
            p99.append(None)
    out["series"] = {
        "t": list(range(nsec)),
        "deliveries_per_s": [int(x) for x in per_s],
        "p50_ms": p50,
        "p99_ms": p99,
    }
    out["first_ns"] = int(t.min())
    out["last_ns"] = int(t.max())
    return out


def acks(ack_rec: array[int], t0: int) -> dict[str, Any]:
    a = (
        np.frombuffer(ack_rec, dtype=np.int64).reshape(-1, 2)
        if len(ack_rec)
        else np.zeros((0, 2), np.int64)
    )
    lat = a[:, 1] - a[:, 0]
    out: dict[str, Any] = {"latency_ms": percentiles_ms(lat)}
    if lat.size:
        sec = (a[:, 1] - t0) // 1_000_000_000
        nsec = int(sec.max()) + 1
        per_s = np.bincount(sec, minlength=nsec)
        p99: list[float | None] = []
        for s in range(nsec):
            chunk = lat[sec == s]
            p99.append(round(float(np.percentile(chunk, 99)) / 1e6, 3) if chunk.size else None)
        out["series"] = {
            "t": list(range(nsec)),
            "acks_per_s": [int(x) for x in per_s],
            "p99_ms": p99,
        }
        out["first_ns"] = int(a[:, 1].min())
        out["last_ns"] = int(a[:, 1].max())
    else:
        out["series"] = {"t": [], "acks_per_s": [], "p99_ms": []}
    return out


def steady_rate(series: list[int], start: int, end: int) -> float | None:
    """Median of the whole seconds in [start, end), dropping ramp-up and tail."""
    window = series[start + 1 : max(start + 1, end - 1)]
    if not window:
        window = series[start:end]
    if not window:
        return None
    return float(np.median(np.asarray(window, dtype=np.float64)))
