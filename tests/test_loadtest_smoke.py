"""Smoke runs of the load generator (``python -m loadtest``) and its peer comparison.

Small and short (tens of viewers, a few seconds), but real: each run starts real
servers on free loopback ports, sends real gifts and checks every viewer got every
event. The wire helpers the client's hot path relies on are checked first, without
sockets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest

from loadtest import report, wire

ROOT = Path(__file__).resolve().parent.parent
FACTOR = float(os.environ.get("LIVEGIFT_TEST_TIMEOUT_FACTOR", "1"))


# -- the wire helpers ----------------------------------------------------------------------


def test_scan_json_counts_seqs_of_complete_frames() -> None:
    events = [orjson.dumps({"type": "gift", "seq": s, "from": {"id": "a"}}) for s in (7, 8, 9)]
    data = wire.server_frame(b"[" + b",".join(events) + b"]") + wire.server_frame(events[0])
    frames, rest = wire.split_frames(data + b"\x81\x7e\x01")
    assert [p[:1] for _, p in frames] == [b"[", b"{"] and rest == b"\x81\x7e\x01"
    assert wire.scan_json(data, len(data)) == (4, 7, 7)
    assert wire.scan_json(data, len(wire.server_frame(b"[]"))) == (0, 0, 0)
    spaced = b'{"type": "gift", "seq": 12}'
    assert wire.scan_json(spaced, len(spaced)) == (1, 12, 12)


@pytest.mark.parametrize("seqs", [[1], [5, 6, 7], [127, 128, 255, 256, 65535, 65536, 2**32 + 1]])
def test_scan_msgpack_decodes_every_int_width(seqs: list[int]) -> None:
    payload = msgpack.packb([{"type": "gift", "seq": s, "count": 1} for s in seqs])
    assert wire.scan_msgpack(payload, len(payload)) == (len(seqs), seqs[0], seqs[-1])


def test_client_frames_are_masked_and_round_trip() -> None:
    for size in (0, 5, 125, 126, 300, 70000):
        payload = os.urandom(size)
        frame = wire.client_frame(payload)
        assert frame[0] == 0x81 and frame[1] & 0x80
        ln = frame[1] & 0x7F
        hl = 2 if ln < 126 else 4 if ln == 126 else 10
        mask = frame[hl : hl + 4]
        assert wire.unmask(frame[hl + 4 :], mask) == payload


async def test_viewer_counts_gaps_and_duplicates_through_the_fast_path() -> None:
    """The hot path counts rather than decodes; its sampled full decode must still find
    a missing and a repeated seq, and the totals must come out exact."""
    from loadtest import client, targets

    stats = client.Stats(1)
    conn = client.Conn(
        stats, targets.Target("livegift", "127.0.0.1", 1), client.ROLE_VIEWER, 0, "/ws/r", "v"
    )
    conn._set_joined(0)
    seqs = [s for s in range(1, 301) if s != 100]  # seq 100 never comes
    seqs.insert(200, seqs[199])  # and one event arrives twice
    for seq in seqs:
        event = orjson.dumps({"type": "gift", "seq": seq, "coins": 1})
        conn.data_received(wire.server_frame(event))
    assert conn.next == 301
    assert conn.received + stats.duplicates == len(seqs)
    assert 300 - conn.received == 1 and stats.duplicates == 1


# -- smoke runs ------------------------------------------------------------------------------


def _run(args: list[str], out: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("REDIS_URL", None)  # a spawned livegift starts its own, isolated Redis
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *args, "--out", str(out), "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout * FACTOR,
        stdin=subprocess.DEVNULL,
    )


def _assert_clean(res: dict[str, Any], viewers: int) -> None:
    assert "failed" not in res, res.get("failed")
    assert res["connections"]["viewers_joined"] == viewers, res.get("errors_by_code")
    d = res["deliveries"]
    assert d["expected"] > 0, d
    assert d["lost"] == 0 and d["loss_pct"] == 0, d
    assert d["duplicates_or_reordered"] == 0, d
    assert res["delivery_latency_ms"]["count"] == d["received"], res["delivery_latency_ms"]


@pytest.mark.timeout(400)
def test_run_smoke_livegift(tmp_path: Path) -> None:
    """20 viewers in 2 rooms, 2 gifters, 2 s at 40 gifts/s against a spawned livegift."""
    p = _run(["run", "--spawn", "-V", "20", "-R", "2", "-G", "2", "-D", "2", "--rate", "40"],
             tmp_path, 300)  # fmt: skip
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, f"no result written\n{p.stdout}\n{p.stderr[-3000:]}"
    assert list(tmp_path.glob("*.png")), "no plot written"
    res = json.loads(files[0].read_text())
    _assert_clean(res, 20)
    gifts = res["gifts"]
    assert gifts["sent"] == 80 and gifts["acked_ok"] == 80, (gifts, res["errors_by_code"])
    assert res["errors_by_code"] == {}
    assert res["ack_latency_ms"]["count"] == 80
    assert res["deliveries"]["expected"] == 20 * 40
    assert res["reconcile"].get("ok") is True or not res["reconcile"]["ran"], res["reconcile"]
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("compare")
    servers = "livegift,raw,socketio,channels"
    p = _run(["compare", "-V", "20", "-G", "2", "-D", "2", "--rate", "40", "--servers", servers],
             out, 600)  # fmt: skip
    files = list(out.glob("*-compare.json"))
    assert len(files) == 1, f"no comparison written\n{p.stdout}\n{p.stderr[-3000:]}"
    assert list(out.glob("*-compare.md")), "no markdown table written"
    summary: dict[str, Any] = json.loads(files[0].read_text())
    summary["returncode"] = p.returncode
    summary["stderr"] = p.stderr[-3000:]
    return summary


@pytest.mark.timeout(700)
@pytest.mark.parametrize("kind", ["raw", "livegift", "socketio", "channels"])
def test_compare_smoke(comparison: dict[str, Any], kind: str) -> None:
    results = {r["kind"]: r for r in comparison["results"]}
    res = results[kind]
    if res.get("skipped"):
        if kind in ("raw", "livegift"):
            pytest.fail(f"{kind} must always run: {res['skipped']}")
        pytest.skip(f"{kind} peer not available here: {res['skipped']}")
    _assert_clean(res, 20)
    assert res["deliveries"]["expected"] == 20 * 80
    assert report.NAMES[kind] in comparison["table"]


@pytest.mark.timeout(300)
def test_attacks_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m loadtest attacks`` with two cheap attacks against a spawned livegift:
    the JSON and Markdown are written, each attack has its outcome and the server's
    measured cost, the server ran this tree's code, and the conformance cases are counted."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the run's scratch folder and logs
    p = _run(["attacks", "--only", "csp,bad-room-id", "--label", "smoke"], tmp_path, 180)
    files = list(tmp_path.glob("*-attacks-smoke.json"))
    assert len(files) == 1, f"no result written\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert list(tmp_path.glob("*-attacks-smoke.md")), "no markdown table written"
    res = json.loads(files[0].read_text())
    assert res["server"]["livegift_file"] == str(ROOT / "livegift" / "__init__.py"), res["server"]
    assert res["load_before"]["loadavg"] and res["wall_s"] > 0
    by_name = {a["name"]: a for a in res["attacks"]}
    assert sorted(by_name) == ["bad-room-id", "csp"], by_name
    for a in by_name.values():
        assert not a.get("error"), a
        assert a["outcome"] and a["passed"] in (True, False), a
        assert a["server_cpu_s"] >= 0 and a["peak_rss_growth_mb"] >= 0, a
        assert a["healthz_n"] >= 1 and a["healthz_ms_max"] > 0, a
    assert by_name["csp"]["kind"] == "check" and "connect-src" in by_name["csp"]["outcome"]
    assert by_name["bad-room-id"]["outcome"].startswith(f"HTTP {by_name['bad-room-id']['status']}")
    conf = res["conformance"]
    assert conf["items"] > 0 and conf["cases"] <= conf["items"]
    assert {"framing (1.x)", "UTF-8 (6.x)", "close handshake (7.x)"} <= {
        r["category"] for r in conf["rows"]
    }
    assert p.returncode == 0, p.stderr[-3000:]
