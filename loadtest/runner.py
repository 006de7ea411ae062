"""One load run: set up, connect, send at a rate, drain, measure."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import platform
import resource
import secrets as pysecrets
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from time import perf_counter_ns
from typing import Any

from . import lgsetup, metrics, procs
from .client import ROLE_GIFTER, ROLE_PUBLISHER, ROLE_VIEWER, Conn, Stats, open_conn
from .targets import Kind, Target, check_loopback

try:  # the server's own development defaults, when livegift is importable
    from livegift.config import DEV_PAYMENT_SECRET, DEV_SECRET
except ImportError:  # pragma: no cover - the load tool also runs without the server package
    DEV_SECRET = "dev-secret-change-me"
    DEV_PAYMENT_SECRET = "dev-payment-secret-change-me"


@dataclasses.dataclass
class RunConfig:
    kind: Kind = "livegift"
    url: str | None = None  # an existing server; None with spawn
    spawn: bool = False
    redis_url: str | None = None
    viewers: int = 1000
    rooms: int = 1
    gifters: int = 10
    rate: float = 200.0
    duration: float = 10.0
    drain: float = 10.0
    batch_ms: int | None = None
    workers: int | None = None
    codec: str = "json"
    out: Path = Path("loadtest/results")
    label: str | None = None
    progress: bool = True
    reconcile: bool = True
    server_pid: int | None = None
    redis_pid: int | None = None  # a Redis outside the server's process tree, to measure too
    server_cpus: str | None = None
    redis_cpus: str | None = None  # start a Redis of our own, pinned here (with --spawn)
    connect_concurrency: int = 200
    connect_timeout: float = 10.0
    connect_budget: float = 180.0
    idle_settle: float = 2.0
    secret: str = dataclasses.field(
        default_factory=lambda: os.environ.get("LIVEGIFT_SECRET", DEV_SECRET)
    )
    payment_secret: str = dataclasses.field(
        default_factory=lambda: os.environ.get("LIVEGIFT_PAYMENT_SECRET", DEV_PAYMENT_SECRET)
    )
    server_env: dict[str, str] = dataclasses.field(default_factory=dict)
    plot: bool = True
    wait_idle: float = 0.0  # wait up to this long for other processes to quiet down
    warm_rooms: bool = False  # join each room's first member alone before the crowd
    profile: bool = False  # py-spy the server during the load phase


def raise_nofile(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def client_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Progress:
    """A tqdm bar when wanted; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def start(self, desc: str, total: float, unit: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            file=sys.stderr,
            leave=True,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def update(self, n: float, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclasses.dataclass
class ServerHandle:
    base_url: str
    host: str
    port: int
    spawned: procs.Spawned | None
    watch: procs.ProcWatch | None
    env: dict[str, str]


def livegift_env(cfg: RunConfig, data_dir: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["LIVEGIFT_SECRET"] = cfg.secret
    env["LIVEGIFT_PAYMENT_SECRET"] = cfg.payment_secret
    env.setdefault("LIVEGIFT_GIFT_RATE", "100000")
    env.setdefault("LIVEGIFT_GIFT_BURST", "100000")
    if cfg.batch_ms is not None:
        env["LIVEGIFT_BATCH_MS"] = str(cfg.batch_ms)
    if cfg.redis_url:
        env["REDIS_URL"] = cfg.redis_url
    else:
        env.pop("REDIS_URL", None)
        if data_dir:
            env["LIVEGIFT_DATA_DIR"] = data_dir
    env.update(cfg.server_env)
    return env


def peer_module(kind: Kind) -> list[str]:
    if kind == "raw":
        return ["-m", "loadtest.peers.rawlimit"]
    if kind == "socketio":
        return ["-m", "loadtest.peers.sio"]
    if kind == "channels":
        return ["-m", "loadtest.peers.channels_peer", "--layer", "core"]
    if kind == "channels-pubsub":
        return ["-m", "loadtest.peers.channels_peer", "--layer", "pubsub"]
    raise ValueError(kind)


def start_server(cfg: RunConfig, log_dir: Path) -> ServerHandle:
    if not cfg.spawn:
        if not cfg.url:
            raise SystemExit("give --url of a running server or --spawn")
        u = urllib.parse.urlparse(cfg.url)
        host, port = u.hostname or "127.0.0.1", u.port or 80
        check_loopback(host)
        watch = procs.ProcWatch(cfg.server_pid) if cfg.server_pid else None
        env = livegift_env(cfg, None) if cfg.kind == "livegift" else dict(os.environ)
        if cfg.kind == "livegift":
            # Reconcile against whatever store the running server uses (the caller's env).
            env = dict(os.environ)
        return ServerHandle(cfg.url.rstrip("/"), host, port, None, watch, env)
    port = procs.free_port()
    host = "127.0.0.1"
    if cfg.kind == "livegift":
        binary = procs.livegift_binary()
        if binary is None:
            raise SystemExit("livegift is not installed in this environment")
        data_dir = None if cfg.redis_url else tempfile.mkdtemp(prefix="loadtest-livegift-")
        env = livegift_env(cfg, data_dir)
        cmd = [binary, "serve", "--host", host, "--port", str(port)]
        if cfg.workers:
            cmd += ["--workers", str(cfg.workers)]
        sp = procs.Spawned("livegift", procs.pinned(cmd, cfg.server_cpus), env=env, log_dir=log_dir)
        try:
            procs.wait_http_ok(f"http://{host}:{port}/healthz", 90, sp.proc)
        except Exception as e:
            tail = sp.tail()
            sp.stop()
            raise RuntimeError(f"livegift did not start: {e}\n{tail}") from e
    else:
        if not cfg.redis_url:
            raise SystemExit(f"the {cfg.kind} peer needs --redis-url")
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [
            sys.executable,
            *peer_module(cfg.kind),
            "--host",
            host,
            "--port",
            str(port),
            "--redis",
            cfg.redis_url,
        ]
        sp = procs.Spawned(cfg.kind, procs.pinned(cmd, cfg.server_cpus), env=env, log_dir=log_dir)
        try:
            procs.wait_port(host, port, 60, sp.proc)
        except Exception as e:
            tail = sp.tail()
            sp.stop()
            raise RuntimeError(f"{cfg.kind} peer did not start: {e}\n{tail}") from e
    return ServerHandle(f"http://{host}:{port}", host, port, sp, procs.ProcWatch(sp.pid), env)


def run_reconcile(env: dict[str, str]) -> dict[str, Any]:
    binary = procs.livegift_binary()
    if binary is None:
        return {"ran": False, "reason": "livegift command not installed"}
    try:
        p = subprocess.run(
            [binary, "reconcile"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {"ran": True, "exit_code": None, "ok": False, "output": "timed out after 300 s"}
    out = (p.stdout + p.stderr).strip()
    if p.returncode == 2 and ("No such command" in out or "invalid choice" in out):
        return {
            "ran": False,
            "reason": "livegift has no reconcile command yet",
            "output": out[-2000:],
        }
    return {"ran": True, "exit_code": p.returncode, "ok": p.returncode == 0, "output": out[-4000:]}


async def connect_all(
    cfg: RunConfig,
    stats: Stats,
    target: Target,
    specs: list[tuple[int, int, str, str]],
    progress: Progress,
    desc: str,
) -> list[Conn]:
    """Open (role, room, path, name) connections with bounded concurrency and time."""
    sem = asyncio.Semaphore(cfg.connect_concurrency)
    conns: list[Conn] = []
    deadline = time.monotonic() + cfg.connect_budget
    progress.start(desc, len(specs), "conn")

    async def one(spec: tuple[int, int, str, str]) -> None:
        role, room, path, name = spec
        async with sem:
            left = deadline - time.monotonic()
            if left <= 0:
                stats.errors["connect:budget_exhausted"] += 1
                return
            try:
                c = await open_conn(
                    stats, target, role, room, path, name, timeout=min(cfg.connect_timeout, left)
                )
                conns.append(c)
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
        firsts: dict[int, tuple[int, int, str, str]] = {}
        for spec in specs:
            firsts.setdefault(spec[1], spec)
        for spec in firsts.values():
            await one(spec)
        chosen = {id(s) for s in firsts.values()}
        rest = [s for s in specs if id(s) not in chosen]
    await asyncio.gather(*(one(s) for s in rest))
    progress.close()
    return conns


async def run_async(cfg: RunConfig, handle: ServerHandle, progress: Progress) -> dict[str, Any]:
    check_loopback(handle.host)
    run_id = pysecrets.token_hex(3)
    target = Target(
        cfg.kind, handle.host, handle.port, "msgpack" if cfg.codec == "msgpack" else "json"
    )
    is_lg = cfg.kind == "livegift"
    gifts_total = int(cfg.rate * cfg.duration)
    result: dict[str, Any] = {"run_id": run_id}
    secrets = lgsetup.Secrets(cfg.secret, cfg.payment_secret)

    # 1. rooms (and wallets) ---------------------------------------------------
    gifters = max(1, cfg.gifters) if is_lg else cfg.rooms
    if is_lg:
        prep = await lgsetup.prepare(
            handle.base_url, secrets, run_id, cfg.rooms, gifters, gifts_total
        )
        rooms = prep.rooms
        result["setup"] = dataclasses.asdict(prep)
        gift_id = prep.gift_id
    else:
        rooms = [f"room{run_id}-{i}" for i in range(cfg.rooms)]
        result["setup"] = {"rooms": rooms}
        gift_id = ""
    stats = Stats(len(rooms))
    watch = handle.watch

    redis_watch = procs.ProcWatch(cfg.redis_pid) if cfg.redis_pid else None

    def server_sample() -> tuple[float, int, float, int]:
        if watch is None:
            return 0.0, 0, 0.0, 0
        srv, red = watch.split()
        if redis_watch is not None:
            red = red + redis_watch.procs()
        return watch.cpu(srv), watch.rss(srv), watch.cpu(red), watch.rss(red)

    # 2. viewers, idle RSS ----------------------------------------------------
    await asyncio.sleep(0.5)
    base = server_sample()
    specs: list[tuple[int, int, str, str]] = []
    for i in range(cfg.viewers):
        r = i % len(rooms)
        tok = (
            lgsetup.user_token(secrets, f"lt{run_id}v{i}", f"Viewer {i}", adult=False)
            if is_lg
            else None
        )
        specs.append((ROLE_VIEWER, r, target.path(rooms[r], tok), f"v{i}"))
    t_conn = time.monotonic()
    viewers = await connect_all(cfg, stats, target, specs, progress, "viewers")
    connect_s = time.monotonic() - t_conn
    await asyncio.sleep(cfg.idle_settle)
    idle = server_sample()
    result["connections"] = {
        "viewers_requested": cfg.viewers,
        "viewers_joined": len(viewers),
        "connect_seconds": round(connect_s, 3),
        "connects_per_s": round(len(viewers) / connect_s, 1) if connect_s > 0 else None,
    }
    if watch is not None:
        result["server_idle"] = {
            "rss_baseline": base[1],
            "rss_with_idle_viewers": idle[1],
            "idle_rss_per_viewer_bytes": round((idle[1] - base[1]) / len(viewers), 1)
            if viewers
            else None,
            "redis_rss_baseline": base[3],
            "redis_rss_with_idle_viewers": idle[3],
        }

    # 3. gifters / publishers ----------------------------------------------------
    gspecs: list[tuple[int, int, str, str]] = []
    for g in range(gifters):
        r = g % len(rooms)
        if is_lg:
            tok = lgsetup.user_token(secrets, f"lt{run_id}g{g}", f"Gifter {g}", adult=True)
            gspecs.append((ROLE_GIFTER, r, target.path(rooms[r], tok), f"{run_id}g{g}"))
        else:
            gspecs.append((ROLE_PUBLISHER, r, target.path(rooms[r], None), f"p{g}"))
    senders = await connect_all(cfg, stats, target, gspecs, Progress(False), "gifters")
    senders.sort(key=lambda c: c.name)
    result["connections"]["senders_joined"] = len(senders)
    if not senders:
        raise RuntimeError(f"no gifter/publisher could join: {dict(stats.errors)}")

    # 4. load -----------------------------------------------------------------------
    # No collector pauses in the client while it measures: everything long-lived is
    # frozen out of the collector's sight and collection is off until the drain ends.
    gc.collect()
    gc.freeze()
    gc.disable()
    samples: list[dict[str, Any]] = []
    t0 = perf_counter_ns()
    cpu0 = client_cpu()
    srv0 = server_sample()
    sys0 = system_busy()
    irq0 = system_softirq()
    cores0 = per_core_busy()
    procs0 = process_cpu_snapshot()
    sending = True

    async def pace() -> None:
        nonlocal sending
        sent = 0
        n = len(senders)
        start = time.perf_counter()
        end = start + cfg.duration
        while sent < gifts_total:
            now = time.perf_counter()
            if now >= end + 1.0:  # never run past the window by more than a second
                break
            due = min(gifts_total, int((now - start) * cfg.rate) + 1)
            while sent < due:
                c = senders[sent % n]
                if is_lg:
                    c.send_gift(gift_id)
                else:
                    c.publish(sent % n)
                sent += 1
            await asyncio.sleep(0.001)
        sending = False

    async def sample() -> None:
        last_d, last_a, last_t = 0, 0, time.perf_counter()
        shown = 0.0
        progress.start("load", cfg.duration, "s")
        while True:
            await asyncio.sleep(0.5)
            now = time.perf_counter()
            srv = server_sample()
            d, a = stats.delivered, stats.ack_ok
            dt = now - last_t
            ccpu = client_cpu() - cpu0
            ours = ccpu + (srv[0] - srv0[0]) + (srv[2] - srv0[2])
            samples.append(
                {
                    "t": round((perf_counter_ns() - t0) / 1e9, 3),
                    "server_cpu_s": srv[0] - srv0[0],
                    "server_rss": srv[1],
                    "redis_cpu_s": srv[2] - srv0[2],
                    "redis_rss": srv[3],
                    "client_cpu_s": ccpu,
                    "other_cpu_s": (system_busy() - sys0 - ours) if watch is not None else None,
                    "delivered": d,
                    "acked": a,
                    "sent": stats.sent,
                }
            )
            if sending:
                step = max(0.0, min(dt, cfg.duration - shown))
                shown += step
                progress.update(
                    round(step, 2),
                    deliv_s=f"{(d - last_d) / dt:,.0f}",
                    acks_s=f"{(a - last_a) / dt:,.0f}",
                    sent=stats.sent,
                )
            last_d, last_a, last_t = d, a, now

    profiler = start_profiler(cfg, watch)
    sampler = asyncio.create_task(sample())
    await pace()
    t_send_end = perf_counter_ns()

    # 5. drain: until every viewer saw its room's last seq, or the drain time is up --
    def final_seqs() -> list[int]:
        fin = list(stats.last_seq)
        for v in viewers:
            fin[v.room] = max(fin[v.room], v.next - 1)
        return fin

    drain_deadline = time.monotonic() + cfg.drain
    while time.monotonic() < drain_deadline:
        fin = final_seqs()
        waiting_acks = is_lg and any(s.pending for s in senders)
        behind = any(v.state != 3 and v.next <= fin[v.room] for v in viewers)
        if not behind and not waiting_acks:
            break
        await asyncio.sleep(0.05)
    t_end = perf_counter_ns()
    gc.enable()
    sampler.cancel()
    progress.close()
    cpu1 = client_cpu()
    srv1 = server_sample()
    sys1 = system_busy()
    irq1 = system_softirq()
    cores1 = per_core_busy()
    procs1 = process_cpu_snapshot()
    wall = (t_end - t0) / 1e9

    if profiler is not None:
        result["profile"] = await finish_profiler(*profiler)

    # 6. close ------------------------------------------------------------------------
    fin = final_seqs()
    expected = sum(max(0, fin[v.room] - v.start_seq) for v in viewers)
    received = sum(v.received for v in viewers)
    closed_early = sum(1 for v in viewers if v.state == 3)
    per_room: list[dict[str, Any]] = []
    for r in range(len(rooms)):
        members = [v for v in viewers if v.room == r]
        per_room.append(
            {
                "room": rooms[r],
                "viewers": len(members),
                "last_seq": fin[r],
                "start_seq_min": min((v.start_seq for v in members), default=None),
                "expected": sum(max(0, fin[r] - v.start_seq) for v in members),
                "received": sum(v.received for v in members),
                "gaps": sum(v.gaps for v in members),
            }
        )
    unacked = sum(len(s.pending) for s in senders)
    for c in (*viewers, *senders):
        c.close()
    await asyncio.sleep(0.2)
    # Let the server finish what it still has in flight before anyone reads its books.
    result["quiesce_seconds"] = await wait_quiet(server_sample, watch is not None)

    # 7. analyse ----------------------------------------------------------------------
    d = metrics.deliveries(stats.rec, stats.seq_sent, t0)
    a = metrics.acks(stats.acks, t0)
    send_s = (t_send_end - t0) / 1e9
    first = t0
    last = max(d.get("last_ns", t0), a.get("last_ns", t0))
    span = max(1e-9, (last - first) / 1e9)
    send_secs = int(send_s)
    lost = max(0, expected - received)
    result["gifts" if is_lg else "published"] = {
        "sent": stats.sent,
        "target_rate": cfg.rate,
        "send_seconds": round(send_s, 3),
        "acked_ok": stats.ack_ok,
        "acked_error": stats.ack_err,
        "unacked": unacked,
        "acked_per_s": round(stats.ack_ok / span, 1) if is_lg else None,
        "acked_per_s_steady": metrics.steady_rate(a["series"]["acks_per_s"], 0, send_secs)
        if is_lg
        else None,
    }
    result["ack_latency_ms"] = a["latency_ms"] if is_lg else None
    result["delivery_latency_ms"] = d["latency_ms"]
    result["deliveries"] = {
        "expected": expected,
        "received": received,
        "lost": lost,
        "loss_pct": round(100.0 * lost / expected, 4) if expected else 0.0,
        "duplicates_or_reordered": stats.duplicates,
        "not_recorded_over_cap": stats.rec_dropped,
        "without_send_time": d.get("without_send_time", 0),
        "per_s": round(received / span, 1),
        "per_s_steady": metrics.steady_rate(d["series"]["deliveries_per_s"], 0, send_secs),
        "per_s_peak": max(d["series"]["deliveries_per_s"], default=0),
        "span_seconds": round(span, 3),
        "viewers_closed_early": closed_early,
        "rooms": per_room[:50],
    }
    result["errors_by_code"] = dict(stats.errors)
    result["closes_by_code"] = dict(stats.closes)
    result["client"] = {
        "cpu_s": round(cpu1 - cpu0, 3),
        "cpu_pct_of_core": round(100 * (cpu1 - cpu0) / wall, 1),
        "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    if watch is not None:
        result["server"] = {
            "pid": watch.root.pid,
            "cpu_s": round(srv1[0] - srv0[0], 3),
            "cpu_pct_of_core": round(100 * (srv1[0] - srv0[0]) / wall, 1),
            "rss_peak": max((s["server_rss"] for s in samples), default=srv1[1]),
            "rss_end": srv1[1],
            "redis_cpu_s": round(srv1[2] - srv0[2], 3),
            "redis_cpu_pct_of_core": round(100 * (srv1[2] - srv0[2]) / wall, 1),
            "redis_rss_end": srv1[3],
        }
    ours = (cpu1 - cpu0) + (srv1[0] - srv0[0]) + (srv1[2] - srv0[2])
    foreign = max(0.0, (sys1 - sys0) - ours)
    our_pids = {os.getpid()}
    if watch is not None:
        our_pids |= {p.pid for p in watch.procs()}
    if redis_watch is not None:
        our_pids |= {p.pid for p in redis_watch.procs()}
    kthreads, others, top_others = split_other_cpu(procs0, procs1, our_pids)
    result["machine_load"] = {
        "loadavg_at_end": list(os.getloadavg()),
        "busy_cpu_s": round(sys1 - sys0, 3),
        "kernel_irq_softirq_cpu_s": round(irq1 - irq0, 3),
        "kernel_irq_softirq_pct_of_core": round(100 * (irq1 - irq0) / wall, 1),
        "busy_pct_per_core": [
            round(100 * (b - a) / wall, 1) for a, b in zip(cores0, cores1, strict=True)
        ],
        "other_processes_cpu_s": round(foreign, 3) if watch is not None else None,
        "other_processes_pct_of_core": round(100 * foreign / wall, 1)
        if watch is not None
        else None,
        "kernel_threads_pct_of_core": round(100 * kthreads / wall, 1),
        "other_user_processes_pct_of_core": round(100 * others / wall, 1),
        "other_user_processes_top": [
            {"pid": pid, "cpu_s": cpu, "cmd": _cmdline(pid)} for pid, cpu in top_others
        ],
    }
    result["series"] = {"delivery": d["series"], "ack": a["series"], "samples": samples}
    result["wall_seconds"] = round(wall, 3)
    return result


def start_profiler(
    cfg: RunConfig, watch: procs.ProcWatch | None
) -> tuple[subprocess.Popen[bytes], Path] | None:
    """py-spy the server (all its Python processes) while the load runs."""
    import shutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not cfg.profile or watch is None or not Path(spy).exists():
        return None
    cfg.out.mkdir(parents=True, exist_ok=True)
    out = cfg.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.label or cfg.kind}-profile.txt"
    cmd = [spy, "record", "--pid", str(watch.root.pid), "--subprocesses", "--rate", "200",
           "--duration", str(int(cfg.duration) + 1), "--format", "raw", "--output", str(out),
           "--nonblocking"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, out


async def finish_profiler(proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    for _ in range(100):
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.1)
    else:
        proc.terminate()
    return {"collapsed_stacks": str(out), "top_self": profile_top(out)}


def profile_top(path: Path, n: int = 25) -> list[tuple[str, float]]:
    """The functions with the most self time in a py-spy collapsed-stack file (% of samples)."""
    from collections import Counter

    own: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        own[stack.split(";")[-1]] += int(count)
    return [(f, round(100 * c / total, 2)) for f, c in own.most_common(n)] if total else []


def system_busy() -> float:
    """CPU seconds all cores spent running processes since boot (user + nice + system).

    Interrupt and softirq time is left out: on loopback the kernel's network work for
    this very test shows up there, not in any process.
    """
    import psutil  # type: ignore[import-untyped,unused-ignore]

    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system)


def per_core_busy() -> list[float]:
    """Non-idle CPU seconds per core since boot, interrupts included."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    return [
        float(sum(t) - t.idle - getattr(t, "iowait", 0.0)) for t in psutil.cpu_times(percpu=True)
    ]


def process_cpu_snapshot() -> dict[int, tuple[bool, float]]:
    """pid -> (is a kernel thread, CPU seconds) for every process on the machine."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    snap: dict[int, tuple[bool, float]] = {}
    for p in psutil.process_iter():
        try:
            t = p.cpu_times()
            snap[p.pid] = (p.ppid() == 2 or p.pid == 2, t.user + t.system)
        except psutil.Error:
            continue
    return snap


def split_other_cpu(
    before: dict[int, tuple[bool, float]], after: dict[int, tuple[bool, float]], ours: set[int]
) -> tuple[float, float, list[tuple[int, float]]]:
    """(kernel threads' CPU s, other user processes' CPU s, the top others) between snapshots."""
    kernel = user = 0.0
    top: list[tuple[int, float]] = []
    for pid, (kthread, cpu) in after.items():
        if pid in ours:
            continue
        used = cpu - before.get(pid, (kthread, 0.0))[1]
        if used <= 0:
            continue
        if kthread:
            kernel += used
        else:
            user += used
            top.append((pid, round(used, 3)))
    top.sort(key=lambda x: -x[1])
    return kernel, user, top[:5]


def _cmdline(pid: int) -> str:
    import psutil  # type: ignore[import-untyped,unused-ignore]

    try:
        return " ".join(psutil.Process(pid).cmdline())[:120]
    except psutil.Error:
        return "?"


def system_softirq() -> float:
    import psutil  # type: ignore[import-untyped,unused-ignore]

    t = psutil.cpu_times()
    return float(getattr(t, "softirq", 0.0) + getattr(t, "irq", 0.0))


async def wait_quiet(sample: Any, watched: bool, limit: float = 60.0) -> float:
    """Wait until the server uses under 10 % of a core, at most ``limit`` seconds."""
    t0 = time.monotonic()
    if not watched:
        await asyncio.sleep(1.0)
        return round(time.monotonic() - t0, 2)
    prev = sample()[0]
    while time.monotonic() - t0 < limit:
        await asyncio.sleep(0.5)
        cur = sample()[0]
        if cur - prev < 0.05:
            break
        prev = cur
    return round(time.monotonic() - t0, 2)


def wait_machine_idle(limit: float, busy_pct: float = 15.0) -> dict[str, Any]:
    """Wait (at most ``limit`` s) until the machine is nearly idle for 3 s in a row."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    t0 = time.monotonic()
    quiet = 0
    last = 100.0
    while time.monotonic() - t0 < limit and quiet < 3:
        last = psutil.cpu_percent(interval=1.0)
        quiet = quiet + 1 if last < busy_pct else 0
    return {"waited_s": round(time.monotonic() - t0, 1), "busy_pct": last, "idle": quiet >= 3}


def machine_info() -> dict[str, Any]:
    import psutil  # type: ignore[import-untyped,unused-ignore]

    info: dict[str, Any] = {
        "loadavg_at_start": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run one load test, write its JSON (and plot) and return the result."""
    from . import report

    nofile = raise_nofile()
    if cfg.viewers + cfg.gifters + 64 > nofile:
        raise SystemExit(f"RLIMIT_NOFILE is {nofile}: too low for {cfg.viewers} viewers")
    cfg.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.label or f"{cfg.kind}-v{cfg.viewers}-r{cfg.rooms}-g{cfg.gifters}-rate{cfg.rate:g}"
    log_dir = cfg.out / "logs"
    progress = Progress(cfg.progress)
    idle_wait = wait_machine_idle(cfg.wait_idle) if cfg.wait_idle > 0 else None
    own_redis: procs.Spawned | None = None
    if cfg.spawn and not cfg.redis_url and (cfg.kind != "livegift" or cfg.redis_cpus):
        own_redis, url = procs.start_redis(cfg.redis_cpus or cfg.server_cpus, log_dir)
        cfg = dataclasses.replace(cfg, redis_url=url, redis_pid=own_redis.pid)
    try:
        handle = start_server(cfg, log_dir)
    except BaseException:
        if own_redis is not None:
            own_redis.stop()
        raise
    result: dict[str, Any] = {
        "tool": "livegift-loadtest",
        "kind": cfg.kind,
        "label": name,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(cfg).items()
            if k not in ("secret", "payment_secret")
        },
        "machine": machine_info(),
    }
    if idle_wait is not None:
        result["machine"]["wait_idle"] = idle_wait
    try:
        try:
            import uvloop

            body = uvloop.run(run_async(cfg, handle, progress))
        except ImportError:
            body = asyncio.run(run_async(cfg, handle, progress))
        result.update(body)
    except Exception as e:
        result["failed"] = f"{type(e).__name__}: {e}"
        if handle.spawned is not None:
            result["server_log_tail"] = handle.spawned.tail(40)
    finally:
        progress.close()
        if cfg.kind == "livegift" and cfg.reconcile:
            # Against the live data store, before the server (and its Redis) stop.
            result["reconcile"] = run_reconcile(handle.env)
        if handle.spawned is not None:
            if handle.spawned.proc.poll() is not None:
                result["server_exit_code"] = handle.spawned.proc.returncode
                result["server_log_tail"] = handle.spawned.tail(40)
            handle.spawned.stop()
            result["server_log"] = str(handle.spawned.log_path)
        if own_redis is not None:
            own_redis.stop()
    path = cfg.out / f"{stamp}-{name}.json"
    if cfg.plot and "series" in result:
        try:
            result["plot"] = str(report.plot_run(result, path.with_suffix(".png")))
        except Exception as e:  # the plot is a convenience; the JSON is the record
            result["plot_error"] = f"{type(e).__name__}: {e}"
    report.write_json(result, path)
    result["json"] = str(path)
    return result
