"""Overlay keys (PROTOCOL §8): one opaque, revocable key per creator for the OBS overlay.

A key is 192 random bits (url-safe base64). Only its SHA-256 is stored
(``keys.overlay_key``), so a copy of the data store holds no usable key. A new key
replaces the old one and announces it on the creator's feed channel
(``keys.creator_channel``) as ``{"type": "overlay_key", "id"}``: every process then closes
that creator's overlay sockets opened with another key (:mod:`livegift.follow`), 4401.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any, Final

import orjson

from livegift import keys
from livegift.scripts import Scripts, store_errors

KEY_BYTES: Final = 24
# The announced id: a prefix of the key's hash, enough to tell two keys apart.
ID_CHARS: Final = 16
REVOKED: Final = "overlay_key"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key_digest: str) -> str:
    return key_digest[:ID_CHARS]


def overlay_url(base_url: str, user: str, key: str) -> str:
    return f"{base_url.rstrip('/')}/overlay/u/{user}?key={key}"


async def rotate(redis: Any, user: str) -> str:
    """A new key for ``user``'s overlay; the old one stops working at once."""
    key = secrets.token_urlsafe(KEY_BYTES)
    hashed = digest(key)
    notice = orjson.dumps({"type": REVOKED, "id": key_id(hashed)})
    await Scripts(redis).call(
        "overlay_rotate", [keys.overlay_key(user)], [hashed, keys.creator_channel(user), notice]
    )
    return key


async def valid(redis: Any, user: str, key_digest: str) -> bool:
    """Whether ``key_digest`` is the digest of ``user``'s current overlay key."""
    with store_errors():
        stored = await redis.get(keys.overlay_key(user))
    return stored is not None and hmac.compare_digest(stored, key_digest.encode())
