"""Live rooms keep working across a Redis crash: pub/sub reconnects, nothing is skipped."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from livegift.embedded import EmbeddedRedis, free_port
from tests.conftest import LiveServer, crash_and_restart, uid
from tests.wsclient import Client


async def test_members_keep_receiving_after_redis_restarts(
    tmp_path: Path, server_factory: object
) -> None:
    redis = EmbeddedRedis(tmp_path / "data")
    port = free_port()
    url = redis.start(port=port)
    try:
        server: LiveServer = server_factory(url=url)  # type: ignore[operator]
        room = server.create_stream(server.token(uid("c")))
        user = uid()
        token = server.token(user)
        server.recharge(token, user)
        watcher = await Client.open(server.ws(room, server.token(uid())))
        await watcher.next()
        sender = await Client.open(server.ws(room, token))
        assert (await sender.gift("one"))["seq"] == 1
        crash_and_restart(redis, port)
        deadline = time.monotonic() + 15
        ack: dict[str, object] = {}
        n = 0
        while time.monotonic() < deadline:  # the first tries may meet a reconnecting pool
            n += 1
            ack = await sender.gift(f"two-{n}")
            if ack["ok"]:
                break
            await asyncio.sleep(0.2)
        assert ack["ok"] and ack["seq"] == 2
        seqs = []
        while len(seqs) < 2:
            event = await watcher.next(timeout=10)
            if event["type"] == "gift":
                seqs.append(event["seq"])
        assert seqs == [1, 2]
        await watcher.close()
        await sender.close()
    finally:
        redis.stop()
