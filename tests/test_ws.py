"""End to end over real sockets: a real uvicorn, a real Redis, real WebSocket clients."""

from __future__ import annotations

import asyncio
import socket

import msgpack
import orjson
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import LiveServer, uid, unit
from tests.wsclient import Client


async def stream(server: LiveServer) -> tuple[str, str, str]:
    creator = uid("creator")
    token = server.token(creator, name="Creator")
    return server.create_stream(token), creator, token


async def viewer(
    server: LiveServer, coins_package: str | None = "p1321", **kw: object
) -> tuple[str, str]:
    user = uid("viewer")
    token = server.token(user, **kw)  # type: ignore[arg-type]
    if coins_package:
        server.recharge(token, user, coins_package)
    return user, token


async def test_welcome_then_gift_reaches_every_member(live_server: LiveServer) -> None:
    room, creator, creator_token = await stream(live_server)
    user, token = await viewer(live_server, name="Alice")
    watcher = await Client.open(live_server.ws(room, creator_token))
    welcome = await watcher.next()
    assert welcome["type"] == "welcome" and welcome["seq"] == 0
    assert welcome["creator"] == {"id": creator, "name": "Creator"}
    sender = await Client.open(live_server.ws(room, token))
    hello = await sender.next()
    assert hello["you"] == {"id": user, "name": "Alice"} and hello["viewers"] >= 1
    ack = await sender.gift("r1", "rose", 3)
    assert ack == {
        "type": "ack",
        "req": "r1",
        "ok": True,
        "balance": 1321 - 3,
        "seq": 1,
        "combo": 3,
    }
    event = await watcher.until(lambda e: e["type"] == "gift")
    assert event["seq"] == 1 and event["count"] == 3 and event["coins"] == 3
    assert event["from"] == {"id": user, "name": "Alice"}
    assert event["gift"] == {"id": "rose", "name": "Rose", "coins": 1}
    assert isinstance(event["ts"], int) and event["combo"] == 3
    wallet = live_server.get("/api/wallet", creator_token).json()
    assert wallet["diamonds"] == 3
    await watcher.close()
    await sender.close()


async def test_fifty_viewers_each_get_two_hundred_gifts_once_in_order(
    live_server: LiveServer,
) -> None:
    room, _, _ = await stream(live_server)
    viewers = [await Client.open(live_server.ws(room, live_server.token(uid()))) for _ in range(50)]
    for v in viewers:
        assert (await v.next())["type"] == "welcome"
    gifters = [await viewer(live_server) for _ in range(4)]
    senders = [await Client.open(live_server.ws(room, t)) for _, t in gifters]

    async def send_all(client: Client, n: int) -> None:
        for i in range(n):
            assert (await client.gift(f"g{i}"))["ok"]

    await asyncio.gather(*(send_all(s, 50) for s in senders))

    async def collect(client: Client) -> list[int]:
        seqs: list[int] = []
        while len(seqs) < 200:
            event = await client.next(timeout=10)
            if event["type"] == "gift":
                seqs.append(event["seq"])
        return seqs

    results = await asyncio.gather(*(collect(v) for v in viewers))
    for seqs in results:
        assert seqs == list(range(1, 201))
    for v in viewers:  # nothing more (no duplicates) arrives
        with pytest.raises(TimeoutError):
            await v.until(lambda e: e["type"] == "gift", timeout=0.3)
    for c in viewers + senders:
        await c.close()


async def test_double_spend_exactly_ten_of_a_hundred_succeed(live_server: LiveServer) -> None:
    room, _, _ = await stream(live_server)
    user, token = await viewer(live_server, coins_package="p65")
    # Spend 55 so the wallet covers exactly 10 roses.
    spender = await Client.open(live_server.ws(room, token))
    assert (await spender.gift("spend", "finger_heart", 11))["balance"] == 10
    sockets = [await Client.open(live_server.ws(room, token)) for _ in range(5)]

    async def fire(client: Client, k: int) -> list[dict[str, object]]:
        for i in range(20):
            await client.send({"op": "gift", "req": f"ds-{k}-{i}", "gift": "rose"})
        return [await client.ack(f"ds-{k}-{i}") for i in range(20)]

    acks = [
        a
        for batch in await asyncio.gather(*(fire(c, k) for k, c in enumerate(sockets)))
        for a in batch
    ]
    ok = [a for a in acks if a["ok"]]
    assert len(ok) == 10
    assert {a["error"]["code"] for a in acks if not a["ok"]} == {"insufficient_funds"}  # type: ignore[index]
    assert live_server.get("/api/wallet", token).json()["coins"] == 0
    for c in [spender, *sockets]:
        await c.close()


