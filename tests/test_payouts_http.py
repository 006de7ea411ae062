"""Cash-out over HTTP (PROTOCOL §2-3, issue 4 item 3) and operator settlement via the CLI.

A real server and Redis: creators earn diamonds from real WebSocket gifts, cash out with
``POST /api/payouts`` and are settled with ``python -m livegift payout <id> paid|failed``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import httpx
import pytest

from livegift import keys, store
from tests.conftest import ROOT, LiveServer, uid, unit
from tests.wsclient import Client

PUBLIC = {"id", "diamonds", "gross", "commission", "net", "currency", "status"}


async def earn(server: LiveServer, packages: list[str], gifts: list[tuple[str, int]]) -> str:
    """A new creator token whose owner received ``gifts`` from a fan who bought ``packages``."""
    creator, fan = uid("c"), uid("f")
    creator_token, fan_token = server.token(creator), server.token(fan)
    for package in packages:
        server.recharge(fan_token, fan, package)
    room = server.create_stream(creator_token)
    client = await Client.open(server.ws(room, fan_token))
    try:
        for i, (gift, count) in enumerate(gifts):
            ack = await client.gift(f"g{i}", gift, count)
            assert ack["ok"], ack
    finally:
        await client.close()
    return creator_token


def payout(server: LiveServer, token: str, body: Any, key: str | None = None) -> httpx.Response:
    headers = {"idempotency-key": key} if key is not None else {}
    return server.post("/api/payouts", body, token=token, headers=headers)


def error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def wallet(server: LiveServer, token: str) -> tuple[int, int]:
    w = server.get("/api/wallet", token).json()
    return w["coins"], w["diamonds"]


def settle(redis_url: str, payout_id: str, outcome: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "livegift", "payout", payout_id, outcome],
        env={"REDIS_URL": redis_url, "PATH": ""},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=unit(60),
    )


async def test_payout_split_replay_and_conflict(live_server: LiveServer, redis_url: str) -> None:
    token = await earn(live_server, ["p6607"], [("galaxy", 5)])  # 5,000 diamonds
    user = live_server.get("/api/wallet", token).json()["user"]
    first = payout(live_server, token, {"diamonds": 2001}, key="cash-1")
    assert first.status_code == 201, first.text
    body = first.json()
    p = body["payout"]
    assert set(p) >= PUBLIC and p["id"].startswith("po_")
    # 1 diamond = 1 cent gross; net = floor(2001 × 5000 / 10000) = 1000; commission = rest.
    assert (p["diamonds"], p["gross"], p["net"], p["commission"]) == (2001, 2001, 1000, 1001)
    assert (p["currency"], p["status"]) == ("USD", "pending")
    assert wallet(live_server, token) == (0, 5000 - 2001)

    again = payout(live_server, token, {"diamonds": 2001}, key="cash-1")
    assert again.status_code == 201 and again.json() == body
    assert wallet(live_server, token) == (0, 5000 - 2001)

    assert error(payout(live_server, token, {"diamonds": 1500}, key="cash-1")) == (
        409,
        "idempotency_conflict",
    )
    assert wallet(live_server, token) == (0, 5000 - 2001)
    listed = live_server.get("/api/payouts", token).json()["payouts"]
    assert [x["id"] for x in listed] == [p["id"]]

    # Keys are per user and kept at least 24 hours (48 here).
    ttl = store.connect_sync(redis_url).ttl(keys.payout_idem(user, "cash-1"))  # any store kind
    assert 47 * 3600 < ttl <= 48 * 3600
    other = await earn(live_server, ["p1321"], [("galaxy", 1)])
    mine = payout(live_server, other, {"diamonds": 1000}, key="cash-1")
    assert mine.status_code == 201 and mine.json()["payout"]["id"] != p["id"]

    # Without a key, each request is a new payout.
    a = payout(live_server, token, {"diamonds": 1000})
    b = payout(live_server, token, {"diamonds": 1000})
    assert a.status_code == b.status_code == 201
    assert a.json()["payout"]["id"] != b.json()["payout"]["id"]
    assert wallet(live_server, token) == (0, 5000 - 2001 - 2000)


async def test_concurrent_retries_with_one_key_pay_once(live_server: LiveServer) -> None:
    token = await earn(live_server, ["p6607"], [("galaxy", 3)])
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=unit(10)) as http:
        headers = {"authorization": f"Bearer {token}", "idempotency-key": "same"}
        responses = await asyncio.gather(
            *(http.post("/api/payouts", json={"diamonds": 1200}, headers=headers) for _ in range(8))
        )
    assert {r.status_code for r in responses} == {201}
    assert len({r.content for r in responses}) == 1
    assert wallet(live_server, token) == (0, 3000 - 1200)
    assert len(live_server.get("/api/payouts", token).json()["payouts"]) == 1


async def test_payout_rejections_change_nothing(live_server: LiveServer) -> None:
    token = await earn(live_server, ["p1321"], [("galaxy", 1)])  # 1,000 diamonds
    assert error(payout(live_server, token, {"diamonds": 999})) == (400, "below_minimum")
    assert error(payout(live_server, token, {"diamonds": 1001})) == (402, "insufficient_funds")
    for body in (
        {},
        {"diamonds": "1000"},
        {"diamonds": 1000.0},
        {"diamonds": True},
        {"diamonds": 0},
        {"diamonds": -1000},
        {"diamonds": None},
        {"diamonds": 10**16},
        [1000],
    ):
        assert error(payout(live_server, token, body)) == (400, "bad_request"), body
    r = live_server.http.post("/api/payouts", content=b"{nope", headers=live_server.headers(token))
    assert error(r) == (400, "bad_request")
    assert error(payout(live_server, token, {"diamonds": 1000}, key="k" * 256)) == (
        400,
        "bad_request",
    )
    assert error(payout(live_server, token, {"diamonds": 1000}, key="")) == (400, "bad_request")
    assert wallet(live_server, token) == (0, 1000)
    assert live_server.get("/api/payouts", token).json()["payouts"] == []
    # A key that failed once is not burnt: the same key works when the request is valid.
    assert payout(live_server, token, {"diamonds": 1000}, key="k" * 255).status_code == 201

    minor = live_server.token(uid("kid"), birthdate="2015-06-01")
    assert error(payout(live_server, minor, {"diamonds": 1000})) == (403, "not_adult")
    no_birthdate = live_server.token(uid("anon"), birthdate=None)
    assert error(payout(live_server, no_birthdate, {"diamonds": 1000})) == (403, "not_adult")
    assert error(payout(live_server, None, {"diamonds": 1000})) == (401, "unauthorized")
    assert live_server.get("/api/payouts", minor).json() == {"payouts": []}


async def test_daily_net_cap_and_failed_payout_frees_it(
    live_server: LiveServer, redis_url: str
) -> None:
    # The default cap is 100,000 cents net per UTC day: 200,000 diamonds gross at 50 %.
    token = await earn(live_server, ["p6607"] * 31, [("universe", 5), ("sports_car", 4)])
    assert wallet(live_server, token) == (0, 202_995)
    big = payout(live_server, token, {"diamonds": 198_000}, key="big")
    assert big.status_code == 201 and big.json()["payout"]["net"] == 99_000
    small = payout(live_server, token, {"diamonds": 2_000}, key="small")
    assert small.status_code == 201 and small.json()["payout"]["net"] == 1_000  # exactly 100k
    assert error(payout(live_server, token, {"diamonds": 1_000}, key="over")) == (
        409,
        "payout_limit",
    )
    assert wallet(live_server, token) == (0, 2_995)

    # The operator marks the small one failed: diamonds come back through a reversal entry
    # and its net no longer counts against today's cap.
    small_id = small.json()["payout"]["id"]
    done = settle(redis_url, small_id, "failed")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "failed"
    assert wallet(live_server, token) == (0, 4_995)
    newest = live_server.get("/api/wallet/transactions", token, params={"limit": 1}).json()
    entry = newest["transactions"][0]
    assert (entry["kind"], entry["amount"], entry["reference"]) == (
        "payout_reversal",
        2_000,
        small_id,
    )
    assert (entry["asset"], entry["balance"], entry["counterparty"]) == (
        "diamonds",
        4_995,
        "payouts",
    )
    assert payout(live_server, token, {"diamonds": 1_000}, key="over").status_code == 201
    assert error(payout(live_server, token, {"diamonds": 2_000}, key="over2")) == (
        409,
        "payout_limit",
    )


async def test_operator_settles_with_the_cli(live_server: LiveServer, redis_url: str) -> None:
    token = await earn(live_server, ["p6607"], [("galaxy", 4)])
    ids = [
        payout(live_server, token, {"diamonds": 1000}, key=f"k{i}").json()["payout"]["id"]
        for i in range(3)
    ]
    assert wallet(live_server, token) == (0, 1000)
    paid = settle(redis_url, ids[0], "paid")
    assert paid.returncode == 0 and json.loads(paid.stdout)["status"] == "paid"
    assert wallet(live_server, token) == (0, 1000)  # paid: the diamonds stay out
    again = settle(redis_url, ids[0], "paid")
    assert again.returncode == 0 and json.loads(again.stdout) == json.loads(paid.stdout)
    flip = settle(redis_url, ids[0], "failed")
    assert flip.returncode == 1 and "bad_request" in flip.stderr
    assert wallet(live_server, token) == (0, 1000)
    failed = settle(redis_url, ids[1], "failed")
    assert failed.returncode == 0 and json.loads(failed.stdout)["status"] == "failed"
    assert wallet(live_server, token) == (0, 2000)
    assert settle(redis_url, ids[1], "failed").returncode == 0
    assert wallet(live_server, token) == (0, 2000)  # settling twice returns nothing twice
    missing = settle(redis_url, "po_doesnotexist", "paid")
    assert missing.returncode == 1 and "not_found" in missing.stderr

    listed = live_server.get("/api/payouts", token).json()["payouts"]
    assert {p["id"]: p["status"] for p in listed} == {
        ids[0]: "paid",
        ids[1]: "failed",
        ids[2]: "pending",
    }
    assert [p["created"] for p in listed] == sorted((p["created"] for p in listed), reverse=True)
    assert all(p["gross"] == p["net"] + p["commission"] for p in listed)
    assert all("settled" in p for p in listed if p["status"] != "pending")
    # A payout is the caller's own: another creator sees none of them.
    other = live_server.token(uid("c"))
    assert live_server.get("/api/payouts", other).json() == {"payouts": []}
    kinds = [
        (e["kind"], e["reference"])
        for e in live_server.get("/api/wallet/transactions", token).json()["transactions"]
    ]
    assert kinds[:4] == [
        ("payout_reversal", ids[1]),
        ("payout", ids[2]),
        ("payout", ids[1]),
        ("payout", ids[0]),
    ]


@pytest.mark.parametrize("bps", ["0", "3333", "10000"])
async def test_commission_is_configurable_and_floors_net(server_factory: Any, bps: str) -> None:
    server: LiveServer = server_factory({"LIVEGIFT_COMMISSION_BPS": bps})
    token = await earn(server, ["p6607"], [("galaxy", 2)])
    p = payout(server, token, {"diamonds": 1999}).json()["payout"]
    net = 1999 * (10_000 - int(bps)) // 10_000
    assert (p["gross"], p["net"], p["commission"]) == (1999, net, 1999 - net)
