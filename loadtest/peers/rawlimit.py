"""The "raw limit" peer: what Python can do when nothing gets in the way.

One Redis subscription for the process, each event framed once, the same
bytes written to every member's transport, no coroutine per member. When
several events arrive in one read from Redis they go out in one write. A
member whose unsent data passes a bound is dropped, so it cannot slow the
room down. Plain asyncio Protocols (on uvloop when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import urllib.parse
from typing import cast

from loadtest import wire

SLOW_LIMIT = 4 * 1024 * 1024


def resp_command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def parse_resp(buf: bytes, pos: int) -> tuple[object, int] | None:
    """Parse one RESP2 value at ``pos``; None when incomplete."""
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return None
    kind = buf[pos : pos + 1]
    line = buf[pos + 1 : eol]
    pos = eol + 2
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            return None
        return buf[pos : pos + n], pos + n + 2
    if kind == b"*":
        items: list[object] = []
        for _ in range(int(line)):
            r = parse_resp(buf, pos)
            if r is None:
                return None
            item, pos = r
            items.append(item)
        return items, pos
    if kind == b":":
        return int(line), pos
    return line, pos  # simple string or error


class Hub:
    def __init__(self) -> None:
        self.rooms: dict[bytes, set[asyncio.Transport]] = {}
        self.sub: Subscriber | None = None
        self.pub: asyncio.Transport | None = None
        self.subscribed: set[bytes] = set()
        self.dropped = 0

    def join(self, room: bytes, tr: asyncio.Transport) -> None:
        self.rooms.setdefault(room, set()).add(tr)
        if room not in self.subscribed and self.sub is not None and self.sub.transport:
            self.subscribed.add(room)
            self.sub.transport.write(resp_command(b"SUBSCRIBE", b"room:" + room))

    def leave(self, room: bytes, tr: asyncio.Transport) -> None:
        members = self.rooms.get(room)
        if members is not None:
            members.discard(tr)

    def publish(self, room: bytes, payload: bytes) -> None:
        if self.pub is not None:
            self.pub.write(resp_command(b"PUBLISH", b"room:" + room, payload))

    def fan_out(self, room: bytes, payloads: list[bytes]) -> None:
        members = self.rooms.get(room)
        if not members:
            return
        # Encoded once: the same bytes object goes to every transport.
        frames = b"".join([wire.server_frame(p) for p in payloads])
        slow = None
        for tr in members:
            if tr.get_write_buffer_size() > SLOW_LIMIT:
                if slow is None:
                    slow = []
                slow.append(tr)
            else:
                tr.write(frames)
        if slow:
            for tr in slow:
                members.discard(tr)
                self.dropped += 1
                tr.write(wire.server_frame(wire.close_payload(4008), wire.OP_CLOSE))
                tr.abort()


class Subscriber(asyncio.Protocol):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        batches: dict[bytes, list[bytes]] = {}
        while pos < len(buf):
            r = parse_resp(buf, pos)
            if r is None:
                break
            msg, pos = r
            if isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message":
                chan = msg[1]
                assert isinstance(chan, bytes) and isinstance(msg[2], bytes)
                batches.setdefault(chan[5:], []).append(msg[2])
        self.buf = buf[pos:]
        for room, payloads in batches.items():
            self.hub.fan_out(room, payloads)


class Discard(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


class WsServer(asyncio.Protocol):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.buf = b""
        self.room: bytes | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.room is not None and self.transport is not None:
            self.hub.leave(self.room, self.transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.room is None:
            self._handshake()
        else:
            self._frames()

    def _handshake(self) -> None:
        tr = self.transport
        assert tr is not None
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 16384:
                tr.close()
            return
        head, self.buf = self.buf[:end], self.buf[end + 4 :]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        path = parts[1] if len(parts) > 1 else b"/"
        path = path.split(b"?", 1)[0]
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        if path == b"/healthz":
            tr.write(
                b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{"status":"ok"}'
            )
            tr.close()
            return
        key = headers.get(b"sec-websocket-key")
        if not path.startswith(b"/ws/") or key is None:
            tr.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            tr.close()
            return
        room = urllib.parse.unquote_to_bytes(path[4:].strip(b"/"))
        tr.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + wire.accept_for(key) + b"\r\n\r\n"
        )
        self.room = room
        self.hub.join(room, tr)
        if self.buf:
            self._frames()

    def _frames(self) -> None:
        tr = self.transport
        assert tr is not None and self.room is not None
        buf = self.buf
        pos, n = 0, len(buf)
        while n - pos >= 6:
            b0 = buf[pos]
            ln = buf[pos + 1] & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 8:
                    break
                ln, hl = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif ln == 127:
                if n - pos < 14:
                    break
                ln, hl = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + hl + 4 + ln
            if end > n:
                break
            mask = buf[pos + hl : pos + hl + 4]
            payload = wire.unmask(buf[pos + hl + 4 : end], mask)
            op = b0 & 0x0F
            pos = end
            if op in (wire.OP_TEXT, wire.OP_BINARY):
                self.hub.publish(self.room, payload)
            elif op == wire.OP_PING:
                tr.write(wire.server_frame(payload, wire.OP_PONG))
            elif op == wire.OP_CLOSE:
                tr.write(wire.server_frame(wire.close_payload(1000), wire.OP_CLOSE))
                tr.close()
                break
        self.buf = buf[pos:]


async def serve(host: str, port: int, redis_url: str) -> None:
    u = urllib.parse.urlparse(redis_url)
    rhost, rport = u.hostname or "127.0.0.1", u.port or 6379
    loop = asyncio.get_running_loop()
    hub = Hub()
    _, sub = await loop.create_connection(lambda: Subscriber(hub), rhost, rport)
    hub.sub = sub
    pub_tr, _ = await loop.create_connection(Discard, rhost, rport)
    hub.pub = pub_tr
    server = await loop.create_server(lambda: WsServer(hub), host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.run(serve(a.host, a.port, a.redis))
    except ImportError:
        asyncio.run(serve(a.host, a.port, a.redis))


if __name__ == "__main__":
    main()
