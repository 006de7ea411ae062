"""Resume from history, leaderboard and viewer-count events, stream stats."""

from __future__ import annotations

import asyncio

from tests.conftest import LiveServer, uid
from tests.test_ws import stream, viewer
from tests.wsclient import Client


async def test_resume_replays_history_then_live_without_gap_or_duplicate(
    live_server: LiveServer,
) -> None:
    room, _, _ = await stream(live_server)
    user, token = await viewer(live_server)
    sender = await Client.open(live_server.ws(room, token))
    for i in range(5):
        await sender.gift(f"a{i}", "donut")
    resumer = await Client.open(live_server.ws(room, live_server.token(uid()), since=2))
    welcome = await resumer.next()
    assert welcome["type"] == "welcome" and welcome["seq"] == 5

    async def keep_sending() -> None:
        for i in range(5):
            await sender.gift(f"b{i}", "donut")

    sending = asyncio.create_task(keep_sending())
    seen: list[int] = []
    log: list[dict[str, object]] = []
    resumed = None
    while len(seen) < 8:
        event = await resumer.next()
        log.append(event)
        if event["type"] == "resumed":
            resumed = event
            assert seen == [3, 4, 5]
        elif "seq" in event:
            seen.append(event["seq"])
    await sending
    assert seen == list(range(3, 11)), [
        (e["type"], e.get("seq"), e.get("room"), e.get("ts")) for e in log
    ]
    assert resumed == {"type": "resumed", "from": 3, "to": 5, "complete": True}
    await sender.close()
    await resumer.close()


async def test_resume_reports_incomplete_history(server_factory: object) -> None:
    server = server_factory({"LIVEGIFT_HISTORY_LEN": "3", "LIVEGIFT_HISTORY_SECONDS": "1"})  # type: ignore[operator]
    room, _, _ = await stream(server)
    user, token = await viewer(server)
    sender = await Client.open(server.ws(room, token))
    await sender.gift("x0")
    await asyncio.sleep(1.2)  # the first events are now older than the kept window
    for i in range(1, 8):
        await sender.gift(f"x{i}")
    resumer = await Client.open(server.ws(room, server.token(uid()), since=0))
    await resumer.next()
    events = [await resumer.next() for _ in range(10)]
    resumed = next(e for e in events if e["type"] == "resumed")
    assert resumed["complete"] is False and resumed["to"] == 8
    replayed = [e["seq"] for e in events[: events.index(resumed)]]
    assert replayed == sorted(replayed) and replayed[-1] == 8 and len(replayed) >= 3
    await sender.close()
    await resumer.close()


async def test_resume_at_head_is_complete_and_empty(live_server: LiveServer) -> None:
    room, _, _ = await stream(live_server)
    client = await Client.open(live_server.ws(room, live_server.token(uid()), since=0))
    assert (await client.next())["type"] == "welcome"
    assert await client.next() == {"type": "resumed", "from": 1, "to": 0, "complete": True}
    await client.close()


async def test_leaderboard_and_viewers_events_and_stream_stats(live_server: LiveServer) -> None:
    room, creator, creator_token = await stream(live_server)
    studio = await Client.open(live_server.ws(room, creator_token))
    a, ta = await viewer(live_server, name="Ann")
    b, tb = await viewer(live_server, name="Ben")
    ca = await Client.open(live_server.ws(room, ta))
    cb = await Client.open(live_server.ws(room, tb))
    viewers = await studio.until(lambda e: e["type"] == "viewers" and e["count"] == 3, timeout=6)
    assert viewers["count"] == 3
    await ca.gift("1", "donut", 2)  # 60
    await cb.gift("2", "hand_hearts")  # 100
    board = await studio.until(
        lambda e: e["type"] == "leaderboard" and len(e["top"]) == 2, timeout=5
    )
    assert board["top"] == [
        {"user": {"id": b, "name": "Ben"}, "coins": 100},
        {"user": {"id": a, "name": "Ann"}, "coins": 60},
    ]
    info = live_server.get(f"/api/streams/{room}").json()
    assert info["coins_received"] == 160 and info["viewers"] == 3
    assert [t["user"]["id"] for t in info["top_gifters"]] == [b, a]
    await cb.close()
    left = await studio.until(lambda e: e["type"] == "viewers", timeout=6)
    assert left["count"] == 2
    # No repeat while nothing changes.
    events = []
    try:
        while True:
            events.append(await studio.next(timeout=2.5))
    except TimeoutError:
        pass
    assert not [e for e in events if e["type"] in ("viewers", "leaderboard")]
    await ca.close()
    await studio.close()


async def test_joining_mid_batch_gets_no_duplicates(server_factory: object) -> None:
    """A wide batch window makes every join land while events are still pending."""
    server = server_factory({"LIVEGIFT_BATCH_MS": "300"})  # type: ignore[operator]
    room, _, _ = await stream(server)
    user, token = await viewer(server)
    sender = await Client.open(server.ws(room, token))
    for i in range(3):
        await sender.gift(f"p{i}")
    plain = await Client.open(server.ws(room, server.token(uid())))
    resumer = await Client.open(server.ws(room, server.token(uid()), since=1))
    assert (await plain.next())["seq"] == 3
    assert (await resumer.next())["seq"] == 3
    for i in range(3, 5):
        await sender.gift(f"p{i}")

    async def seqs(client: Client, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            event = await client.next()
            if event.get("seq"):
                out.append(event["seq"])
        return out

    assert await seqs(plain, 2) == [4, 5]
    assert await seqs(resumer, 4) == [2, 3, 4, 5]
    for c in (plain, resumer):
        try:
            extra = await c.until(lambda e: e.get("seq") is not None, timeout=0.8)
        except TimeoutError:
            extra = None
        assert extra is None
    for c in (sender, plain, resumer):
        await c.close()


async def test_resume_from_a_seq_ahead_of_this_process_gets_nothing_twice(
    live_server: LiveServer,
) -> None:
    """With several workers, a client may have seen a seq this worker has not yet."""
    room, _, _ = await stream(live_server)
    user, token = await viewer(live_server)
    sender = await Client.open(live_server.ws(room, token))
    await sender.gift("h1")
    ahead = await Client.open(live_server.ws(room, live_server.token(uid()), since=2))
    assert (await ahead.next())["seq"] == 1
    resumed = await ahead.next()
    assert resumed["type"] == "resumed" and resumed["to"] == 2
    for i in range(2, 5):
        await sender.gift(f"h{i}")
    seqs: list[int] = []
    while len(seqs) < 2:
        event = await ahead.next()
        if event.get("seq"):
            seqs.append(event["seq"])
    assert seqs == [3, 4]
    await sender.close()
    await ahead.close()
