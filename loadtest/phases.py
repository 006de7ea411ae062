"""The phases of one load run, in order; they share one ``state.RunState``.

set_up → connect_viewers → measure_idle → connect_senders → send_load → drain → close,
then ``results.collect`` turns what they measured into the result (see ``runner.run_async``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import secrets as pysecrets
import time
from time import perf_counter_ns
from typing import Any

from . import lgsetup
from .client import ROLE_GIFTER, ROLE_PUBLISHER, ROLE_VIEWER, ST_CLOSED, Conn, Stats, open_conn
from .config import RunConfig
from .probes import OtherCpu, ServerProbe, client_cpu, wait_quiet
from .profiler import finish_profiler, start_profiler
from .progress import Progress
from .server import ServerHandle
from .state import Mark, RunState, Tally, Window
from .targets import Target, check_loopback

Spec = tuple[int, int, str, str]  # (role, room index, path, name) of one connection to open


# -- 1. set-up: rooms (and, for livegift, wallets) ---------------------------------------------


async def set_up(cfg: RunConfig, handle: ServerHandle, progress: Progress) -> RunState:
    check_loopback(handle.host)
    run_id = pysecrets.token_hex(3)
    codec = "msgpack" if cfg.codec == "msgpack" else "json"
    target = Target(cfg.kind, handle.host, handle.port, codec)
    secrets = lgsetup.Secrets(cfg.secret, cfg.payment_secret)
    result: dict[str, Any] = {"run_id": run_id}
    gift_id = ""
    if cfg.kind == "livegift":
        gifters, gifts_total = max(1, cfg.gifters), int(cfg.rate * cfg.duration)
        prep = await lgsetup.prepare(
            handle.base_url, secrets, run_id, cfg.rooms, gifters, gifts_total
        )
        rooms, gift_id = prep.rooms, prep.gift_id
        result["setup"] = dataclasses.asdict(prep)
    else:
        rooms = [f"room{run_id}-{i}" for i in range(cfg.rooms)]
        result["setup"] = {"rooms": rooms}
    probe = ServerProbe(handle.watch, cfg.redis_pid, cfg.redis_pids)
    return RunState(
        cfg=cfg,
        handle=handle,
        progress=progress,
        target=target,
        probe=probe,
        secrets=secrets,
        run_id=run_id,
        rooms=rooms,
        gift_id=gift_id,
        stats=Stats(len(rooms)),
        result=result,
    )


# -- 2. connect: the viewers, then the gifters / publishers ----------------------------------


async def connect_all(st: RunState, specs: list[Spec], progress: Progress, desc: str) -> list[Conn]:
    """Open (role, room, path, name) connections with bounded concurrency and time."""
    cfg, stats = st.cfg, st.stats
    sem = asyncio.Semaphore(cfg.connect_concurrency)
    conns: list[Conn] = []
    deadline = time.monotonic() + cfg.connect_budget
    progress.start(desc, len(specs), "conn")

    async def one(spec: Spec) -> None:
        role, room, path, name = spec
        async with sem:
            left = deadline - time.monotonic()
            if left <= 0:
                stats.errors["connect:budget_exhausted"] += 1
                return
            try:
                timeout = min(cfg.connect_timeout, left)
                conns.append(
                    await open_conn(stats, st.target, role, room, path, name, timeout=timeout)
                )
            except TimeoutError:
                stats.errors["connect:timeout"] += 1
            except ConnectionError as e:
                code = str(e) or type(e).__name__
                if not code.startswith(("http_", "bad_")):
                    stats.errors[f"connect:{code}"] += 1
            except OSError as e:
                stats.errors[f"connect:oserror_{e.errno}"] += 1
        progress.update(1)

    rest = specs
    if cfg.warm_rooms:
        # The first member of each room joins alone, the rest then join concurrently.
        firsts: dict[int, Spec] = {}
        for spec in specs:
            firsts.setdefault(spec[1], spec)
        for spec in firsts.values():
            await one(spec)
        chosen = {id(s) for s in firsts.values()}
        rest = [s for s in specs if id(s) not in chosen]
    await asyncio.gather(*(one(s) for s in rest))
    progress.close()
    return conns


async def connect_viewers(st: RunState) -> None:
    """The server's RSS before, then every viewer, spread over the rooms."""
    await asyncio.sleep(0.5)
    st.rss_base = st.probe.sample()
    specs: list[Spec] = []
    for i in range(st.cfg.viewers):
        r = i % len(st.rooms)
        tok = None
        if st.is_lg:
            tok = lgsetup.user_token(st.secrets, f"lt{st.run_id}v{i}", f"Viewer {i}", adult=False)
        specs.append((ROLE_VIEWER, r, st.target.path(st.rooms[r], tok), f"v{i}"))
    t_conn = time.monotonic()
    st.viewers = await connect_all(st, specs, st.progress, "viewers")
    connect_s = time.monotonic() - t_conn
    joined = len(st.viewers)
    st.result["connections"] = {
        "viewers_requested": st.cfg.viewers,
        "viewers_joined": joined,
        "connect_seconds": round(connect_s, 3),
        "connects_per_s": round(joined / connect_s, 1) if connect_s > 0 else None,
    }


