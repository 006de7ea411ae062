"""RFC 6455 for the server side, sans I/O: bytes in, events and bytes out.

This module owns the WebSocket wire format and nothing else (no sockets, no asyncio, no
sessions):

- :class:`FrameParser` turns what a client sends into :data:`Event` values (a message,
  a ping, a pong, the peer's close, or a :class:`Fail` naming the close to send), and
  enforces every rule of RFC 6455 §5 and §7 that the Autobahn testsuite checks;
- :func:`frame`, :func:`close_frame` and :func:`close_reply` build server frames;
- :func:`parse_upgrade`, :func:`check_partial` and :func:`accept_response` are the
  opening handshake (§4.2), with the size limits of the request head.

Close codes come from :mod:`livegift.disconnect`. No extension is negotiated, so any
reserved bit (RSV1 included) is a protocol error.

A parser for an idle connection is one object of six slots and no buffers: a partial
frame is kept in a bytearray that exists only until the frame completes, and a
fragmented message's bytes only until its last fragment.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import re
import struct
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from livegift import disconnect
from livegift.disconnect import BAD_DATA, PROTOCOL_ERROR, TOO_BIG, Close

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets ships its C speedups on CPython
    from websockets.utils import apply_mask

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
MAX_CONTROL: Final = 125  # §5.5: control frame payloads
MAX_MESSAGE: Final = 4096  # a message's payload, all fragments together (PROTOCOL §4)
MAX_CLOSE_REASON: Final = 123  # a close payload is a 2-byte code and the reason
GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # §1.3
MAX_REQUEST_LINE: Final = 8192  # the request line, its CRLF included
MAX_HEADERS: Final = 16384  # the whole head, up to and including the blank line

# Parser states: no message open, a fragmented text or binary message open, finished.
_IDLE: Final = 0
_TEXT: Final = OP_TEXT
_BINARY: Final = OP_BINARY
_DONE: Final = 3

_utf8_decoder = codecs.getincrementaldecoder("utf-8")


# -- events ------------------------------------------------------------------------------
# Plain slotted dataclasses: a frozen one costs about 2.5 times as much to make, per message.


@dataclass(slots=True)
class Message:
    """A complete data message: text decoded to str, binary as bytes."""

    binary: bool
    data: bytes | str


@dataclass(slots=True)
class Ping:
    """The caller answers with ``frame(payload, OP_PONG)``."""

    payload: bytes


@dataclass(slots=True)
class Pong:
    payload: bytes


@dataclass(slots=True)
class CloseReceived:
    """The peer's close; ``code`` is None when its close frame was empty."""

    code: int | None
    reason: str


@dataclass(slots=True)
class Fail:
    """The peer broke the protocol: send ``close_frame(close.code, reason)`` and stop."""

    close: Close
    reason: str


Event = Message | Ping | Pong | CloseReceived | Fail


# -- client frames -----------------------------------------------------------------------


