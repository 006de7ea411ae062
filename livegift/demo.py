"""Demo data and simulated gifters for ``livegift serve --demo``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass

import orjson
import websockets

from livegift import auth, keys, overlays
from livegift.auth import User
from livegift.catalog import default_catalog
from livegift.config import Settings
from livegift.errors import LiveGiftError
from livegift.ledger import Ledger
from livegift.store import connect
from livegift.streams import Streams

log = logging.getLogger("livegift.demo")

# The demo room: "demo" after its creator's partition code (keys.new_room_id).
ROOM = keys.new_room_id("demo_creator", "demo")
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
    overlay_key: str


async def seed(settings: Settings) -> DemoInfo:
    """Create the live demo room, its creator, and viewers with coins (idempotent)."""
    assert settings.redis_url
    redis = await connect(settings.redis_url, 4)
    catalog = default_catalog()
    ledger = Ledger(redis, settings, catalog)
    streams = Streams(redis, settings)
    try:
        room, _ = await streams.start_stream_as(CREATOR, "livegift demo stream", ROOM)
        for uid, name in VIEWERS + BOTS:
            user = User(uid, name)
            await streams.remember_name(user)
            coins, _ = await ledger.wallet(uid)
            while coins < 5000:
                token = auth.mint_receipt(settings.payment_secret, catalog, uid, "p6607")
                receipt = auth.verify_receipt(
                    settings.payment_secret, catalog, token, user, dev_mode=settings.dev_mode
                )
                coins = (await ledger.recharge(receipt)).coins
        overlay_key = await overlays.rotate(redis, CREATOR.id)
    finally:
        await redis.aclose()
    mint = auth.mint_token
    return DemoInfo(
        room,
        mint(settings.secret, CREATOR.id, name=CREATOR.name, birthdate=ADULT, ttl=30 * 86400),
        mint(settings.secret, "alice", name="Alice", birthdate=ADULT, ttl=30 * 86400),
        mint(settings.secret, "kid", name="Kid", birthdate=MINOR, ttl=30 * 86400),
        overlay_key,
    )


async def simulate_gifters(
    settings: Settings, base_ws: str, room: str, stop: asyncio.Event
) -> None:
    """A few bots that send gifts over real WebSockets so the studio page moves at once."""
    await asyncio.gather(
        *(_bot(settings, base_ws, room, uid, name, stop) for uid, name in BOTS),
        return_exceptions=True,
    )


async def _top_up(settings: Settings, user: User) -> None:
    assert settings.redis_url
    redis = await connect(settings.redis_url, 2)
    try:
        catalog = default_catalog()
        receipt = auth.mint_receipt(settings.payment_secret, catalog, user.id, "p6607")
        await Ledger(redis, settings, catalog).recharge(
            auth.verify_receipt(
                settings.payment_secret, catalog, receipt, user, dev_mode=settings.dev_mode
            )
        )
    finally:
        await redis.aclose()


async def _bot(
    settings: Settings, base_ws: str, room: str, uid: str, name: str, stop: asyncio.Event
) -> None:
    token = auth.mint_token(settings.secret, uid, name=name, birthdate=ADULT)
    rng = random.Random(uid)
    catalog = default_catalog()
    small = [g for g in catalog.gifts.values() if g.coins <= 30]
    big = [g for g in catalog.gifts.values() if 100 <= g.coins <= 1000]
    broke = asyncio.Event()

    async def read(ws: websockets.ClientConnection) -> None:
        # A member must read: the server closes sockets that stop reading (4008).
        async for frame in ws:
            data = orjson.loads(frame)
            for event in data if isinstance(data, list) else [data]:
                failed = event.get("type") == "ack" and not event.get("ok")
                if failed and event["error"]["code"] == "insufficient_funds":
                    broke.set()

    n = 0
    while not stop.is_set():
        try:
            async with websockets.connect(
                f"{base_ws}/ws/{room}?token={token}",
                subprotocols=["livegift.json"],  # type: ignore[list-item]
            ) as ws:
                reader = asyncio.create_task(read(ws))
                try:
                    while not stop.is_set() and not reader.done():
                        if broke.is_set():
                            await _top_up(settings, User(uid, name))
                            broke.clear()
                        gift = rng.choice(big) if rng.random() < 0.08 else rng.choice(small)
                        for _ in range(rng.randint(3, 12) if gift.streakable else 1):
                            n += 1
                            op = {"op": "gift", "req": f"{uid}-{n}-{rng.random()}", "gift": gift.id}
                            await ws.send(orjson.dumps(op).decode())
                            await asyncio.sleep(rng.uniform(0.15, 0.5))
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), rng.uniform(2, 6))
                finally:
                    reader.cancel()
        except (OSError, websockets.WebSocketException, LiveGiftError) as exc:
            log.debug("demo bot %s reconnecting: %s", uid, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2)