async def connect_senders(st: RunState) -> None:
    specs: list[Spec] = []
    for g in range(st.gifters):
        r = g % len(st.rooms)
        if st.is_lg:
            tok = lgsetup.user_token(st.secrets, f"lt{st.run_id}g{g}", f"Gifter {g}", adult=True)
            specs.append((ROLE_GIFTER, r, st.target.path(st.rooms[r], tok), f"{st.run_id}g{g}"))
        else:
            specs.append((ROLE_PUBLISHER, r, st.target.path(st.rooms[r], None), f"p{g}"))
    st.senders = await connect_all(st, specs, Progress(False), "gifters")
    st.senders.sort(key=lambda c: c.name)
    st.result["connections"]["senders_joined"] = len(st.senders)
    if not st.senders:
        raise RuntimeError(f"no gifter/publisher could join: {dict(st.stats.errors)}")


# -- 3. idle measurement: the server's RSS with the viewers connected and quiet ----------------


async def measure_idle(st: RunState) -> None:
    await asyncio.sleep(st.cfg.idle_settle)
    idle, base = st.probe.sample(), st.rss_base
    if not st.probe.watched:
        return
    n = len(st.viewers)
    st.result["server_idle"] = {
        "rss_baseline": base[1],
        "rss_with_idle_viewers": idle[1],
        "idle_rss_per_viewer_bytes": round((idle[1] - base[1]) / n, 1) if n else None,
        "redis_rss_baseline": base[3],
        "redis_rss_with_idle_viewers": idle[3],
    }


# -- 4. load: send at the rate for the duration, sampling every 0.5 s ------------------------


async def send_load(st: RunState) -> Window:
    # No collector pauses in the client while it measures: everything long-lived is
    # frozen out of the collector's sight and collection is off until the drain ends.
    gc.collect()
    gc.freeze()
    gc.disable()
    w = Window(Mark.take(st.probe), OtherCpu())
    w.profiler = start_profiler(st.cfg, st.probe.watch)
    w.sampler = asyncio.create_task(sample_loop(st, w))
    await pace(st, w)
    w.send_end_ns = perf_counter_ns()
    return w


async def pace(st: RunState, w: Window) -> None:
    """Send gifts (or publish) round-robin over the senders, at the configured rate."""
    cfg, senders, total = st.cfg, st.senders, st.gifts_total
    sent, n = 0, len(senders)
    start = time.perf_counter()
    end = start + cfg.duration
    while sent < total:
        now = time.perf_counter()
        if now >= end + 1.0:  # never run past the window by more than a second
            break
        due = min(total, int((now - start) * cfg.rate) + 1)
        while sent < due:
            c = senders[sent % n]
            if st.is_lg:
                c.send_gift(st.gift_id)
            else:
                c.publish(sent % n)
            sent += 1
        await asyncio.sleep(0.001)
    w.sending = False