class FrameParser:
    """Parses the client-to-server direction of one connection.

    ``feed`` returns the events that the chunk completes, in order. After a
    :class:`Fail` or a :class:`CloseReceived` the parser is finished and ignores any
    further input (§7.1.7).
    """

    __slots__ = ("_buf", "_decoder", "_frag", "_need", "_state", "max_message")

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message  # a message's payload, all fragments together
        self._state = _IDLE
        self._buf: bytearray | None = None  # the start of an incomplete frame
        self._need = 0  # how long _buf must grow before parsing again is worth it
        self._frag: bytearray | None = None  # the fragments of the open message
        self._decoder: codecs.IncrementalDecoder | None = None  # checks fragmented text

    @property
    def finished(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes | bytearray) -> list[Event]:
        events: list[Event] = []
        if self._state == _DONE:
            return events
        buf = self._buf
        if buf is None:
            used = self._frames(data, events)
            if used < len(data) and self._state != _DONE:
                self._buf = bytearray(data[used:])
        else:
            buf += data
            if len(buf) < self._need:
                return events
            used = self._frames(buf, events)
            if used == len(buf) or self._state == _DONE:
                self._buf = None
            else:
                del buf[:used]
        return events

    def _frames(self, data: bytes | bytearray, events: list[Event]) -> int:
        """Parse the complete frames at the start of data; return how many bytes they use."""
        pos, size = 0, len(data)
        room = self.max_message - (len(self._frag) if self._frag else 0)
        while size - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            if not ((b0 == 0x81 or b0 == 0x82) and b1 & 0x80 and self._state == _IDLE):
                problem = self._bad_header(b0, b1)
                if problem is not None:
                    return self._fail(events, PROTOCOL_ERROR, problem)
            n, start = b1 & 0x7F, pos + 6  # start: where the payload begins, after the mask
            if n > MAX_CONTROL:
                start = pos + (8 if n == 126 else 14)
                if size < start - 4:
                    self._need = start - 4 - pos
                    return pos
                n = int.from_bytes(data[pos + 2 : start - 4], "big")
                if n >> 63:
                    return self._fail(events, PROTOCOL_ERROR, "payload length over 63 bits")
            if n > room and not b0 & 0x08:
                return self._fail(events, TOO_BIG, "message too big")
            end = start + n
            if end > size:
                self._need = end - pos
                return pos
            payload = apply_mask(data[start:end], data[start - 4 : start])
            pos = end
            if b0 == 0x81:
                try:
                    events.append(Message(False, payload.decode()))
                except UnicodeDecodeError:
                    return self._fail(events, BAD_DATA, "text message is not UTF-8")
            elif b0 == 0x82:
                events.append(Message(True, payload))
            else:
                self._frame(b0, payload, events)
                if self._state == _DONE:
                    return pos
                room = self.max_message - (len(self._frag) if self._frag else 0)
        self._need = 2
        return pos

    def _bad_header(self, b0: int, b1: int) -> str | None:
        """What is wrong with a frame's first two bytes, if anything (all 1002 errors)."""
        if b0 & 0x70:
            return "reserved bits set"
        if not b1 & 0x80:
            return "client frame not masked"
        op = b0 & 0x0F
        if op >= OP_CLOSE:
            if op > OP_PONG:
                return f"unknown opcode {op}"
            if not b0 & 0x80:
                return "fragmented control frame"
            if b1 & 0x7F > MAX_CONTROL:
                return "control frame payload over 125 bytes"
        elif op > OP_BINARY:
            return f"unknown opcode {op}"
        elif op == OP_CONT:
            if self._state == _IDLE:
                return "continuation frame without a message to continue"
        elif self._state != _IDLE:
            return "new data frame before the fragmented message ended"
        return None

    def _frame(self, b0: int, payload: bytes, events: list[Event]) -> None:
        """Everything but an unfragmented text or binary frame."""
        op = b0 & 0x0F
        if op == OP_PING:
            events.append(Ping(payload))
        elif op == OP_PONG:
            events.append(Pong(payload))
        elif op == OP_CLOSE:
            events.append(self._close(payload))
            self._finish()
        elif op == OP_CONT:
            self._continue(bool(b0 & 0x80), payload, events)
        else:  # the first fragment of a message, or a short final frame of one
            self._state, self._frag = op, bytearray()
            if op == OP_TEXT:
                self._decoder = _utf8_decoder()
            self._continue(bool(b0 & 0x80), payload, events)

    def _continue(self, fin: bool, payload: bytes, events: list[Event]) -> None:
        frag = self._frag
        assert frag is not None
        frag += payload
        if self._decoder is not None:
            try:
                self._decoder.decode(payload, fin)
            except UnicodeDecodeError:
                self._fail(events, BAD_DATA, "text message is not UTF-8")
                return
        if fin:
            binary = self._state == _BINARY
            data = bytes(frag)
            self._state, self._frag, self._decoder = _IDLE, None, None
            events.append(Message(binary, data if binary else data.decode()))

    @staticmethod
    def _close(payload: bytes) -> CloseReceived | Fail:
        if not payload:
            return CloseReceived(None, "")
        if len(payload) == 1:
            return Fail(PROTOCOL_ERROR, "close frame with a 1-byte payload")
        code = payload[0] << 8 | payload[1]
        if not disconnect.valid_received(code):
            return Fail(PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            return CloseReceived(code, payload[2:].decode())
        except UnicodeDecodeError:
            return Fail(BAD_DATA, "close reason is not UTF-8")

    def _fail(self, events: list[Event], close: Close, reason: str) -> int:
        events.append(Fail(close, reason))
        self._finish()
        return 0

    def _finish(self) -> None:
        self._state, self._buf, self._frag, self._decoder = _DONE, None, None, None


# -- server frames -----------------------------------------------------------------------


def frame(payload: bytes, opcode: int) -> bytes:
    """A complete unmasked server frame (§5.2) holding payload, FIN set."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x80 | opcode, n) + payload
    if opcode >= OP_CLOSE:
        raise ValueError("a control frame payload is at most 125 bytes")
    if n < 1 << 16:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; reason is cut to 123 bytes on a character boundary.

    Raises ValueError for a code that RFC 6455 §7.4 does not let an endpoint send.
    """
    if not disconnect.may_send(code):
        raise ValueError(f"close code {code} may not be sent")
    raw = reason.encode("utf-8", "replace")
    if len(raw) > MAX_CLOSE_REASON:
        raw = raw[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode()
    return frame(code.to_bytes(2, "big") + raw, OP_CLOSE)


def close_reply(received: CloseReceived) -> bytes:
    """The close frame that answers the peer's (§5.5.1): its code echoed, else 1000."""
    code = received.code
    return close_frame(disconnect.NORMAL.code if code is None else code)


# -- opening handshake -------------------------------------------------------------------


class HandshakeError(Exception):
    """The upgrade request is refused with an HTTP status, a PROTOCOL §6 code and why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(slots=True)
class Upgrade:
    """A valid WebSocket upgrade request (§4.2.1)."""

    method: bytes
    target: bytes  # path and query, as sent
    headers: list[tuple[bytes, bytes]]  # lowercased names, values without surrounding space
    key: bytes  # Sec-WebSocket-Key, checked to be base64 of 16 bytes

    @property
    def path(self) -> bytes:
        return self.target.partition(b"?")[0]

    @property
    def query(self) -> bytes:
        return self.target.partition(b"?")[2]


_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_HEADER = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*) HTTP/1\.1")
_SUBPROTOCOL = re.compile(_TOKEN.decode())


def check_partial(buf: bytes | bytearray) -> None:
    """Raise HandshakeError 414 or 431 once a head, complete or not, is over a limit."""
    size = len(buf)
    if size >= MAX_REQUEST_LINE and buf.find(b"\r\n", 0, MAX_REQUEST_LINE) < 0:
        raise HandshakeError(414, "bad_request", "request line too long")
    if size >= MAX_HEADERS and buf.find(b"\r\n\r\n", 0, MAX_HEADERS) < 0:
        raise HandshakeError(431, "bad_request", "request headers too large")


def parse_upgrade(request: bytes | bytearray) -> Upgrade:
    """Parse and check the head of an upgrade request (anything after it is ignored).

    Raises HandshakeError: 400 for a malformed request or a bad Sec-WebSocket-Key, 426
    for anything but a GET upgrade to WebSocket version 13, 414 and 431 over the limits.
    The Host header and the target's meaning are the caller's business.
    """
    check_partial(request)
    end = request.find(b"\r\n\r\n")
    if end < 0:
        raise HandshakeError(400, "bad_request", "incomplete request head")
    lines = bytes(request[:end]).split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        raise HandshakeError(400, "bad_request", "malformed request line")
    headers = []
    for raw in lines[1:]:
        header = _HEADER.fullmatch(raw)
        if header is None:
            raise HandshakeError(400, "bad_request", "malformed header line")
        headers.append((header[1].lower(), header[2]))
    method, target = line[1], line[2]
    _check_upgrade(method, headers)
    return Upgrade(method, target, headers, _check_key(headers))


def _tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    """The comma-separated values of every header called name, lowercased."""
    found = (value.lower().split(b",") for key, value in headers if key == name)
    return {token.strip(b" \t") for tokens in found for token in tokens}


def _check_upgrade(method: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    if (
        method != b"GET"
        or b"websocket" not in _tokens(headers, b"upgrade")
        or b"upgrade" not in _tokens(headers, b"connection")
        or _tokens(headers, b"sec-websocket-version") != {b"13"}
    ):
        raise HandshakeError(426, "bad_request", "a WebSocket version 13 upgrade is required")


def _check_key(headers: list[tuple[bytes, bytes]]) -> bytes:
    keys = [value for name, value in headers if name == b"sec-websocket-key"]
    try:
        if len(keys) == 1 and len(base64.b64decode(keys[0], validate=True)) == 16:
            return keys[0]
    except binascii.Error:
        pass
    raise HandshakeError(400, "bad_request", "Sec-WebSocket-Key must be base64 of 16 bytes")


def accept_value(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (§4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def refusal(status: int, content: bytes, content_type: str = "application/json") -> bytes:
    """An HTTP/1.1 response that refuses a request and closes the connection; a 426 also
    names the WebSocket version this server speaks (§4.4)."""
    version = "sec-websocket-version: 13\r\n" if status == 426 else ""
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"content-type: {content_type}\r\ncontent-length: {len(content)}\r\n"
        f"{version}connection: close\r\n\r\n"
    ).encode() + content


def accept_response(key: bytes, subprotocol: str | None = None) -> bytes:
    """The 101 response that completes the handshake."""
    head = [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_value(key) + b"\r\n"
    ]
    if subprotocol is not None:
        if not _SUBPROTOCOL.fullmatch(subprotocol):
            raise ValueError(f"not a subprotocol token: {subprotocol!r}")
        head.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode() + b"\r\n")
    head.append(b"\r\n")
    return b"".join(head)
