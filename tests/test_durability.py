"""Acknowledged money survives restarts and a killed Redis (AOF, appendfsync always)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from livegift.embedded import EmbeddedRedis, free_port
from tests.conftest import (
    PAYMENT_SECRET,
    ROOT,
    SECRET,
    LiveServer,
    crash_and_restart,
    uid,
    unit,
)
from tests.wsclient import Client


async def test_acked_gift_and_purchase_survive_redis_kill_9(
    tmp_path: Path, server_factory: object
) -> None:
    redis = EmbeddedRedis(tmp_path / "data")
    port = free_port()
    url = redis.start(port=port)
    try:
        server: LiveServer = server_factory(url=url)  # type: ignore[operator]
        creator = uid("c")
        ctoken = server.token(creator)
        room = server.create_stream(ctoken)
        user = uid()
        token = server.token(user)
        server.recharge(token, user, "p330")
        client = await Client.open(server.ws(room, token))
        ack = await client.gift("before-kill", "donut", 3)
        assert ack["ok"] and ack["balance"] == 240
        await client.close()
        crash_and_restart(redis, port)
        wallet = server.get("/api/wallet", token)
        for _ in range(50):  # the server's pool reconnects on its own
            if wallet.status_code == 200:
                break
            time.sleep(0.1)
            wallet = server.get("/api/wallet", token)
        assert wallet.json()["coins"] == 240
        assert server.get("/api/wallet", ctoken).json()["diamonds"] == 90
        # The retried req is still remembered: charged once.
        client = await Client.open(server.ws(room, token))
        assert (await client.gift("before-kill", "donut", 3)) == ack
        await client.close()
    finally:
        redis.stop()


def test_serve_starts_and_stops_its_own_redis_and_keeps_data(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        LIVEGIFT_DATA_DIR=str(tmp_path / "lg"),
        LIVEGIFT_SECRET=SECRET,
        LIVEGIFT_PAYMENT_SECRET=PAYMENT_SECRET,
    )
    base = f"http://127.0.0.1:{port}"
    user = uid()
    probe = LiveServer("unused")
    token = probe.token(user)

    def run() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "livegift", "serve", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + unit(30)
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz").status_code == 200:
                    return proc
            time.sleep(0.1)
        proc.kill()
        pytest.fail("serve did not come up")

    def redis_children(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
        return [
            c for c in psutil.Process(proc.pid).children(recursive=True) if "server" in c.name()
        ]

    proc = run()
    try:
        children = redis_children(proc)
        assert children, "serve should have started a redis/valkey server"
        conns = [c for c in children[0].net_connections(kind="tcp") if c.status == "LISTEN"]
        assert conns and all(c.laddr.ip == "127.0.0.1" for c in conns)
        r = httpx.post(
            f"{base}/api/wallet/recharge",
            json={"receipt": probe.receipt(user, "p65")},
            headers=probe.headers(token),
        )
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(unit(20))
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    proc = run()
    try:
        wallet = httpx.get(f"{base}/api/wallet", headers=probe.headers(token)).json()
        assert wallet["coins"] == 65
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(unit(20))
    probe.close()
