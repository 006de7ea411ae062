"""Wallets, gifts, transactions and payouts: the only code that moves money.

Every money movement is one Lua script call (``livegift/lua/<op>.lua``) in one partition
(:mod:`livegift.keys`), which writes its ledger entries in the same atomic step. A gift
crosses partitions, so it is a transfer in two steps: ``gift_send`` in the viewer's
partition, then ``gift_land`` in the creator's, or ``gift_void`` back in the viewer's
when the room is no longer live. The ack waits for the second step. A transfer left
between the steps by a crash stays in its partition's outbox until :meth:`Ledger.sweep`
(any process, any number of times) finishes it.

All money scripts go through one :class:`~livegift.pipeline.Pipeliner`, which batches
them per master and waits for a replica; every call's failures become
:mod:`livegift.errors` through :func:`~livegift.scripts.store_errors`. Rooms and
streams are :mod:`livegift.streams`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from livegift import keys
from livegift.auth import Receipt, User
from livegift.catalog import Catalog, Gift
from livegift.clock import DAY_SECONDS, today
from livegift.config import Settings
from livegift.errors import InvalidReceipt, NotFound, StreamNotLive, Unavailable
from livegift.money import PayoutSplit
from livegift.pipeline import Pipeliner
from livegift.scripts import STORE_FAILURES, Scripts, store_errors
from livegift.store import Store
from livegift.streams import room_creator

log = logging.getLogger("livegift.ledger")

PAYOUT_IDEMPOTENCY_SECONDS = 2 * DAY_SECONDS
# The counterparty of a purchase made with a sandbox receipt (a store's is "store").
SANDBOX = "sandbox"
# Tries at the second step of a gift before its ack says unavailable (the sweeper, or the
# client's retry with the same req, finishes it later), and the first pause between them.
LAND_TRIES = 6
LAND_BACKOFF = 0.05
# Landed transfers leave their outbox in batches, this often (seconds): one HDEL per
# partition per batch.
FORGET_EVERY = 0.25


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


@dataclass(frozen=True, slots=True)
class Transfer:
    """A gift debited in the viewer's partition: what gift_send recorded in its outbox (a
    JSON object with these fields) and what gift_land needs to apply it."""

    xfer: str
    ts: int  # ms, the debit's
    user: str
    name: str
    creator: str
    room: str
    req: str
    gift: str
    gift_name: str
    gift_coins: int
    streakable: bool
    count: int
    cost: int

    @classmethod
    def parse(cls, raw: bytes) -> Transfer:
        t = orjson.loads(raw)
        return cls(str(t["xfer"]), int(t["ts"]), t["user"], t["name"], t["creator"], t["room"],
                   t["req"], t["gift"], t["gift_name"], int(t["gift_coins"]),
                   bool(t["streakable"]), int(t["count"]), int(t["cost"]))  # fmt: skip

    @property
    def source(self) -> int:
        """The viewer's partition, where the transfer was debited."""
        return keys.user_partition(self.user)

    @property
    def target(self) -> int:
        """The room's partition (its creator's), where the transfer lands."""
        return keys.room_partition(self.room)


def transfer_members(
    user: User, creator: str, room: str, req: str, gift: Gift, count: int
) -> bytes:
    """The transfer record's JSON after its "xfer" and "ts" (gift_send adds those two)."""
    return orjson.dumps({
        "user": user.id, "name": user.name, "creator": creator, "room": room, "req": req,
        "gift": gift.id, "gift_name": gift.name, "gift_coins": gift.coins,
        "streakable": gift.streakable, "count": count, "cost": gift.coins * count,
    })[1:]  # fmt: skip


# The keys of a user's or a room's that every gift names, built once (bounded caches:
# building them was a tenth of the server's CPU per gift).
@lru_cache(maxsize=1 << 16)
def _viewer_keys(user: str) -> tuple[int, str, str, str, str, str, str]:
    part = keys.user_partition(user)
    return (part, keys.wallet(user), keys.ledger(part), keys.entry_seq(part),
            keys.account(user), keys.outbox(part), keys.sync(part))  # fmt: skip


@lru_cache(maxsize=1 << 14)
def _room_keys(room: str, creator: str) -> tuple[int, str, str, str, str, str, str, str, str]:
    part = keys.room_partition(room)
    return (part, keys.wallet(creator), keys.room(room), keys.top(room), keys.history(room),
            keys.ledger(part), keys.entry_seq(part), keys.account(creator),
            keys.channel(room))  # fmt: skip


