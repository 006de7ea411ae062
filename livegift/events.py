"""Room event types and the one shape every event has on the wire (PROTOCOL §4).

Every event is a JSON object whose first members are ``type``, then (durable events only)
``seq`` and ``ts``. The Lua prelude's ``event()`` builder writes them in that order and
:func:`event` here does the same, so :func:`head` reads an event's type and seq from the
first bytes without parsing the rest. ``web/client.js`` keeps the same DURABLE table; a test
fails when the two drift apart.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

# Durable room events: each carries the room's next seq and is kept in the room's history.
GIFT: Final = "gift"
SHOUTOUT: Final = "shoutout"
STREAM_ENDED: Final = "stream_ended"
DURABLE: Final = frozenset({GIFT, SHOUTOUT, STREAM_ENDED})

# Events made by a server process for its own members (no seq).
WELCOME: Final = "welcome"
ACK: Final = "ack"
RESUMED: Final = "resumed"
LEADERBOARD: Final = "leaderboard"
VIEWERS: Final = "viewers"
# On a creator's overlay connection (livegift.follow): the creator went live in a new room
# (its welcome follows), or has no live stream.
STREAM_STARTED: Final = "stream_started"
OFFLINE: Final = "offline"
LIVE: Final = frozenset({WELCOME, ACK, RESUMED, LEADERBOARD, VIEWERS, STREAM_STARTED, OFFLINE})

_TYPE = b'{"type":"'
_SEQ = b',"seq":'


class BadEvent(ValueError):
    """Bytes that are not an event of the shape above."""


def event(type_: str, seq: int = 0, ts: int = 0, **fields: Any) -> bytes:
    """One event as JSON, ``type`` first and then ``seq`` and ``ts`` when it is durable."""
    head: dict[str, Any] = {"type": type_}
    if seq:
        head["seq"] = seq
        head["ts"] = ts
    head.update(fields)
    return orjson.dumps(head)


def head(data: bytes) -> tuple[str, int]:
    """The (type, seq) of one event; seq is 0 for events that carry none.

    Reads the fixed prefix that every builder writes; anything else is parsed in full, and
    what is not an event object raises :class:`BadEvent`.
    """
    if data.startswith(_TYPE):
        end = data.find(b'"', 9)
        if end > 9:
            type_ = data[9:end].decode("ascii", "replace")
            if data.startswith(_SEQ, end + 1):
                start = end + 1 + len(_SEQ)
                stop = start
                while stop < len(data) and 48 <= data[stop] <= 57:
                    stop += 1
                if stop > start and stop - start <= 18 and data[start] != 48:  # no 0, no 0n
                    return type_, int(data[start:stop])
            elif type_ not in DURABLE:
                return type_, 0
    return _slow_head(data)


def _slow_head(data: bytes) -> tuple[str, int]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadEvent(f"not JSON: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise BadEvent("an event is a JSON object with a string type")
    seq = value.get("seq", 0)
    if type(seq) is not int or seq < 0 or (value["type"] in DURABLE and seq == 0):
        raise BadEvent(f"event {value['type']!r} has no valid seq")
    return value["type"], seq
