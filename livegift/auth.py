"""Identity (PROTOCOL §1) and receipts (§3): minting and checking signed JWTs.

Pure functions: no I/O, no framework. The current date is a parameter so that the adult
rule can be tested at its edges.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from datetime import date
from typing import Any

import jwt

from livegift import keys
from livegift.catalog import Catalog
from livegift.clock import utc_today
from livegift.errors import InvalidReceipt, PriceMismatch, Unauthorized

USER_ID = keys.ID  # use with fullmatch
ALGORITHM = "HS256"
ADULT_AGE = 18


@dataclass(frozen=True, slots=True)
class User:
    id: str
    name: str
    birthdate: date | None = None
    roles: tuple[str, ...] = ()

    def is_adult(self, today: date | None = None) -> bool:
        return is_adult(self.birthdate, today or utc_today())

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    def public(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name}


def is_adult(birthdate: date | None, today: date) -> bool:
    """18 or older on ``today``; someone born on 29 February comes of age on 1 March."""
    if birthdate is None:
        return False
    years = today.year - birthdate.year
    if (today.month, today.day) < (birthdate.month, birthdate.day):
        years -= 1
    return years >= ADULT_AGE


def parse_birthdate(value: object) -> date | None:
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


def mint_token(
    secret: str,
    sub: str,
    *,
    name: str | None = None,
    birthdate: str | None = None,
    ttl: int = 86400,
    roles: list[str] | None = None,
    now: float | None = None,
) -> str:
    if not USER_ID.fullmatch(sub):
        raise ValueError("user id must be 1-64 of A-Z a-z 0-9 _ . -")
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + ttl}
    if name is not None:
        claims["name"] = name
    if birthdate is not None:
        claims["birthdate"] = birthdate
    if roles:
        claims["roles"] = roles
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, if it is one."""
    if header[:7].lower() != "bearer ":
        return None
    return header[7:].strip() or None


def verify_token(secret: str, token: str | None) -> User:
    """The user a token names, or :class:`Unauthorized`."""
    return verify_session(secret, token)[0]


def verify_session(secret: str, token: str | None) -> tuple[User, int]:
    """The user a token names and its ``exp`` (epoch seconds), or :class:`Unauthorized`.

    A socket holds its token until ``exp`` (PROTOCOL §8), so the connection keeps both.
    """
    if not token:
        raise Unauthorized("a token is required")
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]}
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the token has expired") from None
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"invalid token: {exc}") from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not USER_ID.fullmatch(sub):
        raise Unauthorized("invalid token: bad sub")
    name = claims.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        name = sub
    roles = claims.get("roles")
    role_tuple = tuple(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else ()
    exp = claims["exp"]
    if type(exp) is not int:  # PyJWT accepts a float exp; the sweep works in whole seconds
        exp = int(exp)
    return User(sub, name, parse_birthdate(claims.get("birthdate")), role_tuple), exp


@dataclass(frozen=True, slots=True)
class Receipt:
    txn: str
    sub: str
    package: str
    region: str
    amount: int
    currency: str
    coins: int
    # Signed by `livegift receipt` or POST /api/dev/receipt, not by a store: credited only
    # in development mode, and marked as sandbox in the ledger.
    sandbox: bool = False


# The claim that marks a receipt that no store signed.
SANDBOX_CLAIM = ("env", "sandbox")


def mint_receipt(
    payment_secret: str,
    catalog: Catalog,
    sub: str,
    package: str,
    *,
    region: str = "US",
    txn: str | None = None,
    sandbox: bool = True,
) -> str:
    """A sandbox receipt at the region's list price (``sandbox=False``: as a store signs
    it, for tests that play the store)."""
    price_list = catalog.price_list(region)
    pkg = price_list.package(package)
    claims = {
        "txn": txn or f"sandbox-{secrets.token_hex(8)}",
        "sub": sub,
        "package": pkg.id,
        "region": price_list.region,
        "amount": pkg.price,
        "currency": price_list.currency,
    }
    if sandbox:
        claims[SANDBOX_CLAIM[0]] = SANDBOX_CLAIM[1]
    return jwt.encode(claims, payment_secret, algorithm=ALGORITHM)


def verify_receipt(
    payment_secret: str, catalog: Catalog, receipt: object, user: User, *, dev_mode: bool = False
) -> Receipt:
    """The purchase a receipt proves, or :class:`InvalidReceipt` / :class:`PriceMismatch`.

    A sandbox receipt is refused unless ``dev_mode``: outside development mode its coins
    could be gifted and cashed out as real money."""
    if not isinstance(receipt, str) or not receipt:
        raise InvalidReceipt("receipt must be a signed string")
    try:
        claims = jwt.decode(receipt, payment_secret, algorithms=[ALGORITHM])
    except jwt.PyJWTError as exc:
        raise InvalidReceipt(f"invalid receipt: {exc}") from None
    txn, sub = claims.get("txn"), claims.get("sub")
    package, region = claims.get("package"), claims.get("region", "US")
    amount, currency = claims.get("amount"), claims.get("currency")
    if not isinstance(txn, str) or not 1 <= len(txn) <= 128:
        raise InvalidReceipt("receipt txn must be 1-128 characters")
    sandbox = _is_sandbox(claims)
    if sandbox and not dev_mode:
        raise InvalidReceipt("sandbox receipts are only accepted in development mode")
    if sub != user.id:
        raise InvalidReceipt("receipt belongs to another user")
    if not isinstance(package, str) or not isinstance(region, str):
        raise InvalidReceipt("receipt package and region must be strings")
    price_list = catalog.price_list(region)
    pkg = price_list.package(package)
    if type(amount) is not int or amount != pkg.price or currency != price_list.currency:
        raise PriceMismatch(
            f"{pkg.id} in {price_list.region} costs {pkg.price} {price_list.currency}, "
            f"receipt says {amount} {currency}"
        )
    return Receipt(
        txn,
        user.id,
        pkg.id,
        price_list.region,
        pkg.price,
        price_list.currency,
        pkg.coins,
        sandbox,
    )


def _is_sandbox(claims: dict[str, Any]) -> bool:
    """Is this a sandbox receipt? A receipt with no ``env`` claim is a store's."""
    name, sandbox = SANDBOX_CLAIM
    env = claims.get(name, "production")
    if env not in (sandbox, "production"):
        raise InvalidReceipt(f"receipt {name} must be {sandbox!r} or 'production'")
    return bool(env == sandbox)
