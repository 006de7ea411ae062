"""The pure core: identity rules, codecs, op validation, money math, settings."""

from __future__ import annotations

from datetime import date

import msgpack
import orjson
import pytest

from livegift import auth
from livegift.catalog import default_catalog
from livegift.config import ConfigError, Settings
from livegift.errors import (
    BY_CODE,
    BadRequest,
    InvalidReceipt,
    PriceMismatch,
    Unauthorized,
    from_code,
)
from livegift.events import head
from livegift.money import payout_split
from livegift.protocol import (
    JSON,
    JSON_FRAMES,
    MSGPACK,
    MSGPACK_FRAMES,
    GiftOp,
    ShoutoutOp,
    choose_codec,
    parse_op,
)
from livegift.rfc6455 import frame as ws_frame

SECRET = "unit-secret-0123456789abcdef0123456789"


@pytest.mark.parametrize(
    ("birthdate", "today", "adult"),
    [
        (date(2000, 5, 10), date(2018, 5, 10), True),
        (date(2000, 5, 10), date(2018, 5, 9), False),
        (date(2000, 2, 29), date(2018, 2, 28), False),
        (date(2000, 2, 29), date(2018, 3, 1), True),
        (None, date(2030, 1, 1), False),
    ],
)
def test_adult_rule(birthdate: date | None, today: date, adult: bool) -> None:
    assert auth.is_adult(birthdate, today) is adult


def test_token_round_trip_and_defaults() -> None:
    token = auth.mint_token(SECRET, "alice", birthdate="1990-01-01")
    user = auth.verify_token(SECRET, token)
    assert user.id == "alice" and user.name == "alice" and user.birthdate == date(1990, 1, 1)
    assert (
        auth.verify_token(SECRET, auth.mint_token(SECRET, "k", birthdate="1990-13-45")).birthdate
        is None
    )


@pytest.mark.parametrize("token", ["", "x", "a.b.c"])
def test_bad_tokens(token: str) -> None:
    with pytest.raises(Unauthorized):
        auth.verify_token(SECRET, token)


def test_user_id_rules() -> None:
    with pytest.raises(ValueError):
        auth.mint_token(SECRET, "bad id!")
    with pytest.raises(ValueError):
        auth.mint_token(SECRET, "x" * 65)


def test_receipt_checks() -> None:
    catalog = default_catalog()
    user = auth.User("bob", "Bob")
    ok = auth.verify_receipt(
        "pay-0123456789abcdef0123456789abcd",
        catalog,
        auth.mint_receipt(
            "pay-0123456789abcdef0123456789abcd", catalog, "bob", "p65", sandbox=False
        ),
        user,
    )
    assert ok.coins == 65 and ok.amount == 99 and ok.currency == "USD"
    with pytest.raises(InvalidReceipt):
        auth.verify_receipt(
            "pay-0123456789abcdef0123456789abcd",
            catalog,
            auth.mint_receipt("other-0123456789abcdef0123456789ab", catalog, "bob", "p65"),
            user,
        )
    import jwt

    forged = jwt.encode(
        {
            "txn": "t",
            "sub": "bob",
            "package": "p65",
            "region": "JP",
            "amount": 99,
            "currency": "JPY",
        },
        "pay-0123456789abcdef0123456789abcd",
        "HS256",
    )
    with pytest.raises(PriceMismatch):
        auth.verify_receipt("pay-0123456789abcdef0123456789abcd", catalog, forged, user)


def test_parse_ops() -> None:
    assert parse_op({"op": "gift", "req": "a", "gift": "rose"}) == GiftOp("a", "rose", 1)
    assert parse_op({"op": "shoutout", "req": "b", "to": "u1", "text": "hi"}) == ShoutoutOp(
        "b", "u1", "hi"
    )
    for bad in [
        [],
        {"op": "gift"},
        {"op": "gift", "req": "a", "gift": "rose", "count": True},
        {"op": "gift", "req": "a", "gift": "rose", "count": 1.0},
        {"op": "shoutout", "req": "a", "to": "u", "text": ""},
        {"op": "shoutout", "req": "a", "to": "u", "text": "x" * 201},
        {"op": "shoutout", "req": "a", "to": "bad id", "text": "x"},
    ]:
        with pytest.raises(BadRequest):
            parse_op(bad)


def test_codecs_and_frames() -> None:
    assert choose_codec([]) is JSON
    assert choose_codec(["livegift.msgpack"]) is MSGPACK
    assert choose_codec(["chat"]) is None
    for size in (0, 125, 126, 65535, 65536):
        frame = ws_frame(b"x" * size, 1)
        assert frame[0] == 0x81 and frame.endswith(b"x" * size)
        assert len(frame) - size == (2 if size < 126 else 4 if size < 65536 else 10)
    events = [b'{"type":"gift","seq":7}', b'{"type":"gift","seq":8}']
    assert head(events[0]) == ("gift", 7)
    assert orjson.loads(JSON_FRAMES.events(events)[2:]) == [
        {"type": "gift", "seq": 7},
        {"type": "gift", "seq": 8},
    ]
    assert orjson.loads(JSON_FRAMES.events(events[:1])[2:]) == {"type": "gift", "seq": 7}
    assert msgpack.unpackb(MSGPACK_FRAMES.events(events)[2:])[1]["seq"] == 8


@pytest.mark.parametrize(
    ("gross", "bps", "net"),
    [(1000, 5000, 500), (1001, 5000, 500), (999, 3333, 666), (1, 0, 1), (7, 10000, 0)],
)
def test_payout_split(gross: int, bps: int, net: int) -> None:
    split = payout_split(gross, bps)
    assert split.net == net and split.gross == split.net + split.commission


def test_every_protocol_code_has_an_exception() -> None:
    codes = [
        "bad_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "unknown_gift",
        "unknown_package",
        "insufficient_funds",
        "not_adult",
        "stream_not_live",
        "self_gift",
        "rate_limited",
        "idempotency_conflict",
        "invalid_receipt",
        "price_mismatch",
        "below_minimum",
        "payout_limit",
        "unavailable",
        "internal",
        "too_many_connections",  # v2 (PROTOCOL §6)
        "token_expired",  # v2 (PROTOCOL §6)
    ]
    assert set(codes) == set(BY_CODE)
    assert from_code("self_gift").status == 400


def test_settings_from_env() -> None:
    s = Settings.from_env(
        {
            "LIVEGIFT_SECRET": "a" * 32,
            "LIVEGIFT_PAYMENT_SECRET": "b" * 32,
            "LIVEGIFT_BATCH_MS": "25",
        }
    )
    assert s.batch_ms == 25 and s.redis_url is None and s.gift_rate == 10 and s.gift_burst == 20
    with pytest.raises(ConfigError):
        Settings.from_env(
            {"LIVEGIFT_SECRET": "a", "LIVEGIFT_PAYMENT_SECRET": "b", "LIVEGIFT_BATCH_MS": "soon"}
        )
    with pytest.warns(RuntimeWarning):
        Settings.from_env({})


def test_packed_evalsha_matches_redis_py() -> None:
    from redis.asyncio.connection import Connection

    from livegift.pipeline import pack_evalsha

    keys_, args = ["lg:{lg}:w:ü", "k2"], ["a", 5, "é" * 200, -3, ""]
    expected = b"".join(Connection().pack_command("EVALSHA", "f" * 40, 2, *keys_, *args))
    assert pack_evalsha("f" * 40, keys_, args) == expected
