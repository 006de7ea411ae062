"""HTTP API (PROTOCOL §3) against a real server and Redis."""

from __future__ import annotations

import pytest

from tests.conftest import LiveServer, uid
from tests.test_ws import bad_token


def test_healthz_and_metrics(live_server: LiveServer) -> None:
    assert live_server.get("/healthz").json() == {"status": "ok"}
    text = live_server.get("/metrics").text
    for name in (
        "livegift_connections",
        "livegift_rooms",
        "livegift_gifts_total",
        "livegift_fanout_seconds",
        "livegift_fanout_batch_events",
        "livegift_redis_errors_total",
    ):
        assert name in text


def test_gift_catalogue(live_server: LiveServer) -> None:
    gifts = live_server.get("/api/gifts").json()["gifts"]
    assert len(gifts) >= 10
    coins = [g["coins"] for g in gifts]
    assert min(coins) == 1 and max(coins) == 34999
    assert {True, False} == {g["streakable"] for g in gifts}
    assert set(gifts[0]) >= {"id", "name", "coins", "streakable"}


def test_packages_by_region(live_server: LiveServer) -> None:
    us = live_server.get("/api/coins/packages").json()
    assert us["region"] == "US" and us["currency"] == "USD"
    assert [(p["coins"], p["price"]) for p in us["packages"]] == [
        (65, 99),
        (330, 499),
        (1321, 1999),
        (6607, 9999),
    ]
    jp = live_server.get("/api/coins/packages", params={"region": "JP"}).json()
    assert jp["currency"] == "JPY"
    for region in ("GB", "EU"):
        assert live_server.get("/api/coins/packages", params={"region": region}).status_code == 200
    bad = live_server.get("/api/coins/packages", params={"region": "XX"})
    assert bad.status_code == 400 and "known regions" in bad.json()["error"]["message"]


def test_recharge_credits_once_per_txn(live_server: LiveServer) -> None:
    user = uid()
    token = live_server.token(user)
    receipt = live_server.receipt(user, "p330", txn=f"txn-{user}")
    first = live_server.post("/api/wallet/recharge", {"receipt": receipt}, token=token)
    assert first.status_code == 200
    body = first.json()
    assert body["transaction"]["coins"] == 330 and body["transaction"]["amount"] == 499
    assert body["transaction"]["currency"] == "USD" and body["balance"] == {
        "coins": 330,
        "diamonds": 0,
    }
    again = live_server.post("/api/wallet/recharge", {"receipt": receipt}, token=token)
    assert again.status_code == 200
    assert again.json()["transaction"] == body["transaction"]
    assert again.json()["balance"]["coins"] == 330
    assert live_server.get("/api/wallet", token).json() == {
        "user": user,
        "coins": 330,
        "diamonds": 0,
    }
    # JP is zero-decimal: 6607 coins for 16000 JPY.
    jp = live_server.recharge(token, user, "p6607", "JP")
    assert jp["transaction"]["currency"] == "JPY" and jp["transaction"]["amount"] == 16000


def test_recharge_rejections(live_server: LiveServer) -> None:
    import jwt

    user = uid()
    token = live_server.token(user)

    def post(receipt: object) -> tuple[int, str]:
        r = live_server.post("/api/wallet/recharge", {"receipt": receipt}, token=token)
        return r.status_code, r.json()["error"]["code"]

    def signed(**claims: object) -> str:
        base = {
            "txn": uid("t"),
            "sub": user,
            "package": "p65",
            "region": "US",
            "amount": 99,
            "currency": "USD",
        }
        return jwt.encode({**base, **claims}, live_server.payment_secret, "HS256")

    assert post(signed(amount=1)) == (400, "price_mismatch")
    assert post(signed(currency="EUR")) == (400, "price_mismatch")
    assert post(signed(package="p999")) == (400, "unknown_package")
    assert post(signed(sub="someone_else")) == (400, "invalid_receipt")
    assert post(
        jwt.encode({"txn": "x", "sub": user}, "forged-key-0123456789abcdef0123456", "HS256")
    ) == (400, "invalid_receipt")
    assert post(None) == (400, "invalid_receipt")
    r = live_server.http.post(
        "/api/wallet/recharge", content=b"{not json", headers=live_server.headers(token)
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    assert live_server.get("/api/wallet", token).json()["coins"] == 0


@pytest.mark.parametrize("kind", ["missing", "garbage", "expired", "wrong_key", "alg_none"])
def test_bad_tokens_are_refused_on_http(live_server: LiveServer, kind: str) -> None:
    token = bad_token(live_server, kind)
    for method, path in (("GET", "/api/wallet"), ("POST", "/api/streams"), ("GET", "/api/payouts")):
        r = live_server.http.request(method, path, headers=live_server.headers(token))
        assert r.status_code == 401, (method, path)
        assert r.json()["error"]["code"] == "unauthorized"


def test_streams_create_get_end(live_server: LiveServer) -> None:
    creator = uid("c")
    token = live_server.token(creator, name="Cat")
    r = live_server.post("/api/streams", {"title": "Hello"}, token=token)
    assert r.status_code == 201
    body = r.json()
    assert body["live"] is True and body["creator"] == {"id": creator, "name": "Cat"}
    room = body["room"]
    info = live_server.get(f"/api/streams/{room}").json()
    assert info["live"] is True and info["coins_received"] == 0 and info["top_gifters"] == []
    assert info["viewers"] == 0
    assert live_server.delete(f"/api/streams/{room}", token).status_code == 200
    assert live_server.get(f"/api/streams/{room}").json()["live"] is False
    assert live_server.get("/api/streams/nope").status_code == 404
    # Going live again gives a fresh room, whatever the creator's other streams do; one
    # live stream per creator, so the third ends the second (its stream_ended is seq 1).
    again = live_server.post("/api/streams", {}, token=token)
    third = live_server.post("/api/streams", {}, token=token)
    assert again.status_code == third.status_code == 201
    assert len({room, again.json()["room"], third.json()["room"]}) == 3
    assert live_server.get(f"/api/streams/{third.json()['room']}").json()["seq"] == 0
    second = live_server.get(f"/api/streams/{again.json()['room']}").json()
    assert (second["live"], second["seq"]) == (False, 1)
    assert live_server.get("/api/nothing-here").json()["error"]["code"] == "not_found"


def test_error_shape_on_bad_body(live_server: LiveServer) -> None:
    token = live_server.token(uid())
    r = live_server.post("/api/streams", {"title": 5}, token=token)
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"code", "message"}
