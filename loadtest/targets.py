"""What differs between the servers the same client drives.

``livegift`` is the real thing: viewers join ``/ws/{room}``, get a ``welcome``
with the room's latest seq, and gifters send ``gift`` ops that the server
debits, sequences and fans out.

The peers cannot debit a wallet, so a publisher connection in the room sends
ready-made ~200-byte gift events (with a client-assigned seq) to the server,
which fans them out through Redis with its own idiomatic API.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Literal

Kind = Literal["livegift", "raw", "socketio", "channels", "channels-pubsub"]
KINDS: tuple[Kind, ...] = ("livegift", "raw", "socketio", "channels", "channels-pubsub")

# How a viewer knows it has joined (and from which seq on it must see events).
JOIN_WELCOME = 0  # livegift: first frame is a welcome with the room's latest seq
JOIN_UPGRADE = 1  # raw, channels: joined once the 101 arrives, expect seq 1 on
JOIN_SOCKETIO = 2  # socket.io: joined once the namespace CONNECT is answered


@dataclasses.dataclass(frozen=True)
class Target:
    kind: Kind
    host: str
    port: int
    codec: Literal["json", "msgpack"] = "json"

    @property
    def join_mode(self) -> int:
        if self.kind == "livegift":
            return JOIN_WELCOME
        if self.kind == "socketio":
            return JOIN_SOCKETIO
        return JOIN_UPGRADE

    @property
    def subprotocol(self) -> str | None:
        if self.kind == "livegift":
            return f"livegift.{self.codec}"
        return None

    def path(self, room: str, token: str | None) -> str:
        q = urllib.parse.quote
        if self.kind == "livegift":
            return f"/ws/{q(room, safe='')}?token={q(token or '', safe='')}"
        if self.kind == "socketio":
            return f"/socket.io/?EIO=4&transport=websocket&room={q(room, safe='')}"
        if self.kind in ("channels", "channels-pubsub"):
            return f"/ws/{q(room, safe='')}/"
        return f"/ws/{q(room, safe='')}"


def check_loopback(host: str) -> None:
    """Every target of this tool is on this machine."""
    if host == "localhost" or host == "::1" or host.startswith("127."):
        return
    raise SystemExit(f"refusing to target {host!r}: the load generator only targets loopback")


_PAD = "x" * 200


def peer_event(seq: int, ts_ms: int, publisher: int) -> bytes:
    """A gift-like event of about 200 bytes, as the peers fan it out."""
    head = (
        f'{{"type":"gift","seq":{seq},"ts":{ts_ms},'
        f'"from":{{"id":"lt-pub-{publisher}","name":"Publisher {publisher}"}},'
        '"gift":{"id":"rose","name":"Rose","coins":1},"count":1,"coins":1,'
        f'"combo":{seq},"pad":"'
    )
    pad = max(0, 198 - len(head))
    return (head + _PAD[:pad] + '"}').encode()
