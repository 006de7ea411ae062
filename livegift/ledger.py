"""Wallets, gifts, transactions and payouts: the only code that moves money.

Every money movement is one Lua script call (``livegift/lua/<op>.lua``: recharge, gift,
payout_create, payout_settle) that writes its ledger entries in the same atomic step.
Gifts go through a :class:`~livegift.pipeline.Pipeliner`; every call's failures become
:mod:`livegift.errors` through :func:`~livegift.scripts.store_errors`. Rooms and streams
are :mod:`livegift.streams`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from livegift import keys
from livegift.auth import Receipt, User
from livegift.catalog import Catalog, Gift
from livegift.clock import DAY_SECONDS, today
from livegift.config import Settings
from livegift.errors import NotFound
from livegift.money import PayoutSplit
from livegift.pipeline import Pipeliner
from livegift.scripts import Scripts, store_errors
from livegift.store import Store
from livegift.streams import room_creator

PAYOUT_IDEMPOTENCY_SECONDS = 2 * DAY_SECONDS
# The counterparty of a purchase made with a sandbox receipt (a store's is "store").
SANDBOX = "sandbox"


@dataclass(frozen=True, slots=True)
class GiftOutcome:
    balance: int
    seq: int
    combo: int
    replay: bool


@dataclass(frozen=True, slots=True)
class Recharge:
    transaction: dict[str, Any]
    coins: int
    diamonds: int
    replayed: bool


def gift_call(
    s: Settings, user: User, room: str, req: str, gift: Gift, count: int, adult: bool, creator: str
) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of one gift.lua call (see the script's header)."""
    shout = s.auto_shoutout_template.format(name=user.name, gift=gift.name, count=count)
    keys_ = [
        keys.wallet(user.id),
        keys.wallet(creator),
        keys.room(room),
        keys.gift_req(user.id, req),
        keys.combo(room, user.id),
        keys.top(room),
        keys.history(room),
        keys.LEDGER,
        keys.account(user.id),
        keys.account(creator),
        keys.rate(user.id),
        keys.spend(user.id, today()),
        keys.name(user.id),
        keys.ENTRY_SEQ,
    ]
    args: list[Any] = [
        user.id,
        user.name,
        "1" if adult else "0",
        room,
        req,
        gift.id,
        gift.name,
        gift.coins,
        "1" if gift.streakable else "0",
        count,
        s.gift_rate,
        s.gift_burst,
        s.daily_spend_cap,
        s.auto_shoutout_coins,
        shout[:200],
        s.combo_window_ms,
        s.history_len,
        s.history_seconds * 1000,
        keys.channel(room),
        creator,
    ]
    return keys_, args