async def test_retried_req_is_charged_once_and_returns_first_outcome(
    live_server: LiveServer,
) -> None:
    room, _, _ = await stream(live_server)
    user, token = await viewer(live_server)
    first = await Client.open(live_server.ws(room, token))
    a1 = await first.gift("same-req", "donut", 2)
    await first.close()
    again = await Client.open(live_server.ws(room, token))  # e.g. after a reconnect
    a2 = await again.gift("same-req", "donut", 2)
    assert a1 == a2
    assert live_server.get("/api/wallet", token).json()["coins"] == 1321 - 60
    await again.send({"op": "gift", "req": "same-req", "gift": "donut", "count": 3})
    conflict = await again.ack("same-req")
    assert conflict["ok"] is False and conflict["error"]["code"] == "idempotency_conflict"
    await again.close()


@pytest.mark.parametrize(
    ("op", "code"),
    [
        ({"op": "gift", "req": "x", "gift": "rose", "count": 0}, "bad_request"),
        ({"op": "gift", "req": "x", "gift": "rose", "count": 100}, "bad_request"),
        ({"op": "gift", "req": "x", "gift": "rose", "count": "2"}, "bad_request"),
        ({"op": "gift", "req": "", "gift": "rose"}, "bad_request"),
        ({"op": "gift", "req": "x" * 65, "gift": "rose"}, "bad_request"),
        ({"op": "teleport", "req": "x"}, "bad_request"),
        ({"op": "gift", "req": "x", "gift": "unicorn"}, "unknown_gift"),
        ({"op": "gift", "req": "x", "gift": "universe"}, "insufficient_funds"),
    ],
)
async def test_gift_rule_errors(live_server: LiveServer, op: dict[str, object], code: str) -> None:
    room, _, _ = await stream(live_server)
    user, token = await viewer(live_server)
    client = await Client.open(live_server.ws(room, token))
    await client.next()
    await client.send(op)
    ack = await client.until(lambda e: e["type"] == "ack")
    assert ack["ok"] is False and ack["error"]["code"] == code and ack["error"]["message"]
    assert live_server.get("/api/wallet", token).json()["coins"] == 1321
    assert live_server.get(f"/api/streams/{room}").json()["seq"] == 0
    await client.close()


async def test_non_adult_can_watch_but_not_gift_or_recharge(live_server: LiveServer) -> None:
    room, _, _ = await stream(live_server)
    kid = uid("kid")
    token = live_server.token(kid, birthdate="2015-01-01")
    r = live_server.post("/api/wallet/recharge", {"receipt": live_server.receipt(kid)}, token=token)
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_adult"
    no_birthdate = live_server.token(uid("anon"), birthdate=None)
    r = live_server.post("/api/streams", {}, token=no_birthdate)
    assert r.json()["error"]["code"] == "not_adult"
    client = await Client.open(live_server.ws(room, token))
    assert (await client.next())["type"] == "welcome"
    ack = await client.gift("k1")
    assert ack["error"]["code"] == "not_adult"
    await client.close()


async def test_self_gift_and_ended_stream(live_server: LiveServer) -> None:
    room, creator, creator_token = await stream(live_server)
    live_server.recharge(creator_token, creator)
    own = await Client.open(live_server.ws(room, creator_token))
    assert (await own.gift("s1"))["error"]["code"] == "self_gift"
    user, token = await viewer(live_server)
    client = await Client.open(live_server.ws(room, token))
    await client.next()
    assert live_server.delete(f"/api/streams/{room}", token).json()["error"]["code"] == "forbidden"
    assert live_server.delete(f"/api/streams/{room}", creator_token).json() == {
        "room": room,
        "live": False,
    }
    ended = await client.until(lambda e: e["type"] == "stream_ended")
    assert ended["seq"] == 1
    with pytest.raises(ConnectionClosed) as closed:
        await client.next()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    # Joining an ended stream closes with 4404; gifting to it is stream_not_live.
    late = await Client.open(live_server.ws(room, token))
    with pytest.raises(ConnectionClosed) as refused:
        await late.next()
    assert refused.value.rcvd is not None and refused.value.rcvd.code == 4404
    with pytest.raises(ConnectionClosed):  # own socket was closed by stream_ended too
        await own.send({"op": "gift", "req": "late", "gift": "rose"})
        await own.ack("late")


