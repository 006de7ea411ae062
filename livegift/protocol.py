"""Wire types and codecs (PROTOCOL §4). No I/O: bytes in, values out, and back.

A server frame carries one event or an array of events. Codecs encode once; the hub hands
the same pre-framed bytes to every member that speaks that codec.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import orjson

from livegift.auth import USER_ID
from livegift.errors import BadRequest, error_body
from livegift.rfc6455 import MAX_MESSAGE, OP_BINARY, OP_TEXT, frame

MAX_FRAME: Final = MAX_MESSAGE  # PROTOCOL §4: a client frame over 4 KiB is closed 1009
REQ = re.compile(r"[\x21-\x7e]{1,64}")  # use with fullmatch


@dataclass(frozen=True, slots=True)
class Codec:
    name: str
    binary: bool

    def encode(self, value: Any) -> bytes:
        if self.binary:
            return msgpack.packb(value, use_bin_type=True)
        return orjson.dumps(value)

    def decode(self, data: bytes | str) -> Any:
        if self.binary:
            if isinstance(data, str):
                raise BadRequest("this connection speaks livegift.msgpack: send binary frames")
            return msgpack.unpackb(data, raw=False, strict_map_key=True)
        return orjson.loads(data)

    def frame(self, payload: bytes) -> bytes:
        """A complete unmasked server WebSocket frame (RFC 6455 §5.2) holding payload."""
        return frame(payload, OP_BINARY if self.binary else OP_TEXT)


JSON: Final = Codec("livegift.json", binary=False)
MSGPACK: Final = Codec("livegift.msgpack", binary=True)
CODECS: Final = {JSON.name: JSON, MSGPACK.name: MSGPACK}


@dataclass(frozen=True, slots=True)
class Wire:
    """What a sink's ``write`` takes: complete RFC 6455 frames (a driver that owns the
    socket) or bare payloads (an ASGI server that frames them itself: bytes for MessagePack,
    str for JSON). The hub encodes each batch once per codec and packs it once per wire."""

    codec: Codec
    framed: bool

    def pack(self, payload: bytes) -> bytes | str:
        if self.framed:
            return self.codec.frame(payload)
        return payload if self.codec.binary else payload.decode()

    def encode(self, value: Any) -> bytes | str:
        """One event or ack, ready to write."""
        return self.pack(self.codec.encode(value))

    def events(self, events: list[bytes]) -> bytes | str:
        """A batch of raw JSON events (as the Lua scripts publish them), ready to write."""
        return self.pack(encode_payload(self.codec, events))


def encode_payload(codec: Codec, events: list[bytes]) -> bytes:
    """One payload for a list of raw JSON events: the object itself, or an array."""
    if not codec.binary:
        return events[0] if len(events) == 1 else b"[" + b",".join(events) + b"]"
    decoded = [orjson.loads(e) for e in events]
    return bytes(msgpack.packb(decoded[0] if len(decoded) == 1 else decoded))


JSON_FRAMES: Final = Wire(JSON, framed=True)
MSGPACK_FRAMES: Final = Wire(MSGPACK, framed=True)
JSON_TEXT: Final = Wire(JSON, framed=False)
MSGPACK_BYTES: Final = Wire(MSGPACK, framed=False)


def wire_for(codec: Codec, framed: bool) -> Wire:
    if framed:
        return MSGPACK_FRAMES if codec.binary else JSON_FRAMES
    return MSGPACK_BYTES if codec.binary else JSON_TEXT


def choose_codec(offered: list[str]) -> Codec | None:
    """The codec for the client's Sec-WebSocket-Protocol list: first known one, else JSON.

    Returns None when the client offered subprotocols and none of them is ours.
    """
    if not offered:
        return JSON
    for name in offered:
        if name in CODECS:
            return CODECS[name]
    return None


@dataclass(frozen=True, slots=True)
class GiftOp:
    req: str
    gift: str
    count: int


@dataclass(frozen=True, slots=True)
class ShoutoutOp:
    req: str
    to: str
    text: str


@dataclass(frozen=True, slots=True)
class RefreshOp:
    """PROTOCOL §8: swap in a new token of the same user before the socket's one expires."""

    req: str
    token: str


Op = GiftOp | ShoutoutOp | RefreshOp


def read_req(message: Any) -> str | None:
    """The message's req when it is a valid one, so a bad_request ack can carry it."""
    if isinstance(message, dict):
        req = message.get("req")
        if isinstance(req, str) and REQ.fullmatch(req):
            return req
    return None


def _gift(req: str, message: dict[str, Any]) -> GiftOp:
    gift = message.get("gift")
    count = message.get("count", 1)
    if not isinstance(gift, str) or not 1 <= len(gift) <= 64:
        raise BadRequest("gift must be a gift id")
    if type(count) is not int or not 1 <= count <= 99:
        raise BadRequest("count must be an integer from 1 to 99")
    return GiftOp(req, gift, count)


def _shoutout(req: str, message: dict[str, Any]) -> ShoutoutOp:
    to, text = message.get("to"), message.get("text")
    if not isinstance(to, str) or not USER_ID.fullmatch(to):
        raise BadRequest("to must be a user id")
    if not isinstance(text, str) or not 1 <= len(text) <= 200:
        raise BadRequest("text must be 1-200 characters")
    return ShoutoutOp(req, to, text)


def _refresh(req: str, message: dict[str, Any]) -> RefreshOp:
    token = message.get("token")
    if not isinstance(token, str) or not 1 <= len(token) <= MAX_FRAME:
        raise BadRequest("token must be a token string")
    return RefreshOp(req, token)


# Every client op by name, with the function that validates its fields.
OPS: Final[dict[str, Callable[[str, dict[str, Any]], Op]]] = {
    "gift": _gift,
    "shoutout": _shoutout,
    "refresh": _refresh,
}


def parse_op(message: Any) -> Op:
    """Validate a decoded client message into an op, or raise BadRequest."""
    if not isinstance(message, dict):
        raise BadRequest("an op must be an object")
    req = message.get("req")
    if not isinstance(req, str) or not REQ.fullmatch(req):
        raise BadRequest("req must be 1-64 printable ASCII characters")
    parse = OPS.get(message.get("op"))  # type: ignore[arg-type]
    if parse is None:
        known = ", ".join(repr(name) for name in OPS)
        raise BadRequest(f"unknown op {message.get('op')!r}; ops are {known}")
    return parse(req, message)


def ack_ok(req: str, **fields: Any) -> dict[str, Any]:
    return {"type": "ack", "req": req, "ok": True, **fields}


def ack_error(req: str | None, code: str, message: str) -> dict[str, Any]:
    ack: dict[str, Any] = {"type": "ack", "ok": False, **error_body(code, message)}
    if req is not None:
        ack["req"] = req
    return ack
