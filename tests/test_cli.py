"""The ``livegift`` command as a person at a terminal uses it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt

from livegift import demo
from livegift.embedded import free_port
from tests.conftest import PAYMENT_SECRET, ROOT, SECRET, LiveServer, uid, unit

ENV = {**os.environ, "LIVEGIFT_SECRET": SECRET, "LIVEGIFT_PAYMENT_SECRET": PAYMENT_SECRET}


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "livegift", *args],
        env=env or ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=unit(timeout),
    )


def test_token_and_receipt_commands() -> None:
    out = run("token", "alice", "--name", "Alice", "--birthdate", "1990-01-01", "--ttl", "60")
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["birthdate"] == "1990-01-01"
    assert claims["exp"] - claims["iat"] == 60
    out = run("receipt", "alice", "p65", "--region", "JP", "--txn", "t-1")
    receipt = jwt.decode(out.stdout.strip(), PAYMENT_SECRET, algorithms=["HS256"])
    assert receipt == {
        "txn": "t-1",
        "sub": "alice",
        "package": "p65",
        "region": "JP",
        "amount": 160,
        "currency": "JPY",
        "env": "sandbox",
    }
    bad = run("receipt", "alice", "p999")
    assert bad.returncode == 2 and "p999" in bad.stderr
    assert run("token", "bad id").returncode == 2


def test_gift_and_watch_commands(live_server: LiveServer) -> None:
    creator = uid("c")
    room = live_server.create_stream(live_server.token(creator))
    user = uid()
    token = live_server.token(user, name="Cli")
    live_server.recharge(token, user, "p65")
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "livegift",
            "watch",
            room,
            "--token",
            token,
            "--url",
            live_server.base_url,
        ],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        out = run(
            "gift", room, "rose", "--count", "4", "--token", token, "--url", live_server.base_url
        )
        assert out.returncode == 0, out.stderr
        assert '"ok": true' in out.stdout and '"balance": 61' in out.stdout
        failed = run("gift", room, "universe", "--token", token, "--url", live_server.base_url)
        assert failed.returncode == 1 and "insufficient_funds" in failed.stdout
        live_server.delete(f"/api/streams/{room}", live_server.token(creator))
        stdout, _ = watcher.communicate(timeout=unit(10))
    finally:
        watcher.kill()
    assert "joined" in stdout and "Cli sent 4x Rose (4 coins) combo x4" in stdout
    assert "the stream has ended" in stdout and watcher.returncode == 0


def test_serve_demo_prints_working_urls(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in ENV.items() if k != "REDIS_URL"}
    env["LIVEGIFT_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.Popen(
        [sys.executable, "-m", "livegift", "serve", "--demo", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + unit(40)
        while time.monotonic() < deadline and not any("Check the books" in x for x in lines):
            lines.append(proc.stdout.readline())
        text = "".join(lines)
        urls = dict(re.findall(r"(Creator studio|Stream overlay|Viewer page)\s*: (\S+)", text))
        assert set(urls) == {"Creator studio", "Stream overlay", "Viewer page"}, text
        for url in urls.values():
            page = httpx.get(url)
            assert page.status_code == 200 and "<html" in page.text.lower()
        token = re.search(r"/watch/(\w+)\?token=(\S+)", text)
        assert token is not None and token.group(1) == demo.ROOM
        headers = {"authorization": f"Bearer {token.group(2)}"}
        assert (
            httpx.get(f"http://127.0.0.1:{port}/api/wallet", headers=headers).json()["coins"]
            >= 5000
        )
        # The simulated gifters make the room move at once.
        deadline = time.monotonic() + unit(15)
        while httpx.get(f"http://127.0.0.1:{port}/api/streams/{demo.ROOM}").json()["gifts"] < 3:
            assert time.monotonic() < deadline, "no simulated gifts"
            time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(unit(20))
    assert run("reconcile", "--quiet", env=env).returncode == 0


def test_procfile_runs_redis_and_web_with_honcho(tmp_path: Path) -> None:
    honcho = Path(sys.executable).parent / "honcho"
    env = {k: v for k, v in ENV.items() if k != "REDIS_URL"}
    env.update(LIVEGIFT_DATA_DIR=str(tmp_path / "data"), REDIS_PORT=str(free_port()),
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [str(honcho), "start", "-f", str(ROOT / "Procfile"), "-p", str(port - 100), "-d", str(ROOT)],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + unit(30)
        while True:  # honcho gives the second process type (web) port + 100
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "honcho did not bring the app up"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(unit(20))