async def test_rate_limit_answers_rate_limited(server_factory: object) -> None:
    server = server_factory({"LIVEGIFT_GIFT_RATE": "10", "LIVEGIFT_GIFT_BURST": "20"})  # type: ignore[operator]
    room, _, _ = await stream(server)
    user, token = await viewer(server)
    client = await Client.open(server.ws(room, token))
    for i in range(30):
        await client.send({"op": "gift", "req": f"rl{i}", "gift": "rose"})
    acks = [await client.ack(f"rl{i}") for i in range(30)]
    ok = sum(1 for a in acks if a["ok"])
    assert 20 <= ok <= 23  # the burst, plus what refilled at 10/s meanwhile
    assert {a["error"]["code"] for a in acks if not a["ok"]} == {"rate_limited"}
    assert server.get("/api/wallet", token).json()["coins"] == 1321 - ok
    await client.close()


async def test_unknown_room_closes_4404(live_server: LiveServer) -> None:
    client = await Client.open(live_server.ws("no-such-room", live_server.token(uid())))
    with pytest.raises(ConnectionClosed) as closed:
        await client.next()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


async def test_shoutout_by_creator_only(live_server: LiveServer) -> None:
    room, _, creator_token = await stream(live_server)
    user, token = await viewer(live_server, name="Bob")
    fan = await Client.open(live_server.ws(room, token))
    await fan.gift("g", "rose")
    studio = await Client.open(live_server.ws(room, creator_token))
    await studio.send({"op": "shoutout", "req": "so1", "to": user, "text": "Thanks Bob!"})
    assert (await studio.ack("so1"))["ok"]
    event = await fan.until(lambda e: e["type"] == "shoutout")
    assert event["to"] == {"id": user, "name": "Bob"} and event["text"] == "Thanks Bob!"
    assert event["auto"] is False and event["seq"] == 2
    await fan.send({"op": "shoutout", "req": "so2", "to": user, "text": "me!"})
    assert (await fan.ack("so2"))["error"]["code"] == "forbidden"
    await fan.close()
    await studio.close()


async def test_big_gift_triggers_auto_shoutout(live_server: LiveServer) -> None:
    room, _, _ = await stream(live_server)
    user, token = await viewer(live_server, coins_package="p6607", name="Whale")
    client = await Client.open(live_server.ws(room, token))
    ack = await client.gift("big", "galaxy")
    assert ack["ok"] and ack["seq"] == 1
    shout = await client.until(lambda e: e["type"] == "shoutout")
    assert shout["auto"] is True and shout["seq"] == 2 and "Whale" in shout["text"]
    await client.close()


async def test_combo_counts_consecutive_streakable_gifts(live_server: LiveServer) -> None:
    room, _, _ = await stream(live_server)
    user, token = await viewer(live_server)
    client = await Client.open(live_server.ws(room, token))
    combos = [(await client.gift(f"c{i}", "rose", 2))["combo"] for i in range(3)]
    assert combos == [2, 4, 6]
    assert (await client.gift("d", "donut"))["combo"] == 1  # another gift breaks the streak
    assert (await client.gift("e", "rose"))["combo"] == 1
    assert (await client.gift("f", "hand_hearts", 3))["combo"] == 3  # not streakable: = count
    await client.close()


async def test_msgpack_subprotocol(live_server: LiveServer) -> None:
    room, _, _ = await stream(live_server)
    user, token = await viewer(live_server)
    client = await Client.open(live_server.ws(room, token), subprotocol="livegift.msgpack")
    assert client.ws.subprotocol == "livegift.msgpack"
    frame = await client.ws.recv()
    assert isinstance(frame, bytes) and msgpack.unpackb(frame)["type"] == "welcome"
    await client.send({"op": "gift", "req": "m1", "gift": "rose"})
    ack = await client.ack("m1")
    assert ack["ok"] and ack["seq"] == 1
    await client.close()


async def test_default_subprotocol_is_json(live_server: LiveServer) -> None:
    room, _, _ = await stream(live_server)
    client = await Client.open(live_server.ws(room, live_server.token(uid())), subprotocol=None)
    frame = await client.ws.recv()
    assert isinstance(frame, str) and orjson.loads(frame)["type"] == "welcome"
    await client.close()


async def test_oversized_frame_closes_1009(live_server: LiveServer) -> None:
    room, _, _ = await stream(live_server)
    client = await Client.open(live_server.ws(room, live_server.token(uid())))
    await client.next()
    await client.ws.send("x" * 5000)
    with pytest.raises(ConnectionClosed) as closed:
        await client.next()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_garbage_gets_bad_request_and_socket_stays_open(live_server: LiveServer) -> None:
    room, _, _ = await stream(live_server)
    user, token = await viewer(live_server)
    client = await Client.open(live_server.ws(room, token))
    await client.next()
    for junk in ["not json", "[1,2,3]", '{"req": "j1"}', "\x00\x01", '{"op":"gift","req":"j2"}']:
        await client.ws.send(junk)
        ack = await client.until(lambda e: e["type"] == "ack")
        assert ack["ok"] is False and ack["error"]["code"] == "bad_request"
    assert (await client.gift("after-junk"))["ok"]  # still open and working
    await client.send({"req": "j1"})
    assert (await client.until(lambda e: e["type"] == "ack"))["req"] == "j1"
    await client.close()