def take_sample(st: RunState, w: Window) -> dict[str, Any]:
    """Cumulative CPU of everyone since the load started, RSS now, and the counters."""
    s0 = w.start.server
    srv = st.probe.sample()
    other = w.step_other(st.probe)
    stats = st.stats
    return {
        "t": round((perf_counter_ns() - w.start.ns) / 1e9, 3),
        "server_cpu_s": srv[0] - s0[0],
        "server_rss": srv[1],
        "redis_cpu_s": srv[2] - s0[2],
        "redis_rss": srv[3],
        "client_cpu_s": client_cpu() - w.start.client_cpu,
        "other_cpu_s": other if st.probe.watched else None,
        "delivered": stats.delivered,
        "acked": stats.ack_ok,
        "sent": stats.sent,
    }


async def sample_loop(st: RunState, w: Window) -> None:
    """Every 0.5 s a sample, and the progress bar while sending; cancelled after the drain."""
    last_d, last_a, last_t = 0, 0, time.perf_counter()
    shown = 0.0
    st.progress.start("load", st.cfg.duration, "s")
    while True:
        await asyncio.sleep(0.5)
        now = time.perf_counter()
        s = take_sample(st, w)
        w.samples.append(s)
        d, a, dt = s["delivered"], s["acked"], now - last_t
        if w.sending:
            step = max(0.0, min(dt, st.cfg.duration - shown))
            shown += step
            st.progress.update(
                round(step, 2),
                deliv_s=f"{(d - last_d) / dt:,.0f}",
                acks_s=f"{(a - last_a) / dt:,.0f}",
                sent=s["sent"],
            )
        last_d, last_a, last_t = d, a, now


# -- 5. drain: until every viewer saw its room's last seq, or the drain time is up -----------


def final_seqs(st: RunState) -> list[int]:
    fin = list(st.stats.last_seq)
    for v in st.viewers:
        fin[v.room] = max(fin[v.room], v.next - 1)
    return fin


async def drain(st: RunState, w: Window) -> Mark:
    """Wait for the deliveries (and acks) still in flight; the end of the window."""
    deadline = time.monotonic() + st.cfg.drain
    while time.monotonic() < deadline:
        fin = final_seqs(st)
        waiting_acks = st.is_lg and any(s.pending for s in st.senders)
        behind = any(v.state != ST_CLOSED and v.next <= fin[v.room] for v in st.viewers)
        if not behind and not waiting_acks:
            break
        await asyncio.sleep(0.05)
    end = Mark.take(st.probe)
    gc.enable()
    if w.sampler is not None:
        w.sampler.cancel()
    st.progress.close()
    w.step_other(st.probe)  # others' CPU up to the end of the window
    if w.profiler is not None:
        st.result["profile"] = await finish_profiler(*w.profiler)
    return end


# -- 6. close: count what arrived, close every connection, let the server settle -------------


def tally(st: RunState) -> Tally:
    fin = final_seqs(st)
    per_room: list[dict[str, Any]] = []
    for r, room in enumerate(st.rooms):
        members = [v for v in st.viewers if v.room == r]
        per_room.append(
            {
                "room": room,
                "viewers": len(members),
                "last_seq": fin[r],
                "start_seq_min": min((v.start_seq for v in members), default=None),
                "expected": sum(max(0, fin[r] - v.start_seq) for v in members),
                "received": sum(v.received for v in members),
                "gaps": sum(v.gaps for v in members),
            }
        )
    return Tally(
        expected=sum(max(0, fin[v.room] - v.start_seq) for v in st.viewers),
        received=sum(v.received for v in st.viewers),
        closed_early=sum(1 for v in st.viewers if v.state == ST_CLOSED),
        unacked=sum(len(s.pending) for s in st.senders),
        per_room=per_room,
    )


async def close(st: RunState) -> Tally:
    counted = tally(st)
    for c in (*st.viewers, *st.senders):
        c.close()
    await asyncio.sleep(0.2)
    # Let the server finish what it still has in flight before anyone reads its books.
    st.result["quiesce_seconds"] = await wait_quiet(st.probe.sample, st.probe.watched)
    return counted
