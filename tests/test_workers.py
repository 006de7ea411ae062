"""Several worker processes behind one port share rooms through Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from livegift.embedded import free_port
from tests.conftest import PAYMENT_SECRET, ROOT, SECRET, LiveServer, uid, unit
from tests.wsclient import Client


async def test_two_workers_deliver_every_event_to_every_member(
    redis_url: str, tmp_path: Path
) -> None:
    helper = LiveServer(redis_url)
    helper.port = free_port()
    helper.base_url = f"http://127.0.0.1:{helper.port}"
    helper.ws_url = f"ws://127.0.0.1:{helper.port}"
    helper.http = httpx.Client(base_url=helper.base_url, timeout=unit(10))
    env = {**os.environ, "REDIS_URL": redis_url, "LIVEGIFT_SECRET": SECRET,
           "LIVEGIFT_PAYMENT_SECRET": PAYMENT_SECRET}  # fmt: skip
    log = open(tmp_path / "workers.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "livegift", "serve", "--port", str(helper.port), "--workers", "2"],
        env=env, cwd=ROOT, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + unit(30)
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if helper.get("/healthz").status_code == 200:
                    break
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        room = helper.create_stream(helper.token(uid("c")))
        members = [await Client.open(helper.ws(room, helper.token(uid()))) for _ in range(12)]
        for m in members:
            await m.next()
        user = uid()
        token = helper.token(user)
        helper.recharge(token, user)
        sender = await Client.open(helper.ws(room, token))
        for i in range(20):
            await sender.gift(f"w{i}")

        async def seqs(client: Client) -> list[int]:
            out: list[int] = []
            while len(out) < 20:
                event = await client.next(timeout=10)
                if event["type"] == "gift":
                    out.append(event["seq"])
            return out

        for result in await asyncio.gather(*(seqs(m) for m in members)):
            assert result == list(range(1, 21))
        # Presence adds up the members of both processes.
        count = await members[0].until(
            lambda e: e["type"] == "viewers" and e["count"] == 13, timeout=8
        )
        assert count["count"] == 13
        workers = [p for p in psutil.Process(proc.pid).children() if "python" in p.name()]
        assert len(workers) >= 2
        for c in [*members, sender]:
            await c.close()
    finally:
        proc.terminate()
        proc.wait(unit(20))
        log.close()
        helper.http.close()
