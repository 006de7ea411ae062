"""What every WebSocket join checks, whichever transport carries it (no I/O here).

Two kinds of connection: ``/ws/{room}`` with a user's token (:func:`check_join`), and
``/ws/creator/{user}`` with that creator's overlay key (:func:`check_follow`, PROTOCOL §8),
which :mod:`livegift.follow` serves. :func:`is_follow` tells the drivers which is which.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from livegift import events, keys
from livegift.auth import USER_ID, User, bearer_token, verify_session
from livegift.config import Settings
from livegift.errors import BadRequest, NotFound, Unauthorized
from livegift.protocol import Codec, choose_codec

# A handshake's query string, its parameters and each value: capped before any parsing.
MAX_QUERY = 4096
MAX_PARAMS = 16
MAX_PARAM = 2048
# A room's seq is a Lua number (a double): beyond 2^53 - 1 no seq can exist.
MAX_SEQ = 2**53 - 1
SINCE = re.compile(r"[0-9]{1,16}")

FOLLOW_PREFIX = "/ws/creator/"
# An overlay key as livegift.overlays mints it (url-safe base64), with room to change it.
KEY = re.compile(r"^[A-Za-z0-9_-]{16,128}$")


def welcome(
    room: str, you: dict[str, str] | None, info: dict[str, str]
) -> Callable[[int, int], dict[str, Any]]:
    """The welcome event for a join into the room ``info`` describes, given the room's
    latest seq and viewer count at the moment the member is added."""
    creator = {"id": info["creator"], "name": info.get("creator_name", info["creator"])}

    def event(seq: int, viewers: int) -> dict[str, Any]:
        return {
            "type": events.WELCOME,
            "room": room,
            "you": you,
            "creator": creator,
            "viewers": viewers,
            "seq": seq,
        }

    return event


@dataclass(frozen=True, slots=True)
class Join:
    user: User
    room: str
    codec: Codec
    since: int | None
    subprotocol: str | None
    expires: int = 0  # the token's exp, epoch seconds

    def welcome(self, info: dict[str, str]) -> Callable[[int, int], dict[str, Any]]:
        return welcome(self.room, self.user.public(), info)


@dataclass(frozen=True, slots=True)
class FollowJoin:
    """A ``/ws/creator/{user}?key=`` connection: the creator, and the key to check."""

    user: str
    key: str
    codec: Codec
    subprotocol: str | None


def is_follow(path: str) -> bool:
    return path.startswith(FOLLOW_PREFIX)


def _params(query_string: bytes) -> dict[str, str]:
    """The query's parameters, the first value of each, within the caps (BadRequest past
    them): the work a handshake does before its token is checked stays small."""
    if len(query_string) > MAX_QUERY:
        raise BadRequest(f"the query string is over {MAX_QUERY} bytes")
    parts = query_string.split(b"&", MAX_PARAMS)
    if len(parts) > MAX_PARAMS:
        raise BadRequest(f"more than {MAX_PARAMS} query parameters")
    params: dict[str, str] = {}
    for part in parts:
        name, _, value = part.partition(b"=")
        if len(value) > MAX_PARAM:
            raise BadRequest(f"a query parameter is over {MAX_PARAM} bytes")
        if value:  # as parse_qs: a blank value is no value
            key = unquote_plus(name.decode("latin-1"))
            params.setdefault(key, unquote_plus(value.decode("latin-1")))
    return params


def _read(
    query_string: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> tuple[dict[str, str], str | None, list[str]]:
    """The query, the Authorization bearer token and the offered subprotocols."""
    query = _params(query_string)
    token: str | None = None
    offered: list[str] = []
    for name, value in headers:
        if name == b"authorization" and token is None:
            token = bearer_token(value.decode("latin-1"))
        elif name == b"sec-websocket-protocol":
            offered += [p.strip() for p in value.decode("latin-1").split(",") if p.strip()]
    return query, token, offered


def _codec(offered: list[str]) -> Codec:
    codec = choose_codec(offered)
    if codec is None:
        raise BadRequest("subprotocol must be livegift.json or livegift.msgpack")
    return codec


def check_follow(
    settings: Settings, path: str, query_string: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> FollowJoin:
    """Validate a creator-follow request's shape; the key itself is checked against the
    data store once the connection is subscribed (livegift.follow). Raises NotFound,
    Unauthorized or BadRequest."""
    user = path[len(FOLLOW_PREFIX) :].strip("/")
    if not USER_ID.fullmatch(user):
        raise NotFound("no such creator")
    query, _, offered = _read(query_string, headers)
    key = query.get("key", "")
    if not KEY.match(key):
        raise Unauthorized("an overlay key is required (POST /api/overlay-key)")
    codec = _codec(offered)
    return FollowJoin(user, key, codec, codec.name if offered else None)


def check_join(
    settings: Settings, path: str, query_string: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> Join:
    """Validate a join request; raises Unauthorized, BadRequest or NotFound. The token
    is checked before anything else is looked at."""
    query, bearer, offered = _read(query_string, headers)
    user, expires = verify_session(settings.secret, query.get("token") or bearer)
    room = path[len("/ws/") :].strip("/") if path.startswith("/ws/") else ""
    if not keys.is_room(room):
        room = ""  # accepted, then closed with 4404 like any unknown room
    codec = _codec(offered)
    since = _since(query.get("since"))
    return Join(user, room, codec, since, codec.name if offered else None, expires)


def _since(raw: str | None) -> int | None:
    """The resume point: a decimal seq from 0 to MAX_SEQ, or None for a fresh join."""
    if raw is None:
        return None
    if not SINCE.fullmatch(raw) or int(raw) > MAX_SEQ:
        raise BadRequest(f"since must be an integer from 0 to {MAX_SEQ}")
    return int(raw)
