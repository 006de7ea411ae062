"""Tokens on open sockets, overlay keys and the pages' CSP (PROTOCOL §8), end to end.

Real servers (``livegift serve``) on a real Redis, real WebSocket clients: a token's exp
closes its socket 4401 ``token_expired`` and stops its ops; ``refresh`` moves exp; an
overlay key opens a read-only ``/ws/creator/{user}`` connection that follows the creator
from stream to stream, is not a viewer, and closes 4401 on every process when revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import Any

import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from livegift import keys
from livegift.store import connect_sync
from tests.conftest import LiveServer, uid, unit
from tests.wsclient import Client


def exp_of(token: str) -> int:
    return int(jwt.decode(token, options={"verify_signature": False})["exp"])


def follow_url(server: LiveServer, user: str, key: str) -> str:
    return f"{server.ws_url}/ws/creator/{user}?key={key}"


def overlay_key(server: LiveServer, token: str) -> dict[str, Any]:
    r = server.post("/api/overlay-key", token=token)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def closed_with(
    client: Client, timeout: float = 5, seen: list[dict[str, Any]] | None = None
) -> tuple[int, str]:
    """Read (into ``seen``) until the server closes the socket: (code, reason)."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            event = await client.next(timeout)
            if seen is not None:
                seen.append(event)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason


def funded_viewer(server: LiveServer, ttl: int = 3600, **kw: Any) -> tuple[str, str]:
    user = uid("viewer")
    server.recharge(server.token(user), user, "p1321")
    return user, server.token(user, ttl=ttl, **kw)


# ---------------------------------------------------------------- token lifetime on a socket


async def test_an_expired_token_closes_its_socket_4401_token_expired(
    live_server: LiveServer,
) -> None:
    room = live_server.create_stream(live_server.token(uid("creator")))
    token = live_server.token(uid("viewer"), ttl=2)
    exp = exp_of(token)
    client = await Client.open(live_server.ws(room, token))
    assert (await client.next())["type"] == "welcome"
    code, reason = await closed_with(client, timeout=6)
    assert (code, reason) == (4401, "token_expired")
    # At exp (within the once-a-second sweep), not before it.
    assert exp <= time.time() < exp + unit(2.5)


async def test_an_op_sent_after_exp_is_never_run(live_server: LiveServer) -> None:
    creator_token = live_server.token(uid("creator"))
    room = live_server.create_stream(creator_token)
    watcher = await Client.open(live_server.ws(room, creator_token))
    await watcher.next()
    user, token = funded_viewer(live_server, ttl=2)
    exp = exp_of(token)
    sender = await Client.open(live_server.ws(room, token))
    await sender.next()

    # Gifts every 20 ms from before exp until the server closes the socket: the ones that
    # reach the server after exp (and before the sweep comes round) must not run.
    await asyncio.sleep(max(0.0, exp - 0.4 - time.time()))
    seen: list[dict[str, Any]] = []
    reader = asyncio.ensure_future(closed_with(sender, 6, seen))
    for i in range(400):
        if reader.done():
            break
        with contextlib.suppress(ConnectionClosed):
            await sender.send({"op": "gift", "req": f"late{i}", "gift": "rose"})
        await asyncio.sleep(0.02)
    assert await reader == (4401, "token_expired")
    acked = [e for e in seen if e.get("type") == "ack" and e.get("ok")]

    gifts = []
    with pytest.raises(TimeoutError):
        while True:
            event = await watcher.next(1)
            if event["type"] == "gift":
                gifts.append(event)
    late = [g["seq"] for g in gifts if g["ts"] >= exp * 1000 + 50]
    assert not late, f"gifts run after exp: seqs {late}"
    wallet = live_server.get("/api/wallet", live_server.token(user)).json()
    assert wallet["coins"] == 1321 - len(gifts)
    assert len(acked) <= len(gifts)
    await watcher.close()


async def test_refresh_keeps_the_socket_open_past_the_old_exp(live_server: LiveServer) -> None:
    creator_token = live_server.token(uid("creator"))
    room = live_server.create_stream(creator_token)
    watcher = await Client.open(live_server.ws(room, creator_token))
    await watcher.next()
    user, token = funded_viewer(live_server, ttl=2, name="Old Name")
    exp = exp_of(token)
    client = await Client.open(live_server.ws(room, token))
    assert (await client.next())["you"]["name"] == "Old Name"

    fresh = live_server.token(user, ttl=5, name="New Name")
    new_exp = exp_of(fresh)
    await client.send({"op": "refresh", "req": "rf1", "token": fresh})
    ack = await client.ack("rf1")
    assert ack["ok"] is True and ack["exp"] == new_exp > exp, ack

    await asyncio.sleep(max(0.0, exp + 1.5 - time.time()))  # the sweep has been past exp
    ack = await client.gift("after-old-exp")
    assert ack["ok"] is True, ack
    event = await watcher.until(lambda e: e["type"] == "gift")
    assert event["from"] == {"id": user, "name": "New Name"}  # the new token's claims
    # ... and the new exp holds in its turn.
    assert await closed_with(client, timeout=8) == (4401, "token_expired")
    assert time.time() >= new_exp
    await watcher.close()


