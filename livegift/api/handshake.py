"""What every WebSocket join checks, whichever transport carries it (no I/O here)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from livegift import events
from livegift.auth import USER_ID, User, bearer_token, verify_token
from livegift.config import Settings
from livegift.errors import BadRequest
from livegift.protocol import Codec, choose_codec


@dataclass(frozen=True, slots=True)
class Join:
    user: User
    room: str
    codec: Codec
    since: int | None
    subprotocol: str | None

    def welcome(self, info: dict[str, str]) -> Callable[[int, int], dict[str, Any]]:
        """The welcome event for this join into the room ``info`` describes, given the
        room's latest seq and viewer count at the moment the member is added."""
        creator = {"id": info["creator"], "name": info.get("creator_name", info["creator"])}
        you = self.user.public()

        def welcome(seq: int, viewers: int) -> dict[str, Any]:
            return {
                "type": events.WELCOME,
                "room": self.room,
                "you": you,
                "creator": creator,
                "viewers": viewers,
                "seq": seq,
            }

        return welcome


def check_join(
    settings: Settings, path: str, query_string: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> Join:
    """Validate a join request; raises Unauthorized, BadRequest or NotFound."""
    room = path[len("/ws/") :].strip("/") if path.startswith("/ws/") else ""
    if not USER_ID.match(room):
        room = ""  # accepted, then closed with 4404 like any unknown room
    query = parse_qs(query_string.decode("latin-1"))
    token = query["token"][0] if query.get("token") else None
    offered: list[str] = []
    for name, value in headers:
        if name == b"authorization" and token is None:
            token = bearer_token(value.decode("latin-1"))
        elif name == b"sec-websocket-protocol":
            offered += [p.strip() for p in value.decode("latin-1").split(",") if p.strip()]
    user = verify_token(settings.secret, token)
    codec = choose_codec(offered)
    if codec is None:
        raise BadRequest("subprotocol must be livegift.json or livegift.msgpack")
    since: int | None = None
    if "since" in query:
        try:
            since = int(query["since"][0])
        except ValueError:
            since = -1
        if since < 0:
            raise BadRequest("since must be a non-negative integer")
    return Join(user, room, codec, since, codec.name if offered else None)
