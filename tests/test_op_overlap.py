"""One socket's gifts overlap (livegift.connection.OVERLAP), and their acks keep arrival
order: a client that sends gifts back to back is not held to one round trip per gift."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from tests.conftest import LiveServer, uid
from tests.wsclient import Client


def _step(command: str) -> str | None:
    """Which step of a gift a MONITOR line is: its keys name it."""
    if not command.startswith("EVALSHA"):
        return None
    if ":req:" in command:
        return "send"
    if ":landed:" in command:
        return "land"
    return None


async def test_back_to_back_gifts_overlap_and_are_acked_in_order(
    live_server: LiveServer,
) -> None:
    creator = uid("creator")
    room = live_server.create_stream(live_server.token(creator, name="Creator"))
    user = uid("viewer")
    token = live_server.token(user)
    live_server.recharge(token, user, "p1321")
    client = await Client.open(live_server.ws(room, token))
    steps: list[str] = []
    redis = Redis.from_url(live_server.redis_url)
    try:
        async with redis.monitor() as monitor:

            async def watch() -> None:
                while True:
                    info: dict[str, Any] = await monitor.next_command()
                    step = _step(info["command"])
                    if step is not None:
                        steps.append(step)

            watcher = asyncio.get_running_loop().create_task(watch())
            reqs = [f"o{i}" for i in range(5)]
            for req in reqs:
                await client.send({"op": "gift", "req": req, "gift": "rose"})
            acks = [await client.until(lambda m: m.get("type") == "ack") for _ in reqs]
            await asyncio.sleep(0.2)  # the monitor's last lines
            watcher.cancel()
    finally:
        await client.close()
        await redis.aclose()
    # Acks in the order the gifts were sent, each with its own seq, in that order too.
    assert [a["req"] for a in acks] == reqs
    assert all(a["ok"] for a in acks), acks
    seqs = [a["seq"] for a in acks]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    # Every debit went out before the first landing: the five ran together, not one
    # after another (send, land, send, land, ...).
    assert steps.count("send") == 5 and steps.count("land") == 5, steps
    assert steps.index("land") == 5, steps
