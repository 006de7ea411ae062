"""Machine probes: CPU of the machine, of its processes and of this one; waiting for quiet."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import platform
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import procs

ServerSample = tuple[float, int, float, int]  # server CPU s, server RSS, Redis CPU s, Redis RSS


def client_cpu() -> float:
    """CPU seconds this process (the load client, all its threads) has used."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class ServerProbe:
    """CPU and RSS of the server's process tree and of its Redis (in that tree or apart)."""

    def __init__(
        self,
        watch: procs.ProcWatch | None,
        redis_pid: int | None = None,
        more_redis_pids: tuple[int, ...] = (),
    ) -> None:
        self.watch = watch
        pids = [p for p in (redis_pid, *more_redis_pids) if p]
        self.redis_watches = [procs.ProcWatch(p) for p in pids]

    @property
    def watched(self) -> bool:
        return self.watch is not None

    def sample(self) -> ServerSample:
        if self.watch is None:
            return 0.0, 0, 0.0, 0
        srv, red = self.watch.split()
        for watch in self.redis_watches:
            red = red + watch.procs()
        return self.watch.cpu(srv), self.watch.rss(srv), self.watch.cpu(red), self.watch.rss(red)

    def roots(self) -> list[int]:
        """The pids whose whole process trees are measured as the server or its Redis."""
        watches = [self.watch] if self.watch is not None else []
        return [w.root.pid for w in (*watches, *self.redis_watches)]


def system_busy() -> float:
    """CPU seconds all cores spent running processes since boot (user + nice + system).

    Interrupt and softirq time is left out: on loopback the kernel's network work for
    this very test shows up there, not in any process.
    """
    import psutil  # type: ignore[import-untyped,unused-ignore]

    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system)


def system_softirq() -> float:
    import psutil  # type: ignore[import-untyped,unused-ignore]

    t = psutil.cpu_times()
    return float(getattr(t, "softirq", 0.0) + getattr(t, "irq", 0.0))


def per_core_busy() -> list[float]:
    """Non-idle CPU seconds per core since boot, interrupts included."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    return [
        float(sum(t) - t.idle - getattr(t, "iowait", 0.0)) for t in psutil.cpu_times(percpu=True)
    ]


# -- every process's CPU, and what the processes other than ours used -------------------------

ProcKey = tuple[int, float]  # (pid, start time): a pid the kernel hands out again is a new key


@dataclasses.dataclass(frozen=True)
class ProcCpu:
    ppid: int
    kthread: bool
    cpu: float  # user + system CPU seconds since the process started


Snapshot = dict[ProcKey, ProcCpu]


def process_cpu_snapshot() -> Snapshot:
    """Every process on the machine with its CPU seconds, read in one pass over /proc."""
    if Path("/proc/self/stat").exists():
        return _proc_stat_snapshot()
    import psutil  # type: ignore[import-untyped,unused-ignore]

    snap: Snapshot = {}
    for p in psutil.process_iter():
        try:
            with p.oneshot():
                t = p.cpu_times()
                ppid = p.ppid()
                key = (p.pid, p.create_time())
            snap[key] = ProcCpu(ppid, p.pid == 2 or ppid == 2, t.user + t.system)
        except psutil.Error:
            continue
    return snap


def _proc_stat_snapshot() -> Snapshot:
    """Linux: /proc/<pid>/stat read directly, about five times cheaper than through psutil
    (it runs every 0.5 s inside the load client). Same fields psutil reads: the whole
    thread group's utime + stime, in clock ticks."""
    tick = os.sysconf("SC_CLK_TCK")
    snap: Snapshot = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            # "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
            fields = data[data.rindex(b")") + 2 :].split()
            pid, ppid = int(name), int(fields[1])
            cpu = (int(fields[11]) + int(fields[12])) / tick
            started = int(fields[19]) / tick
        except (OSError, ValueError, IndexError):
            continue  # exited while we read, or not readable
        snap[(pid, started)] = ProcCpu(ppid, pid == 2 or ppid == 2, cpu)
    return snap