async def test_refresh_with_another_user_or_a_bad_token_keeps_the_old_one(
    live_server: LiveServer,
) -> None:
    room = live_server.create_stream(live_server.token(uid("creator")))
    user = uid("viewer")
    client = await Client.open(live_server.ws(room, live_server.token(user, ttl=3)))
    await client.next()
    refused = {
        "other": live_server.token(uid("someone"), ttl=3600),
        "expired": live_server.token(user, ttl=-10),
        "forged": live_server.token(user, ttl=3600)[:-4] + "AAAA",
        "garbage": "not-a-token",
    }
    for req, bad in refused.items():
        await client.send({"op": "refresh", "req": req, "token": bad})
        ack = await client.ack(req)
        assert ack["ok"] is False and ack["error"]["code"] == "unauthorized", ack
    await client.send({"op": "refresh", "req": "no-token"})
    assert (await client.ack("no-token"))["error"]["code"] == "bad_request"
    # Still the old token: closed at its exp.
    assert await closed_with(client, timeout=6) == (4401, "token_expired")


# ---------------------------------------------------------------- overlay keys


async def test_overlay_key_follows_the_creator_across_streams(
    live_server: LiveServer, redis_url: str
) -> None:
    creator = uid("creator")
    creator_token = live_server.token(creator, name="Nova")
    made = overlay_key(live_server, creator_token)
    key = made["key"]
    assert len(key) >= 22  # at least 128 random bits, url-safe base64
    assert made["url"] == f"{live_server.base_url}/overlay/u/{creator}?key={key}"
    assert "token" not in made["url"]
    stored = connect_sync(redis_url).get(keys.overlay_key(creator))
    assert stored == hashlib.sha256(key.encode()).hexdigest().encode()  # only the hash

    overlay = await Client.open(follow_url(live_server, creator, key))
    assert await overlay.next() == {"type": "offline", "creator": creator}
    for op in (
        {"op": "gift", "req": "g1", "gift": "rose"},
        {"op": "shoutout", "req": "s1", "to": creator, "text": "hi"},
        {"op": "refresh", "req": "r1", "token": creator_token},
    ):
        await overlay.send(op)
        ack = await overlay.ack(op["req"])
        assert ack["ok"] is False and ack["error"]["code"] == "forbidden", ack

    # The creator goes live: stream_started, then that room's welcome.
    room1 = live_server.create_stream(creator_token)
    assert await overlay.next() == {"type": "stream_started", "room": room1}
    welcome = await overlay.next()
    assert welcome["type"] == "welcome" and welcome["room"] == room1
    assert welcome["creator"] == {"id": creator, "name": "Nova"} and welcome["you"] is None
    user, token = funded_viewer(live_server)
    viewer = await Client.open(live_server.ws(room1, token))
    assert (await viewer.next())["viewers"] == 1  # the overlay is not a viewer
    await viewer.gift("v1")
    gift = await overlay.until(lambda e: e["type"] == "gift")
    assert gift["from"]["id"] == user and gift["seq"] == 1

    # Not counted across processes either (presence, every 2 s).
    await asyncio.sleep(unit(2.5))
    assert live_server.get(f"/api/streams/{room1}").json()["viewers"] == 1

    # The stream ends: stream_ended, then offline; the socket stays open.
    assert live_server.delete(f"/api/streams/{room1}", creator_token).status_code == 200
    ended = await overlay.until(lambda e: e["type"] == "stream_ended")
    assert ended["seq"] == 2
    assert await overlay.next() == {"type": "offline", "creator": creator}

    # The next stream: followed too, with its own seqs.
    room2 = live_server.create_stream(creator_token)
    assert room2 != room1
    assert await overlay.next() == {"type": "stream_started", "room": room2}
    welcome = await overlay.next()
    assert welcome["type"] == "welcome" and welcome["room"] == room2 and welcome["seq"] == 0
    viewer2 = await Client.open(live_server.ws(room2, token))
    await viewer2.next()
    await viewer2.gift("v2")
    gift = await overlay.until(lambda e: e["type"] == "gift")
    assert gift["room"] == room2 and gift["seq"] == 1

    # Going live again while live ends the old stream (one stream per creator) and the
    # overlay ends up in the new one, whichever of the two events comes first.
    room3 = live_server.create_stream(creator_token)
    welcome = await overlay.until(lambda e: e["type"] == "welcome")
    assert welcome["room"] == room3
    await viewer2.close()
    viewer3 = await Client.open(live_server.ws(room3, token))
    await viewer3.next()
    await viewer3.gift("v3")
    gift = await overlay.until(lambda e: e["type"] == "gift")
    assert gift["room"] == room3
    for c in (overlay, viewer, viewer3):
        await c.close()


