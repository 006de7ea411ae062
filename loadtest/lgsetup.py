"""Preparing a livegift server for a run: tokens, streams and wallets.

Tokens and sandbox receipts are minted here with PyJWT, exactly as the
server's secrets sign them (PROTOCOL.md §1 and §3).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import Any

import httpx
import jwt

ADULT = "1990-01-01"
FALLBACK_PACKAGES = [
    ("p6607", 6607, 9999),
    ("p1321", 1321, 1999),
    ("p330", 330, 499),
    ("p65", 65, 99),
]


@dataclasses.dataclass
class Secrets:
    token: str
    payment: str


def user_token(secrets: Secrets, sub: str, name: str, adult: bool, ttl: int = 6 * 3600) -> str:
    claims: dict[str, Any] = {"sub": sub, "name": name, "exp": int(time.time()) + ttl}
    if adult:
        claims["birthdate"] = ADULT
    return jwt.encode(claims, secrets.token, algorithm="HS256")


def receipt(secrets: Secrets, sub: str, txn: str, package: str, amount: int) -> str:
    claims = {
        "txn": txn,
        "sub": sub,
        "package": package,
        "region": "US",
        "amount": amount,
        "currency": "USD",
    }
    return jwt.encode(claims, secrets.payment, algorithm="HS256")


@dataclasses.dataclass
class Prepared:
    rooms: list[str]
    gift_id: str
    gift_coins: int
    coins_per_gifter: int
    receipts: int
    seconds: float


class SetupError(RuntimeError):
    pass


async def _check(r: httpx.Response, what: str) -> Any:
    if r.status_code >= 300:
        raise SetupError(f"{what}: HTTP {r.status_code} {r.text[:300]}")
    return r.json()


async def prepare(
    base_url: str,
    secrets: Secrets,
    run_id: str,
    rooms: int,
    gifters: int,
    gifts_total: int,
    concurrency: int = 16,
) -> Prepared:
    """Create ``rooms`` live streams and give each gifter enough coins."""
    t0 = time.monotonic()
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as http:
        gifts = (await _check(await http.get("/api/gifts"), "GET /api/gifts"))["gifts"]
        by_id = {g["id"]: g for g in gifts}
        gift = by_id.get("rose") or min(gifts, key=lambda g: g["coins"])
        packages = FALLBACK_PACKAGES
        r = await http.get("/api/coins/packages", params={"region": "US"})
        if r.status_code == 200:
            body = r.json()
            packages = sorted(
                ((p["id"], p["coins"], p["price"]) for p in body["packages"]),
                key=lambda p: -p[1],
            )
        pkg_id, pkg_coins, pkg_price = packages[0]

        async def make_room(i: int) -> str:
            sub = f"lt{run_id}c{i}"
            tok = user_token(secrets, sub, f"Creator {i}", adult=True)
            async with sem:
                r = await http.post(
                    "/api/streams",
                    json={"title": f"loadtest {run_id} room {i}"},
                    headers={"Authorization": f"Bearer {tok}"},
                )
            return str((await _check(r, "POST /api/streams"))["room"])

        room_ids = list(await asyncio.gather(*(make_room(i) for i in range(rooms))))

        per_gifter = math.ceil(gifts_total / max(1, gifters)) * gift["coins"]
        per_gifter = int(per_gifter * 1.05) + 2 * gift["coins"]
        n_receipts = max(1, math.ceil(per_gifter / pkg_coins)) if gifters else 0

        async def fund(g: int) -> None:
            sub = f"lt{run_id}g{g}"
            tok = user_token(secrets, sub, f"Gifter {g}", adult=True)
            for k in range(n_receipts):
                rc = receipt(secrets, sub, f"lt{run_id}-g{g}-{k}", pkg_id, pkg_price)
                async with sem:
                    r = await http.post(
                        "/api/wallet/recharge",
                        json={"receipt": rc},
                        headers={"Authorization": f"Bearer {tok}"},
                    )
                await _check(r, "POST /api/wallet/recharge")

        await asyncio.gather(*(fund(g) for g in range(gifters)))
    return Prepared(
        rooms=room_ids,
        gift_id=str(gift["id"]),
        gift_coins=int(gift["coins"]),
        coins_per_gifter=n_receipts * pkg_coins,
        receipts=n_receipts * gifters,
        seconds=time.monotonic() - t0,
    )