def tree_pids(snap: Snapshot, roots: Iterable[int]) -> set[int]:
    """The roots and all their descendants, as the snapshot shows them."""
    children: dict[int, list[int]] = {}
    for (pid, _), p in snap.items():
        children.setdefault(p.ppid, []).append(pid)
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, ()))
    return seen


def other_cpu_used(before: Snapshot, after: Snapshot, ours: set[int]) -> dict[ProcKey, float]:
    """CPU seconds each process outside ``ours`` used between two snapshots.

    A process that is new in ``after`` started in between, so all its CPU counts. One that
    exited in between is missing from ``after`` and adds nothing: its last part-interval
    is lost, an under-count, never a negative. The kernel never lowers a process's CPU
    time and the key holds the start time (a reused pid is another process), so every
    amount is >= 0 without clamping; amounts of zero are left out.
    """
    used: dict[ProcKey, float] = {}
    for key, now in after.items():
        if key[0] in ours:
            continue
        was = before.get(key)
        delta = now.cpu - (was.cpu if was is not None else 0.0)
        if delta > 0:
            used[key] = delta
    return used


class OtherCpu:
    """CPU used by every process that is not ours, summed from interval to interval.

    Why the "other processes" line of the plot used to go below zero: it was computed as
    ``system busy − (server + Redis + client)``, two totals from different accounting.
    ``system busy`` is /proc/stat's user + nice + system, which is tick-sampled and files
    every tick spent in interrupt or softirq under irq/softirq, left out of it on purpose.
    A process's CPU time (psutil, getrusage) is its scheduler run time, and the kernel
    charges interrupt and softirq work to whatever task it interrupted. On loopback the
    receiver's TCP work runs in softirq on the *sender's* core, inside the server's and the
    client's time slices, so "ours" included a good part of a core that "busy" did not, and
    the difference went negative as soon as the rest of the machine was quieter than the
    loopback work. The two were also read at different instants with different resolution
    (/proc/stat per-CPU ticks vs per-process ticks vs microseconds), so each 0.5 s step
    jittered by a few % of a core in either direction.

    Now "other" is measured rather than inferred: one snapshot of every process per step,
    and the sum of what each process outside ours used since the previous step
    (:func:`other_cpu_used`, all terms >= 0). Every process is read from the same source in
    the same unit, so the running total never decreases and no plotted step is negative.
    Running totals are kept step by step rather than recomputed from the first snapshot,
    because a process that exits would otherwise take all its earlier CPU out of the total.
    """

    def __init__(self, snapshot: Callable[[], Snapshot] = process_cpu_snapshot) -> None:
        self._snapshot = snapshot
        self._prev = snapshot()
        self.kernel = 0.0  # kernel threads (ksoftirqd, kworkers: much of it loopback work)
        self.user = 0.0  # every other program
        self._by_proc: Counter[ProcKey] = Counter()

    @property
    def total(self) -> float:
        return self.kernel + self.user

    def step(self, own_pids: Iterable[int], own_roots: Iterable[int] = ()) -> float:
        """Take a snapshot, add what others used since the last one; the running total.

        ``own_pids`` are ours alone (this client, not its children); ``own_roots`` are
        ours with all their descendants (the server's tree, a Redis of its own).
        """
        cur = self._snapshot()
        ours = set(own_pids) | tree_pids(cur, own_roots)
        for key, used in other_cpu_used(self._prev, cur, ours).items():
            if cur[key].kthread:
                self.kernel += used
            else:
                self.user += used
                self._by_proc[key] += used
        self._prev = cur
        return self.total

    def top(self, n: int = 5) -> list[tuple[int, float]]:
        """(pid, CPU s) of the programs other than ours that used the most."""
        return [(pid, round(cpu, 3)) for (pid, _), cpu in self._by_proc.most_common(n)]


def cmdline(pid: int) -> str:
    import psutil  # type: ignore[import-untyped,unused-ignore]

    try:
        return " ".join(psutil.Process(pid).cmdline())[:120]
    except psutil.Error:
        return "?"


# -- waiting, and describing the machine --------------------------------------------------------


async def wait_quiet(
    sample: Callable[[], ServerSample], watched: bool, limit: float = 60.0
) -> float:
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