async def test_an_overlay_joining_a_live_stream_gets_its_welcome_first(
    live_server: LiveServer,
) -> None:
    creator = uid("creator")
    creator_token = live_server.token(creator)
    room = live_server.create_stream(creator_token)
    key = overlay_key(live_server, creator_token)["key"]
    overlay = await Client.open(follow_url(live_server, creator, key), "livegift.msgpack")
    welcome = await overlay.next()
    assert welcome["type"] == "welcome" and welcome["room"] == room
    await overlay.send({"op": "gift", "req": "x", "gift": "rose"})
    assert (await overlay.ack("x"))["error"]["code"] == "forbidden"
    await overlay.close()


async def test_an_overlay_keeps_getting_events_after_the_last_viewer_left(
    live_server: LiveServer,
) -> None:
    creator = uid("creator")
    creator_token = live_server.token(creator)
    room = live_server.create_stream(creator_token)
    key = overlay_key(live_server, creator_token)["key"]
    overlay = await Client.open(follow_url(live_server, creator, key))
    assert (await overlay.next())["type"] == "welcome"
    _, token = funded_viewer(live_server)
    first = await Client.open(live_server.ws(room, token))
    await first.next()
    await first.close()
    await asyncio.sleep(unit(1.5))  # past the hub's linger for a room with no viewers
    second = await Client.open(live_server.ws(room, token))
    await second.next()
    await second.gift("after")
    gift = await overlay.until(lambda e: e["type"] == "gift")
    assert gift["room"] == room
    await second.close()
    await overlay.close()


async def test_a_new_overlay_key_closes_old_overlays_on_every_process(
    server_factory: Any,
) -> None:
    first, second = server_factory(), server_factory()
    creator = uid("creator")
    creator_token = first.token(creator)
    old = overlay_key(first, creator_token)["key"]
    overlays = [await Client.open(follow_url(server, creator, old)) for server in (first, second)]
    for overlay in overlays:
        assert (await overlay.next())["type"] == "offline"

    new = overlay_key(second, creator_token)["key"]
    assert new != old
    for overlay in overlays:
        assert await closed_with(overlay) == (4401, "overlay key revoked")
    # The old key no longer opens anything; the new one does, on both processes.
    stale = await Client.open(follow_url(first, creator, old))
    code, _ = await closed_with(stale)
    assert code == 4401
    for server in (first, second):
        fresh = await Client.open(follow_url(server, creator, new))
        assert (await fresh.next())["type"] == "offline"
        await fresh.close()


async def test_overlay_keys_need_a_user_and_overlays_need_a_key(live_server: LiveServer) -> None:
    assert live_server.post("/api/overlay-key").status_code == 401
    creator = uid("creator")
    for url, status in (
        (f"{live_server.ws_url}/ws/creator/{creator}", 401),
        (f"{live_server.ws_url}/ws/creator/{creator}?key=short", 401),
        (f"{live_server.ws_url}/ws/creator/bad%20id?key={'k' * 32}", 404),
    ):
        with pytest.raises(InvalidStatus) as refused:
            await Client.open(url)
        assert refused.value.response.status_code == status, url
    # A well-formed key that is nobody's: 4401 before any event.
    nobody = await Client.open(follow_url(live_server, creator, "k" * 32))
    assert (await closed_with(nobody))[0] == 4401


# ---------------------------------------------------------------- pages


def test_pages_may_connect_only_to_their_own_origin(live_server: LiveServer) -> None:
    for path in ("/studio/r1", "/watch/r1", "/overlay/r1", "/overlay/u/alice"):
        r = live_server.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";") if d.strip())
        assert directives["connect-src"] == "'self'", csp
        assert "ws:" not in csp and "wss:" not in csp
