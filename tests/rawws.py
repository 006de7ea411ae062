"""A raw-socket HTTP/WebSocket client for attack tests: every byte is the test's choice."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time

import orjson

from tests.conftest import unit

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING = 0x1, 0x2, 0x8, 0x9


def connect(port: int, timeout: float = 5, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(unit(timeout))
    sock.connect(("127.0.0.1", port))
    return sock


def upgrade_request(
    path: str, key: bytes | None = None, protocol: str | None = None, extra: str = ""
) -> bytes:
    key = base64.b64encode(os.urandom(16)) if key is None else key
    head = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        + (f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else "")
        + extra
    ).encode()
    return head + b"Sec-WebSocket-Key: " + key + b"\r\n\r\n"


def read_response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """(status, head, what came after the head) of one HTTP response."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, rest


def read_body(sock: socket.socket, head: bytes, rest: bytes) -> dict[str, object]:
    """The JSON body of a response with a content-length."""
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    body: dict[str, object] = orjson.loads(rest[:length])
    return body


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    """A client frame (masked unless told not to)."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return frame(OP_CLOSE, struct.pack("!H", code) + reason)


class Reader:
    """Server frames from a socket (unmasked), with whatever followed the handshake."""

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(buffered)
        self.eof = False

    def _fill(self, need: int, deadline: float) -> bool:
        while len(self.buf) < need:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete frame in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
                return False
            self.buf += chunk
        return True

    def next(self, timeout: float = 5) -> tuple[int, bytes] | None:
        """(opcode, payload) of the next frame, or None at the end of the stream."""
        deadline = time.monotonic() + unit(timeout)
        if not self._fill(2, deadline):
            return None
        n, start = self.buf[1] & 0x7F, 2
        if n == 126:
            start = 4
        elif n == 127:
            start = 10
        if not self._fill(start, deadline):
            return None
        if start > 2:
            n = int.from_bytes(self.buf[2:start], "big")
        if not self._fill(start + n, deadline):
            return None
        opcode, payload = self.buf[0] & 0x0F, bytes(self.buf[start : start + n])
        del self.buf[: start + n]
        return opcode, payload

    def until_close(self, timeout: float = 5) -> tuple[list[tuple[int, bytes]], int | None]:
        """Every frame up to the server's close frame, and that frame's code (None: the
        stream ended, or went quiet for ``timeout``, without one)."""
        frames: list[tuple[int, bytes]] = []
        try:
            while (got := self.next(timeout)) is not None:
                opcode, payload = got
                if opcode == OP_CLOSE:
                    return frames, struct.unpack("!H", payload[:2])[0] if payload else 1005
                frames.append(got)
        except TimeoutError:
            pass
        return frames, None

    def closed_by_peer(self, timeout: float = 1) -> bool:
        """True once the server has closed TCP (EOF or reset) within ``timeout``."""
        deadline = time.monotonic() + unit(timeout)
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
        return False


def open_ws(port: int, path: str, protocol: str | None = None, rcvbuf: int | None = None) -> Reader:
    """A WebSocket opened over a raw socket (101 checked), ready to read frames."""
    sock = connect(port, rcvbuf=rcvbuf)
    sock.sendall(upgrade_request(path, protocol=protocol))
    status, head, rest = read_response(sock)
    assert status == 101, head
    return Reader(sock, rest)