def recharge_call(receipt: Receipt) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of one recharge.lua call (see the script's header)."""
    keys_ = [
        keys.wallet(receipt.sub),
        keys.txn(receipt.txn),
        keys.MINTED,
        keys.LEDGER,
        keys.account(receipt.sub),
        keys.ENTRY_SEQ,
    ]
    args: list[Any] = [
        receipt.sub,
        receipt.txn,
        receipt.coins,
        receipt.amount,
        receipt.currency,
        receipt.package,
        receipt.region,
        SANDBOX if receipt.sandbox else "store",
    ]
    return keys_, args


class Ledger:
    """Money operations on one client; ``scripts`` may be shared with :class:`Streams`."""

    def __init__(
        self, redis: Store, settings: Settings, catalog: Catalog, scripts: Scripts | None = None
    ) -> None:
        # redis-py's return types are loose unions; reads here check shapes themselves.
        self.redis: Any = redis
        self.settings = settings
        self.catalog = catalog
        self.scripts = scripts or Scripts(redis)
        self._gifts = Pipeliner(self.redis, self.scripts["gift"])

    # -- wallets -------------------------------------------------------------------------

    async def wallet(self, user: str) -> tuple[int, int]:
        """The user's (coins, diamonds)."""
        with store_errors():
            coins, diamonds = await self.redis.hmget(keys.wallet(user), ["coins", "diamonds"])
        return int(coins or 0), int(diamonds or 0)

    async def recharge(self, receipt: Receipt) -> Recharge:
        """Credit a verified receipt's coins, once per store txn."""
        result = await self.scripts.call("recharge", *recharge_call(receipt))
        txn, coins, diamonds, replayed = result
        return Recharge(orjson.loads(txn), int(coins), int(diamonds), bool(replayed))

    # -- gifts ---------------------------------------------------------------------------

    async def gift(
        self,
        user: User,
        room: str,
        req: str,
        gift: Gift,
        count: int,
        *,
        adult: bool,
        creator: str | None = None,
    ) -> GiftOutcome:
        """Send a gift. ``creator`` is the room's creator when the caller knows it (a room's
        creator never changes); the script checks it against the room either way."""
        if creator is None:
            creator = await room_creator(self.redis, room) or "-"
        keys_, args = gift_call(self.settings, user, room, req, gift, count, adult, creator)
        with store_errors():
            raw = await self._gifts.call(keys_, args)
        data = orjson.loads(raw)
        return GiftOutcome(data["balance"], data["seq"], data["combo"], data["replay"])

    # -- ledger reads --------------------------------------------------------------------

    async def transactions(
        self, user: str, limit: int, cursor: int | None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """The account's entries, newest first; pass the returned cursor for older ones.

        Each entry: ``id`` (ledger-wide, increasing), ``ts`` (server ms), ``kind``
        (purchase, gift_debit, gift_credit, payout, payout_reversal), ``account``,
        ``asset`` (coins or diamonds), ``amount`` (signed), ``balance`` (the account's
        balance in that asset right after the entry), ``counterparty``,
        ``reference`` (the store txn, gift req or payout id) and ``room`` (gifts only).
        A purchase made with a sandbox receipt has counterparty ``sandbox`` and carries
        ``"sandbox": true``.
        The cursor is the id of the last entry returned; None when there is no more.
        """
        top = f"({cursor}" if cursor is not None else "+inf"
        with store_errors():
            rows = await self.redis.zrevrangebyscore(
                keys.account(user), top, "-inf", start=0, num=limit, withscores=True
            )
            entries = await _entries(self.redis, [sid for sid, _ in rows])
        next_cursor = int(rows[-1][1]) if len(rows) == limit else None
        return entries, next_cursor

    # -- payouts -------------------------------------------------------------------------

    async def create_payout(
        self, user: User, payout_id: str, split: PayoutSplit, fingerprint: str, key: str
    ) -> tuple[dict[str, Any], bool]:
        s = self.settings
        day = today()
        result = await self.scripts.call(
            "payout_create",
            [
                keys.wallet(user.id),
                keys.payout(payout_id),
                keys.payouts(user.id),
                keys.payout_idem(user.id, key),
                keys.payout_cap(user.id, day),
                keys.HELD,
                keys.LEDGER,
                keys.account(user.id),
                keys.ENTRY_SEQ,
            ],
            [
                user.id,
                payout_id,
                split.gross,
                split.net,
                split.commission,
                s.payout_min_diamonds,
                s.payout_daily_cap_cents,
                fingerprint,
                day,
                PAYOUT_IDEMPOTENCY_SECONDS,
            ],
        )
        payout, replayed = result
        return orjson.loads(payout), bool(replayed)

    async def settle_payout(self, payout_id: str, outcome: str) -> dict[str, Any]:
        if outcome not in ("paid", "failed"):
            raise ValueError("outcome must be paid or failed")
        with store_errors():
            user_raw, day_raw = await self.redis.hmget(keys.payout(payout_id), ["user", "day"])
        if user_raw is None:
            raise NotFound(f"no payout {payout_id!r}")
        user, day = user_raw.decode(), day_raw.decode()
        raw = await self.scripts.call(
            "payout_settle",
            [
                keys.payout(payout_id),
                keys.wallet(user),
                keys.HELD,
                keys.LEDGER,
                keys.account(user),
                keys.ENTRY_SEQ,
                keys.payout_cap(user, day),
            ],
            [outcome, user],
        )
        return dict(orjson.loads(raw))

    async def payouts(self, user: str, limit: int = 200) -> list[dict[str, Any]]:
        with store_errors():
            ids = await self.redis.zrevrange(keys.payouts(user), 0, limit - 1)
            async with self.redis.pipeline(transaction=False) as pipe:
                for pid in ids:
                    pipe.hget(keys.payout(pid.decode()), "json")
                rows = await pipe.execute()
        return [orjson.loads(row) for row in rows if row]


async def _entries(redis: Any, sids: list[bytes]) -> list[dict[str, Any]]:
    async with redis.pipeline(transaction=False) as pipe:
        for sid in sids:
            pipe.xrange(keys.LEDGER, sid, sid)
        rows = await pipe.execute()
    out = []
    for row in rows:
        if not row:
            continue
        sid, fields = row[0]
        f = {k.decode(): v.decode() for k, v in fields.items()}
        out.append(
            {
                "id": int(f["id"]),
                "ts": int(f["ts"]),
                "kind": f["kind"],
                "account": f["account"],
                "asset": f["asset"],
                "amount": int(f["amount"]),
                "balance": int(f["balance"]),
                "counterparty": f["counterparty"],
                "reference": f["ref"],
                "room": f["room"] or None,
                **({"sandbox": True} if _is_sandbox_purchase(f) else {}),
            }
        )
    return out


def _is_sandbox_purchase(f: dict[str, str]) -> bool:
    """A purchase paid with a sandbox receipt (a user may be called "sandbox" too)."""
    return f["kind"] == "purchase" and f["counterparty"] == SANDBOX
