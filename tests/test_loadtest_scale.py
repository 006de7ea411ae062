"""Smoke run of ``python -m loadtest scale`` (issue 10 item 8): the same tiny gift load on
a real 1-master and a real 3-master Valkey Cluster (each master with one replica, so every
money batch ends with a WAIT), and the results file has every figure the comparison needs.

Small and short (a few gifters, 2 s at 60 gifts/s per size): the figures themselves mean
nothing at this load; only their presence and consistency are checked. The pure parts of
:mod:`loadtest.rcluster` (the per-node summary and the spread) are checked without sockets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest import rcluster, report

ROOT = Path(__file__).resolve().parent.parent
FACTOR = float(os.environ.get("LIVEGIFT_TEST_TIMEOUT_FACTOR", "1"))


def _node(
    node_id: str, role: str, cpu: float, commands: int, keys: int, master: str | None = None
) -> rcluster.NodeSnap:
    calls = {"evalsha": commands // 2, "wait": commands // 4} if role == "master" else {}
    return rcluster.NodeSnap(node_id, 7000 + len(node_id), 100 + len(node_id), role, master,
                             8192 if role == "master" else 0, cpu, commands, calls, {}, keys)  # fmt: skip


def test_summarise_per_gift_and_spread_without_sockets() -> None:
    before = rcluster.Snapshot(10.0, (
        _node("a", "master", 1.0, 100, 0), _node("bb", "master", 2.0, 100, 0),
        _node("ccc", "replica", 0.5, 0, 0, master="a"),
    ))  # fmt: skip
    after = rcluster.Snapshot(12.0, (
        _node("a", "master", 1.4, 2100, 500), _node("bb", "master", 2.2, 1100, 250),
        _node("ccc", "replica", 0.6, 800, 500, master="a"),
    ))  # fmt: skip
    s = rcluster.summarise(before, after, acked=1000)
    assert (s["masters"], s["replicas"], s["wall_seconds"]) == (2, 1, 2.0)
    assert s["cpu_s"] == {"all": 0.7, "masters": 0.6, "replicas": 0.1}
    assert s["cpu_us_per_acked_gift"] == {"all": 700.0, "masters": 600.0}
    assert s["cpu_pct_of_core_per_master"] == [20.0, 10.0]
    assert s["spread"] == {"cpu": 2.0, "commands": 2.0, "keys": 2.0}
    assert not s["failover"]
    replica = s["nodes"][2]
    assert replica["role"] == "replica" and replica["master_port"] == s["nodes"][0]["port"]
    assert s["nodes"][0]["calls"] == {"evalsha": 1000, "wait": 500}
    assert "replica of" in report.cluster_table(s)
    assert rcluster.ratio([3.0, 0.0]) is None and rcluster.ratio([]) is None
    assert rcluster.parse_cpus("0,2-3") == {0, 2, 3}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_scale_smoke_one_and_three_masters(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("REDIS_URL", None)
    p = subprocess.run(
        [sys.executable, "-m", "loadtest", "scale", "--masters", "1,3", "-V", "0", "-R", "6",
         "-G", "6", "--rate", "60", "-D", "2", "--drain", "5", "--cluster-fsync", "everysec",
         "--no-plot", "--no-progress", "--label", "smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=100 * FACTOR,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    files = list(tmp_path.glob("*-smoke.json"))
    assert len(files) == 1, f"no summary written\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert list(tmp_path.glob("*-smoke.md")), "no markdown table written"
    summary: dict[str, Any] = json.loads(files[0].read_text())
    rows = summary["rows"]
    assert [r["masters"] for r in rows] == [1, 3], rows
    for r, run in zip(rows, summary["runs"], strict=True):
        assert not r.get("failed"), (r, p.stderr[-3000:])
        assert r["acked_ok"] == r["sent"] == 120 and r["not_acked_ok"] == 0, r
        assert r["acked_per_s"] > 0 and r["ack_p99_ms"] is not None
        assert len(r["redis_cpu_pct_per_master"]) == r["masters"]
        assert r["redis_us_per_gift_all"] >= r["redis_us_per_gift_masters"] > 0, r
        for key in ("spread_cpu", "spread_commands", "spread_keys"):
            assert r[key] is None or r[key] >= 1.0, (key, r)
        assert r["reconcile_ok"] is True, r
        assert r["failover"] is False
        rc = run["redis_cluster"]
        assert rc["masters"] == rc["replicas"] == r["masters"]
        assert {n["role"] for n in rc["nodes"]} == {"master", "replica"}
        for node in rc["nodes"]:
            assert node["pid"] and node["cpu_s"] >= 0 and node["commands"] > 0, node
            assert node["keys"] > 0, node
        masters = [n for n in rc["nodes"] if n["role"] == "master"]
        assert sum(n["slots"] for n in masters) == 16384
        # Every gift ran as scripts followed by a WAIT for the replica.
        assert sum(n["calls"].get("evalsha", 0) for n in masters) >= 2 * 120, masters
        assert sum(n["calls"].get("wait", 0) for n in masters) > 0, masters
        assert run["server"]["redis_cpu_us_per_acked_gift"] > 0, run["server"]
    assert rows[0]["spread_cpu"] == rows[0]["spread_keys"] == 1.0
    assert "Redis µs/gift" in summary["table"] and "spread keys" in summary["table"]
    assert "Redis CPU µs per acked gift" in p.stdout
    assert p.returncode == 0, p.stderr[-3000:]
