"""Cash-out requests: input checks, the integer split and idempotency fingerprints."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import orjson

from livegift.auth import User
from livegift.errors import BadRequest
from livegift.money import payout_split
from livegift.services import Services

MAX_KEY = 255


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
    if type(diamonds) is not int or diamonds <= 0:
        raise BadRequest("diamonds must be a positive integer")
    if key is not None and not 1 <= len(key) <= MAX_KEY:
        raise BadRequest(f"Idempotency-Key must be 1-{MAX_KEY} characters")
    split = payout_split(diamonds, services.settings.commission_bps)
    payout_id = "po_" + secrets.token_hex(8)
    payout, _replayed = await services.ledger.create_payout(
        user, payout_id, split, fingerprint(body), key or f"auto-{payout_id}"
    )
    public = {k: payout[k] for k in ("id", "diamonds", "gross", "commission", "net", "currency")}
    public["status"] = payout["status"]
    public["created"] = payout["created"]
    return PayoutResult(201, {"payout": public})