@lru_cache(maxsize=1024)
def _gift_json(gift: str, name: str, coins: int) -> bytes:
    return orjson.dumps({"id": gift, "name": name, "coins": coins})


def gift_send_call(
    s: Settings, user: User, room: str, req: str, gift: Gift, count: int, adult: bool, creator: str
) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of one gift_send.lua call (see the script's header)."""
    part, wallet, ledger, entry_seq, account, outbox, sync = _viewer_keys(user.id)
    keys_ = [wallet, keys.gift_req(user.id, req), keys.spend(user.id, today()), ledger, entry_seq,
             account, outbox, sync]  # fmt: skip
    args: list[Any] = [user.id, f"{room}|{gift.id}|{count}", "1" if adult else "0", room, req,
                       gift.coins * count, transfer_members(user, creator, room, req, gift, count),
                       s.gift_rate, s.gift_burst, s.daily_spend_cap, creator, part]  # fmt: skip
    return keys_, args


def gift_land_call(s: Settings, t: Transfer) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of one gift_land.lua call (see the script's header)."""
    part, wallet, room, top, history, ledger, entry_seq, account, channel = _room_keys(
        t.room, t.creator
    )
    keys_ = [wallet, room, keys.combo(t.room, t.user), top, history, ledger, entry_seq, account,
             keys.landed(part, t.xfer), keys.sync(part)]  # fmt: skip
    viewer = orjson.dumps({"id": t.user, "name": t.name})
    event = b',"ts":%d,"room":%s,"from":%s,"gift":%s,"count":%d,"coins":%d,"combo":' % (
        t.ts, orjson.dumps(t.room), viewer, _gift_json(t.gift, t.gift_name, t.gift_coins),
        t.count, t.cost,
    )  # fmt: skip
    shout = ""
    if s.auto_shoutout_coins and t.cost >= s.auto_shoutout_coins:
        shout = s.auto_shoutout_template.format(name=t.name, gift=t.gift_name, count=t.count)
    args: list[Any] = [t.xfer, t.user, t.creator, t.room, t.req, t.ts, t.cost, t.count, t.gift,
                       "1" if t.streakable else "0", event, viewer, s.combo_window_ms,
                       s.history_len, s.history_seconds * 1000, channel, s.auto_shoutout_coins,
                       shout[:200], part]  # fmt: skip
    return keys_, args


def gift_void_call(t: Transfer) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of one gift_void.lua call (see the script's header)."""
    part = t.source
    day = time.strftime("%Y%m%d", time.gmtime(t.ts / 1000))
    keys_ = [keys.wallet(t.user), keys.outbox(part), keys.ledger(part), keys.entry_seq(part),
             keys.account(t.user), keys.sync(part), keys.spend(t.user, day)]  # fmt: skip
    return keys_, [t.xfer, part]


def recharge_call(receipt: Receipt) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of one recharge.lua call (see the script's header)."""
    part = keys.user_partition(receipt.sub)
    keys_ = [
        keys.wallet(receipt.sub),
        keys.txn(receipt.sub, receipt.txn),
        keys.minted(part),
        keys.ledger(part),
        keys.account(receipt.sub),
        keys.entry_seq(part),
        keys.sync(part),
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
        part,
    ]
    return keys_, args


class Ledger:
    """Money operations on one client; ``scripts`` may be shared with :class:`Streams`.

    ``replicas``: how many replicas must confirm each money write before it is answered
    (0 on a store without replicas; see livegift.store.replicas)."""

    def __init__(
        self,
        redis: Store,
        settings: Settings,
        catalog: Catalog,
        scripts: Scripts | None = None,
        replicas: int = 0,
    ) -> None:
        # redis-py's return types are loose unions; reads here check shapes themselves.
        self.redis: Any = redis
        self.settings = settings
        self.catalog = catalog
        self.scripts = scripts or Scripts(redis)
        self.money = Pipeliner(self.redis, replicas, settings.wait_timeout_ms)
        # Landed transfers to take out of their outboxes: partition -> transfer ids.
        self._landed: dict[int, list[str]] = defaultdict(list)
        self._forgetting: asyncio.Task[None] | None = None

    async def _run(self, script: str, keys_: list[str], args: list[Any]) -> Any:
        with store_errors():
            return await self.money.call(self.scripts[script], keys_, args)

    # -- wallets -------------------------------------------------------------------------

    async def wallet(self, user: str) -> tuple[int, int]:
        """The user's (coins, diamonds)."""
        with store_errors():
            coins, diamonds = await self.redis.hmget(keys.wallet(user), ["coins", "diamonds"])
        return int(coins or 0), int(diamonds or 0)

    async def recharge(self, receipt: Receipt) -> Recharge:
        """Credit a verified receipt's coins, once per store txn. The txn is first claimed
        for the buyer (one key of its own), so a receipt never credits two users."""
        with store_errors():
            owner = await self.redis.set(
                keys.txn_owner(receipt.txn), receipt.sub, nx=True, get=True
            )
        if owner is not None and owner.decode() != receipt.sub:
            raise InvalidReceipt("this receipt was already used by another user")
        txn, coins, diamonds, replayed = await self._run("recharge", *recharge_call(receipt))
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
        creator never changes); the landing step checks it against the room either way."""
        if creator is None:  # '': no such room (gift_send still checks the req first)
            creator = await room_creator(self.redis, room) or ""
        t, balance, replay = await self.send(user, room, req, gift, count, adult, creator)
        seq, combo = await self.finish(t)
        return GiftOutcome(balance, seq, combo, replay)

    async def send(
        self, user: User, room: str, req: str, gift: Gift, count: int, adult: bool, creator: str
    ) -> tuple[Transfer, int, bool]:
        """The gift's first step alone (debit the viewer): its transfer, the viewer's
        balance after, and whether the req was a replay (the first call's transfer)."""
        call = gift_send_call(self.settings, user, room, req, gift, count, adult, creator)
        raw, balance, replay, xfer, ts = await self._run("gift_send", *call)
        if replay:
            return Transfer.parse(raw), int(balance), True
        t = Transfer(xfer.decode(), int(ts), user.id, user.name, creator, room, req, gift.id,
                     gift.name, gift.coins, gift.streakable, count, gift.coins * count)  # fmt: skip
        return t, int(balance), False

    async def finish(self, t: Transfer) -> tuple[int, int]:
        """Land a debited transfer (or void it and return the coins): its (seq, combo).
        Raises StreamNotLive when it was void, Unavailable when the store stays away."""
        outcome = await self._retrying("gift_land", *gift_land_call(self.settings, t))
        if outcome == b"void":
            await self._retrying("gift_void", *gift_void_call(t))
            raise StreamNotLive()
        self._forget(t)
        seq, combo = outcome.split()
        return int(seq), int(combo)

    async def _retrying(self, script: str, keys_: list[str], args: list[Any]) -> Any:
        """A step after the viewer was debited: retried a few times through a failover
        before the ack says unavailable (the sweeper finishes it in any case)."""
        pause = LAND_BACKOFF
        for attempt in range(LAND_TRIES):
            try:
                return await self._run(script, keys_, args)
            except Unavailable:
                if attempt == LAND_TRIES - 1:
                    raise
                await asyncio.sleep(pause)
                pause *= 2
        raise AssertionError("unreachable")

    def _forget(self, t: Transfer) -> None:
        """Take a landed transfer out of its outbox soon, with others (best effort: the
        sweeper re-lands a leftover one, which changes nothing)."""
        self._landed[t.source].append(t.xfer)
        if self._forgetting is None or self._forgetting.done():
            self._forgetting = asyncio.get_running_loop().create_task(self._forget_later())

    async def _forget_later(self) -> None:
        await asyncio.sleep(FORGET_EVERY)
        await self._forget_now()

    async def _forget_now(self) -> None:
        landed, self._landed = self._landed, defaultdict(list)
        if not landed:
            return
        with contextlib.suppress(*STORE_FAILURES, OSError):
            async with self.redis.pipeline(transaction=False) as pipe:
                for part, xfers in landed.items():
                    pipe.hdel(keys.outbox(part), *xfers)
                await pipe.execute()

    async def aclose(self) -> None:
        """Take the landed transfers out of their outboxes now (before the loop ends)."""
        if self._forgetting is not None and not self._forgetting.done():
            self._forgetting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._forgetting
        await self._forget_now()

    async def sweep(self, older_than_ms: int) -> int:
        """Finish every transfer debited more than ``older_than_ms`` ago and still in an
        outbox (its process crashed, or the store failed, between the steps). Any process
        may run this at any time: landing and voiding are idempotent. Returns how many
        transfers it finished."""
        with store_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for part in range(keys.PARTITIONS):
                    pipe.hgetall(keys.outbox(part))
                outboxes = await pipe.execute()
        cutoff = int(time.time() * 1000) - older_than_ms
        done = 0
        for part, outbox in enumerate(outboxes):
            old = [t for t in map(Transfer.parse, outbox.values()) if t.ts <= cutoff]
            if not old:
                continue
            # The debits first on a replica (one may have failed its own WAIT): no credit
            # may outlive the loss of the debit's master.
            await self._run("sync", [keys.sync(part)], [])
            for t in old:
                try:
                    await self.finish(t)
                except StreamNotLive:
                    pass  # void: its coins went back
                except Unavailable as exc:  # its creator's master is away: the next sweep
                    log.warning("gift sweep: transfer %s not finished yet (%s)", t.xfer, exc)
                    continue
                done += 1
        return done

    # -- ledger reads --------------------------------------------------------------------

    async def transactions(
        self, user: str, limit: int, cursor: int | None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """The account's entries, newest first; pass the returned cursor for older ones.

        Each entry: ``id`` (ledger-wide, increasing), ``ts`` (server ms), ``kind``
        (purchase, gift_debit, gift_credit, gift_refund, payout, payout_reversal),
        ``account``,
        ``asset`` (coins or diamonds), ``amount`` (signed), ``balance`` (the account's
        balance in that asset right after the entry), ``counterparty``,
        ``reference`` (the store txn, gift req or payout id) and ``room`` (gifts only);
        gift entries carry ``transfer``: the id of the gift's debit, which its credit (or
        its refund, when the room was no longer live) names too.
        A purchase made with a sandbox receipt has counterparty ``sandbox`` and carries
        ``"sandbox": true``.
        The cursor is the id of the last entry returned; None when there is no more.
        """
        top = f"({cursor}" if cursor is not None else "+inf"
        with store_errors():
            rows = await self.redis.zrevrangebyscore(
                keys.account(user), top, "-inf", start=0, num=limit, withscores=True
            )
            entries = await _entries(self.redis, user, [sid for sid, _ in rows])
        next_cursor = int(rows[-1][1]) if len(rows) == limit else None
        return entries, next_cursor

    # -- payouts -------------------------------------------------------------------------

    async def create_payout(
        self, user: User, payout_id: str, split: PayoutSplit, fingerprint: str, key: str
    ) -> tuple[dict[str, Any], bool]:
        """Hold ``split.gross`` diamonds for a new payout; ``payout_id`` must be of the
        user's partition (keys.new_payout_id)."""
        s = self.settings
        day = today()
        part = keys.user_partition(user.id)
        if keys.payout_partition(payout_id) != part:
            raise ValueError(f"payout id {payout_id!r} is not of the user's partition")
        result = await self._run(
            "payout_create",
            [
                keys.wallet(user.id),
                keys.payout(payout_id),
                keys.payouts(user.id),
                keys.payout_idem(user.id, key),
                keys.payout_cap(user.id, day),
                keys.held(part),
                keys.ledger(part),
                keys.account(user.id),
                keys.entry_seq(part),
                keys.sync(part),
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
                part,
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
        part = keys.user_partition(user)
        raw = await self._run(
            "payout_settle",
            [
                keys.payout(payout_id),
                keys.wallet(user),
                keys.held(part),
                keys.ledger(part),
                keys.account(user),
                keys.entry_seq(part),
                keys.payout_cap(user, day),
                keys.sync(part),
            ],
            [outcome, user, part],
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


async def _entries(redis: Any, user: str, sids: list[bytes]) -> list[dict[str, Any]]:
    ledger = keys.ledger(keys.user_partition(user))
    async with redis.pipeline(transaction=False) as pipe:
        for sid in sids:
            pipe.xrange(ledger, sid, sid)
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
                **({"transfer": int(f["xfer"])} if f.get("xfer") else {}),
                **({"sandbox": True} if _is_sandbox_purchase(f) else {}),
            }
        )
    return out


def _is_sandbox_purchase(f: dict[str, str]) -> bool:
    """A purchase paid with a sandbox receipt (a user may be called "sandbox" too)."""
    return f["kind"] == "purchase" and f["counterparty"] == SANDBOX