async def test_endless_garbage_is_closed_1008(live_server: LiveServer) -> None:
    room, _, _ = await stream(live_server)
    client = await Client.open(live_server.ws(room, live_server.token(uid())))
    await client.next()
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(100):
            await client.ws.send("garbage")
            await client.next()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


@pytest.mark.parametrize("kind", ["missing", "garbage", "expired", "wrong_key", "alg_none"])
async def test_bad_tokens_are_refused_on_websocket(live_server: LiveServer, kind: str) -> None:
    room, _, _ = await stream(live_server)
    token = bad_token(live_server, kind)
    url = f"{live_server.ws_url}/ws/{room}" + (f"?token={token}" if token else "")
    with pytest.raises(InvalidStatus) as refused:
        await Client.open(url)
    assert refused.value.response.status_code == 401


def bad_token(server: LiveServer, kind: str) -> str | None:
    import jwt

    user = uid()
    if kind == "missing":
        return None
    if kind == "garbage":
        return "not.a.jwt"
    if kind == "expired":
        return server.token(user, ttl=-10)
    if kind == "wrong_key":
        return jwt.encode(
            {"sub": user, "exp": 4102444800}, "another-secret-0123456789abcdef012345", "HS256"
        )
    header = orjson.dumps({"alg": "none", "typ": "JWT"})
    body = orjson.dumps({"sub": user, "exp": 4102444800, "birthdate": "1990-01-01"})
    import base64

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(body)}."


async def test_token_in_authorization_header(live_server: LiveServer) -> None:
    room, _, _ = await stream(live_server)
    token = live_server.token(uid())
    client = await Client.open(
        f"{live_server.ws_url}/ws/{room}", additional_headers={"Authorization": f"Bearer {token}"}
    )
    assert (await client.next())["type"] == "welcome"
    await client.close()


async def test_slow_reader_is_closed_4008_and_others_keep_up(server_factory: object) -> None:
    server = server_factory(
        {
            "LIVEGIFT_SEND_BUFFER": "65536",
            "LIVEGIFT_SOCKET_SNDBUF": "16384",
            "LIVEGIFT_BATCH_MS": "0",
        }
    )  # type: ignore[operator]
    room, _, _ = await stream(server)
    # A raw socket that completes the handshake, then never reads.
    token = server.token(uid())
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", server.port))
    slow.sendall(
        (
            f"GET /ws/{room}?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    fast = await Client.open(server.ws(room, server.token(uid())))
    await fast.next()
    gifters = [await viewer(server, coins_package="p6607", name="N" * 64) for _ in range(3)]
    senders = [await Client.open(server.ws(room, t)) for _, t in gifters]
    big = "x" * 1000

    async def send(client: Client, n: int) -> None:
        for i in range(n):
            await client.send({"op": "gift", "req": f"s{i}-{big[:40]}", "gift": "rose"})
        for i in range(n):
            await client.ack(f"s{i}-{big[:40]}", timeout=20)

    async def read_all() -> list[int]:
        seqs: list[int] = []
        while len(seqs) < 900:
            event = await fast.next(timeout=10)
            if event["type"] == "gift":
                seqs.append(event["seq"])
        return seqs

    reader = asyncio.create_task(read_all())
    await asyncio.gather(*(send(s, 300) for s in senders))
    assert await reader == list(range(1, 901))
    metrics = server.get("/metrics").text
    assert "livegift_slow_closes_total 1.0" in metrics
    # The slow socket's server side is gone: reading drains what was buffered, then EOF.
    slow.settimeout(unit(10))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    got = b""
    while True:
        try:
            chunk = slow.recv(1 << 16)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        got += chunk
    slow.close()
    for c in [fast, *senders]:
        await c.close()


async def test_many_rooms_joined_at_once(live_server: LiveServer) -> None:
    rooms = [(await stream(live_server))[0] for _ in range(40)]
    token = live_server.token(uid())

    async def join(room: str) -> dict[str, object]:
        client = await Client.open(live_server.ws(room, token))
        try:
            return await client.next(timeout=5)
        finally:
            await client.close()

    welcomes = await asyncio.gather(*(join(room) for room in rooms * 2))
    assert [w["type"] for w in welcomes] == ["welcome"] * 80
