"""Cash-out requests: input checks, the integer split and idempotency fingerprints.

``POST /api/payouts`` with ``{"diamonds": N}`` and an optional ``Idempotency-Key``. The
key is scoped to the caller and kept 48 hours with a fingerprint of the body: a retry
with the same body gets the first response (201, same payout id), a different body is
``idempotency_conflict``. Without a key every request is a new payout. The checks and
the move itself run in one Lua call (``lua/payout_create.lua``).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import orjson

from livegift import keys
from livegift.auth import User
from livegift.errors import BadRequest
from livegift.money import payout_split
from livegift.services import Services

MAX_KEY = 255
# Lua numbers are doubles: integers are exact only below 2**53. Far above any real balance.
MAX_DIAMONDS = 10**15


@dataclass(frozen=True, slots=True)
class PayoutResult:
    status: int
    body: dict[str, Any]


def fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


async def create(
    services: Services, user: User, body: dict[str, Any], key: str | None
) -> PayoutResult:
    diamonds = body.get("diamonds")
    if type(diamonds) is not int or not 0 < diamonds <= MAX_DIAMONDS:
        raise BadRequest(f"diamonds must be an integer from 1 to {MAX_DIAMONDS}")
    if key is not None and not 1 <= len(key) <= MAX_KEY:
        raise BadRequest(f"Idempotency-Key must be 1-{MAX_KEY} characters")
    split = payout_split(diamonds, services.settings.commission_bps)
    payout_id = keys.new_payout_id(user.id, secrets.token_hex(8))
    payout, _replayed = await services.ledger.create_payout(
        user, payout_id, split, fingerprint(body), key or f"auto-{payout_id}"
    )
    public = {k: payout[k] for k in ("id", "diamonds", "gross", "commission", "net", "currency")}
    public["status"] = payout["status"]
    public["created"] = payout["created"]
    return PayoutResult(201, {"payout": public})
