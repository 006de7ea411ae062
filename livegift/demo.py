"""Demo data and simulated gifters for ``livegift serve --demo``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass

import orjson
import websockets

from livegift import auth
from livegift.auth import User
from livegift.catalog import default_catalog
from livegift.config import Settings
from livegift.errors import LiveGiftError
from livegift.ledger import Ledger
from livegift.services import connect

log = logging.getLogger("livegift.demo")

ROOM = "demo"
CREATOR = User("demo_creator", "Demo Creator")
VIEWERS = [("alice", "Alice"), ("bob", "Bob"), ("carol", "Carol"), ("dave", "Dave")]
BOTS = [("bot_rose", "Rosie Bot"), ("bot_fan", "Superfan Bot"), ("bot_whale", "Whale Bot")]
ADULT = "1990-01-01"
MINOR = "2015-06-01"


@dataclass
class DemoInfo:
    room: str
    creator_token: str
    viewer_token: str
    minor_token: str


async def seed(settings: Settings) -> DemoInfo:
    """Create the live demo room, its creator, and viewers with coins (idempotent)."""
    assert settings.redis_url
    redis = connect(settings.redis_url, 4)
    catalog = default_catalog()
    ledger = Ledger(redis, settings, catalog)
    try:
        room, _ = await ledger.start_stream_as(CREATOR, "livegift demo stream", ROOM)
        for uid, name in VIEWERS + BOTS:
            user = User(uid, name)
            await ledger.remember_name(user)
            coins, _ = await ledger.wallet(uid)
            while coins < 5000:
                token = auth.mint_receipt(settings.payment_secret, catalog, uid, "p6607")
                receipt = auth.verify_receipt(settings.payment_secret, catalog, token, user)
                coins = (await ledger.recharge(receipt)).coins
    finally:
        await redis.aclose()
    mint = auth.mint_token
    return DemoInfo(
        room,
        mint(settings.secret, CREATOR.id, name=CREATOR.name, birthdate=ADULT, ttl=30 * 86400),
        mint(settings.secret, "alice", name="Alice", birthdate=ADULT, ttl=30 * 86400),
        mint(settings.secret, "kid", name="Kid", birthdate=MINOR, ttl=30 * 86400),
    )


async def simulate_gifters(
    settings: Settings, base_ws: str, room: str, stop: asyncio.Event
) -> None:
    """A few bots that send gifts over real WebSockets so the studio page moves at once."""
    await asyncio.gather(
        *(_bot(settings, base_ws, room, uid, name, stop) for uid, name in BOTS),
        return_exceptions=True,
    )


async def _bot(
    settings: Settings, base_ws: str, room: str, uid: str, name: str, stop: asyncio.Event
) -> None:
    token = auth.mint_token(settings.secret, uid, name=name, birthdate=ADULT)
    rng = random.Random(uid)
    catalog = default_catalog()
    small = [g for g in catalog.gifts.values() if g.coins <= 30]
    big = [g for g in catalog.gifts.values() if 100 <= g.coins <= 1000]
    n = 0
    while not stop.is_set():
        try:
            async with websockets.connect(
                f"{base_ws}/ws/{room}?token={token}",
                subprotocols=["livegift.json"],  # type: ignore[list-item]
            ) as ws:
                while not stop.is_set():
                    gift = rng.choice(big) if rng.random() < 0.08 else rng.choice(small)
                    taps = rng.randint(3, 12) if gift.streakable else 1
                    for _ in range(taps):
                        n += 1
                        await ws.send(
                            orjson.dumps(
                                {"op": "gift", "req": f"{uid}-{n}-{rng.random()}", "gift": gift.id}
                            ).decode()
                        )
                        await asyncio.sleep(rng.uniform(0.15, 0.5))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), rng.uniform(2, 6))
        except (OSError, websockets.WebSocketException, LiveGiftError) as exc:
            log.debug("demo bot %s reconnecting: %s", uid, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2)
