"""WebSocket client wire format and cheap event scanning; no I/O here.

The load generator must receive a million events per second on one core, so
the viewer hot path never decodes an event: it walks frame headers and counts
``seq`` fields with one C-level regex call per chunk. Only frames that break
the expected order (or that carry a ``welcome``/``ack``) are decoded fully.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import orjson

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# JSON: "seq":123 (orjson writes no spaces; json.dumps writes one).
SEQ_JSON = re.compile(rb'"seq"\s*:\s*(\d+)')
# MessagePack: the fixstr "seq" followed by an unsigned integer of any width.
SEQ_MSGPACK = re.compile(
    rb"\xa3seq(?:([\x00-\x7f])|\xcc(.)|\xcd(..)|\xce(....)|\xcf(........))", re.S
)

ScanResult = tuple[int, int, int]  # count, first seq, last seq


def scan_json(data: bytes, end: int) -> ScanResult:
    """Count the ``seq`` fields in ``data[:end]``; return (count, first, last)."""
    found = SEQ_JSON.findall(data, 0, end)
    count = len(found)
    if not count:
        return 0, 0, 0
    first = int(found[0])
    return count, first, (first if count == 1 else int(found[-1]))


def _mp_int(groups: tuple[bytes, ...]) -> int:
    for g in groups:
        if g:
            return int.from_bytes(g, "big")
    return 0


def scan_msgpack(data: bytes, end: int) -> ScanResult:
    found = SEQ_MSGPACK.findall(data, 0, end)
    count = len(found)
    if not count:
        return 0, 0, 0
    first = _mp_int(found[0])
    return count, first, (first if count == 1 else _mp_int(found[-1]))


JSON_TOKEN = b'"seq":'
MSGPACK_TOKEN = b"\xa3seq"


def verify_json(data: bytes, end: int, nxt: int) -> int:
    """The hot path: how many seqs ``data[:end]`` holds if they are exactly
    ``nxt, nxt+1, ...`` by count, first and last; -1 when they are not (or when the
    layout is not orjson's compact one), so the caller decodes the chunk fully."""
    count = data.count(JSON_TOKEN, 0, end)
    if not count:
        return 0
    i = data.find(JSON_TOKEN, 0, end) + 6
    first = b"%d" % nxt
    if not data.startswith(first, i) or 0x30 <= data[i + len(first)] <= 0x39:
        return -1
    if count == 1:
        return 1
    k = data.rfind(JSON_TOKEN, 0, end) + 6
    last = b"%d" % (nxt + count - 1)
    if not data.startswith(last, k) or 0x30 <= data[k + len(last)] <= 0x39:
        return -1
    return count


def msgpack_uint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x100:
        return b"\xcc" + bytes((n,))
    if n < 0x10000:
        return b"\xcd" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\xce" + n.to_bytes(4, "big")
    return b"\xcf" + n.to_bytes(8, "big")


def verify_msgpack(data: bytes, end: int, nxt: int) -> int:
    count = data.count(MSGPACK_TOKEN, 0, end)
    if not count:
        return 0
    if not data.startswith(msgpack_uint(nxt), data.find(MSGPACK_TOKEN, 0, end) + 4):
        return -1
    if count > 1 and not data.startswith(
        msgpack_uint(nxt + count - 1), data.rfind(MSGPACK_TOKEN, 0, end) + 4
    ):
        return -1
    return count


Verifier = Callable[[bytes, int, int], int]


def loads_json(payload: bytes) -> Any:
    return orjson.loads(payload)


def loads_msgpack(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False)


Scanner = Callable[[bytes, int], ScanResult]
Loader = Callable[[bytes], Any]


def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def handshake_request(
    host: str, port: int, path: str, key: bytes, subprotocol: str | None = None
) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
        "User-Agent: livegift-loadtest",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Parse an HTTP response head (without the final blank line)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return status, headers


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    if n:
        stream = (mask * (n // 4 + 1))[:n]
        body = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    else:
        body = b""
    return head + mask + body


def server_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, unmasked server frame (used by the raw-limit peer and tests)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


def split_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Split unmasked frames: ([(first byte, payload)], leftover). Not on the hot path."""
    out: list[tuple[int, bytes]] = []
    pos, n = 0, len(data)
    while n - pos >= 2:
        ln = data[pos + 1] & 0x7F
        hl = 2
        if ln == 126:
            if n - pos < 4:
                break
            ln, hl = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
        elif ln == 127:
            if n - pos < 10:
                break
            ln, hl = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
        end = pos + hl + ln
        if end > n:
            break
        out.append((data[pos], data[pos + hl : end]))
        pos = end
    return out, data[pos:]


def unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    stream = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def events_of(obj: Any) -> Iterator[dict[str, Any]]:
    """A server frame holds one event object or an array of them."""
    if isinstance(obj, list):
        for ev in obj:
            if isinstance(ev, dict):
                yield ev
    elif isinstance(obj, dict):
        yield obj
