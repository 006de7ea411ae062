"""The ledger over HTTP (issue 4 item 2) and the optional daily coin-spend cap (item 5).

``GET /api/wallet/transactions``: the caller's own immutable entries, newest first, with a
limit (at most 200) and a cursor. The spend cap is checked in the same Lua call as the
gift, so a refused gift leaves no entry behind.
"""

from __future__ import annotations

from typing import Any

from tests.conftest import LiveServer, uid
from tests.wsclient import Client

FIELDS = {
    "id",
    "ts",
    "kind",
    "account",
    "asset",
    "amount",
    "balance",
    "counterparty",
    "reference",
    "room",
}


def entries(server: LiveServer, token: str, **params: Any) -> dict[str, Any]:
    r = server.get("/api/wallet/transactions", token, params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_entries_are_own_newest_first_and_complete(live_server: LiveServer) -> None:
    fan, creator = uid("f"), uid("c")
    fan_token, creator_token = live_server.token(fan), live_server.token(creator)
    txn = f"txn-{fan}"
    live_server.recharge(fan_token, fan, "p330", txn=txn)
    room = live_server.create_stream(creator_token)
    client = await Client.open(live_server.ws(room, fan_token))
    assert (await client.gift("r1", "rose", 3))["ok"]
    assert (await client.gift("d1", "donut", 2))["ok"]
    assert (await client.gift("d1", "donut", 2))["ok"]  # a retry: no new entries
    await client.close()

    mine = entries(live_server, fan_token)
    assert mine["next_cursor"] is None
    rows = mine["transactions"]
    assert all(set(e) == FIELDS | ({"transfer"} if e["room"] else set()) for e in rows)
    assert [(e["kind"], e["amount"], e["balance"], e["reference"]) for e in rows] == [
        ("gift_debit", -60, 267, "d1"),
        ("gift_debit", -3, 327, "r1"),
        ("purchase", 330, 330, txn),
    ]
    assert all(e["account"] == fan and e["asset"] == "coins" for e in rows)
    assert [e["counterparty"] for e in rows] == [creator, creator, "store"]
    assert [e["room"] for e in rows] == [room, room, None]
    assert [e["id"] for e in rows] == sorted((e["id"] for e in rows), reverse=True)
    assert [e["ts"] for e in rows] == sorted((e["ts"] for e in rows), reverse=True)

    theirs = entries(live_server, creator_token)["transactions"]
    assert [(e["kind"], e["amount"], e["balance"]) for e in theirs] == [
        ("gift_credit", 60, 63),
        ("gift_credit", 3, 3),
    ]
    assert all(e["account"] == creator and e["counterparty"] == fan for e in theirs)
    assert all(e["asset"] == "diamonds" for e in theirs)
    # Each credit names the transfer its debit started (the debit's id), and the same req.
    debits = [e for e in rows if e["kind"] == "gift_debit"]
    assert [e["transfer"] for e in debits] == [e["id"] for e in debits]
    assert [(e["transfer"], e["reference"]) for e in theirs] == [
        (e["id"], e["reference"]) for e in debits
    ]
    assert all("transfer" not in e for e in rows if e["kind"] == "purchase")
    assert entries(live_server, live_server.token(uid("nobody"))) == {
        "transactions": [],
        "next_cursor": None,
    }


async def test_cursor_pages_through_everything_once(live_server: LiveServer) -> None:
    fan, creator = uid("f"), uid("c")
    fan_token = live_server.token(fan)
    live_server.recharge(fan_token, fan, "p65")
    room = live_server.create_stream(live_server.token(creator))
    client = await Client.open(live_server.ws(room, fan_token))
    for i in range(11):
        assert (await client.gift(f"r{i}", "rose", 1))["ok"]
    await client.close()

    everything = entries(live_server, fan_token, limit=200)["transactions"]
    assert len(everything) == 12
    seen: list[dict[str, Any]] = []
    cursor: int | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 5}
        if cursor is not None:
            params["cursor"] = cursor
        page = entries(live_server, fan_token, **params)
        seen += page["transactions"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert cursor == page["transactions"][-1]["id"]
    assert pages == 3 and seen == everything
    assert [e["balance"] for e in seen] == [*range(54, 65), 65]
    # Exactly a page's worth left: the last full page may point at an empty one.
    tail = entries(live_server, fan_token, limit=2, cursor=everything[-3]["id"])
    assert [e["id"] for e in tail["transactions"]] == [e["id"] for e in everything[-2:]]
    assert tail["next_cursor"] == everything[-1]["id"]
    assert entries(live_server, fan_token, limit=2, cursor=tail["next_cursor"]) == {
        "transactions": [],
        "next_cursor": None,
    }


def test_limit_and_cursor_validation(live_server: LiveServer) -> None:
    token = live_server.token(uid())
    assert len(entries(live_server, token, limit=200)["transactions"]) == 0
    for params in ({"limit": 201}, {"limit": 0}, {"limit": -1}, {"limit": "x"}, {"cursor": "x"}):
        r = live_server.get("/api/wallet/transactions", token, params=params)
        assert r.status_code == 400, params
        assert r.json()["error"]["code"] == "bad_request"
    r = live_server.get("/api/wallet/transactions")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


async def test_daily_spend_cap_answers_rate_limited(server_factory: Any) -> None:
    server: LiveServer = server_factory({"LIVEGIFT_DAILY_SPEND_CAP": "100"})
    fan, other, creator = uid("f"), uid("o"), uid("c")
    fan_token, other_token = server.token(fan), server.token(other)
    server.recharge(fan_token, fan, "p330")
    server.recharge(other_token, other, "p330")
    room = server.create_stream(server.token(creator))
    client = await Client.open(server.ws(room, fan_token))
    assert (await client.gift("a", "donut", 3))["balance"] == 240  # 90 of 100 spent
    refused = await client.gift("b", "donut", 1)  # 90 + 30 > 100
    assert refused["ok"] is False and refused["error"]["code"] == "rate_limited"
    assert (await client.gift("c", "rose", 10))["balance"] == 230  # exactly 100
    refused = await client.gift("d", "rose", 1)
    assert refused["ok"] is False and refused["error"]["code"] == "rate_limited"
    # A retry of a gift that went through is a replay, not new spending.
    replay = await client.gift("a", "donut", 3)
    assert replay["ok"] and replay["balance"] == 240 and replay["seq"] == 1
    await client.close()
    assert server.get("/api/wallet", fan_token).json()["coins"] == 230
    kinds = [e["reference"] for e in entries(server, fan_token)["transactions"]]
    assert kinds[:2] == ["c", "a"]  # the refused gifts left no entry
    # The cap is per user.
    client = await Client.open(server.ws(room, other_token))
    assert (await client.gift("a", "donut", 3))["ok"]
    await client.close()


async def test_no_daily_spend_cap_by_default(live_server: LiveServer) -> None:
    fan = uid("f")
    token = live_server.token(fan)
    for _ in range(7):
        live_server.recharge(token, fan, "p6607")
    room = live_server.create_stream(live_server.token(uid("c")))
    client = await Client.open(live_server.ws(room, token))
    for i in range(2):
        assert (await client.gift(f"u{i}", "sports_car", 1))["ok"]
    assert (await client.gift("lion", "lion", 1))["balance"] == 7 * 6607 - 14_000 - 29_999
    await client.close()
