"""The exception tree; each class maps to one PROTOCOL §6 code in one place.

Every error knows its ack/HTTP error ``code``, its HTTP ``status``, and the WebSocket
``close`` (from :mod:`livegift.disconnect`) sent when it ends a connection: 1011 unless
stated below. :func:`error_body` builds the ``{"error": {"code", "message"}}`` body that
HTTP responses, refused handshakes and failed acks all carry.

LiveGiftError                 base, code "internal", HTTP 500
├── BadRequest                bad_request, 400 (WebSocket close 1008)
│   └── PayloadTooLarge       bad_request, 413: a request body over LIVEGIFT_MAX_BODY
├── Unauthorized              unauthorized, 401 (WebSocket close 4401)
│   └── TokenExpired          token_expired, 401: the token of an open socket reached exp
├── Forbidden                 forbidden, 403 (WebSocket close 4403)
├── NotFound                  not_found, 404 (WebSocket close 4404)
├── UnknownGift               unknown_gift, 400
├── UnknownPackage            unknown_package, 400
├── InsufficientFunds         insufficient_funds, 402
├── NotAdult                  not_adult, 403
├── StreamNotLive             stream_not_live, 409
├── SelfGift                  self_gift, 400
├── RateLimited               rate_limited, 429
├── TooManyConnections        too_many_connections, 429 (WebSocket close 1008)
├── IdempotencyConflict       idempotency_conflict, 409
├── InvalidReceipt            invalid_receipt, 400
├── PriceMismatch             price_mismatch, 400
├── BelowMinimum              below_minimum, 400
├── PayoutLimit               payout_limit, 409
└── Unavailable               unavailable, 503 (WebSocket close 1013)
"""

from __future__ import annotations

from typing import Any, ClassVar

from livegift import disconnect
from livegift.disconnect import Close


def error_body(code: str, message: str) -> dict[str, Any]:
    """The PROTOCOL error object, as HTTP bodies and failed acks carry it."""
    return {"error": {"code": code, "message": message}}


class LiveGiftError(Exception):
    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    close: ClassVar[Close] = disconnect.SERVER_ERROR
    default_message: ClassVar[str] = "internal server error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message)


class BadRequest(LiveGiftError):
    code, status, default_message = "bad_request", 400, "the request is not valid"
    close = disconnect.POLICY


class PayloadTooLarge(BadRequest):
    """Not a code of its own (PROTOCOL §6 has none): bad_request, with HTTP 413."""

    status, default_message = 413, "request body too large"


class Unauthorized(LiveGiftError):
    code, status, default_message = "unauthorized", 401, "a valid token is required"
    close = disconnect.UNAUTHORIZED


class TokenExpired(Unauthorized):
    """PROTOCOL §8: a socket whose token reached ``exp`` is closed 4401, reason = this code."""

    code, default_message = "token_expired", "the token expired: refresh it before exp"


class Forbidden(LiveGiftError):
    code, status, default_message = "forbidden", 403, "you may not do that"
    close = disconnect.FORBIDDEN


class NotFound(LiveGiftError):
    code, status, default_message = "not_found", 404, "not found"
    close = disconnect.NOT_FOUND


class UnknownGift(LiveGiftError):
    code, status, default_message = "unknown_gift", 400, "no such gift"


class UnknownPackage(LiveGiftError):
    code, status, default_message = "unknown_package", 400, "no such coin package"


class InsufficientFunds(LiveGiftError):
    code, status, default_message = "insufficient_funds", 402, "not enough coins"


class NotAdult(LiveGiftError):
    code, status, default_message = "not_adult", 403, "you must be 18 or older to do that"


class StreamNotLive(LiveGiftError):
    code, status, default_message = "stream_not_live", 409, "the stream is not live"


class SelfGift(LiveGiftError):
    code, status, default_message = "self_gift", 400, "you cannot send gifts to your own stream"


class RateLimited(LiveGiftError):
    code, status, default_message = "rate_limited", 429, "too many gifts, slow down"


class TooManyConnections(LiveGiftError):
    code, status = "too_many_connections", 429
    default_message = "too many open connections for this user"
    close = disconnect.POLICY


class IdempotencyConflict(LiveGiftError):
    code, status = "idempotency_conflict", 409
    default_message = "this request id was already used with different parameters"


class InvalidReceipt(LiveGiftError):
    code, status, default_message = "invalid_receipt", 400, "the receipt is not valid"


class PriceMismatch(LiveGiftError):
    code, status, default_message = (
        "price_mismatch",
        400,
        "the receipt's price is not the list price",
    )


class BelowMinimum(LiveGiftError):
    code, status, default_message = "below_minimum", 400, "below the minimum cash-out"


class PayoutLimit(LiveGiftError):
    code, status, default_message = "payout_limit", 409, "over the daily cash-out limit"


class Unavailable(LiveGiftError):
    code, status, default_message = "unavailable", 503, "the data store is unavailable, try again"
    close = disconnect.TRY_AGAIN_LATER


BY_CODE: dict[str, type[LiveGiftError]] = {
    cls.code: cls
    for cls in (
        LiveGiftError,
        BadRequest,
        Unauthorized,
        TokenExpired,
        Forbidden,
        NotFound,
        UnknownGift,
        UnknownPackage,
        InsufficientFunds,
        NotAdult,
        StreamNotLive,
        SelfGift,
        RateLimited,
        TooManyConnections,
        IdempotencyConflict,
        InvalidReceipt,
        PriceMismatch,
        BelowMinimum,
        PayoutLimit,
        Unavailable,
    )
}


def from_code(code: str, message: str | None = None) -> LiveGiftError:
    """The exception for a PROTOCOL code (as returned by a Lua script)."""
    return BY_CODE.get(code, LiveGiftError)(message)
