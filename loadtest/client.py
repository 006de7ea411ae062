"""A minimal asyncio WebSocket client tuned to hold thousands of viewers.

One ``Conn`` is one socket. Viewers take the hot path: frames are walked by
header only, ``seq`` fields are counted with one regex call per chunk
(``wire.scan_json``) and one record ``(room, first seq, last seq, arrival ns)``
is appended per chunk. A chunk whose seqs are not exactly the next expected
run is decoded fully, so gaps, duplicates and reordering are still counted
exactly. Gifters and publishers decode what they need (acks).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from array import array
from time import perf_counter_ns
from typing import Any, cast

import msgpack
import orjson

from . import wire
from .targets import JOIN_SOCKETIO, JOIN_UPGRADE, Target, peer_event

ROLE_VIEWER = 0
ROLE_GIFTER = 1  # livegift: sends gift ops, reads acks
ROLE_PUBLISHER = 2  # peers: sends ready-made events

ST_HANDSHAKE = 0
ST_JOINING = 1
ST_JOINED = 2
ST_CLOSED = 3

DURABLE = frozenset(("gift", "shoutout", "stream_ended"))


class Stats:
    """Everything the connections of one run record; analysed after the run."""

    def __init__(self, rooms: int, record_cap: int = 60_000_000) -> None:
        # Per chunk of deliveries: room index, first seq, last seq, arrival ns.
        self.rec = array("q")
        self.rec_cap = record_cap * 4
        self.rec_dropped = 0
        self.delivered = 0
        self.duplicates = 0
        # Per ok ack: send ns, ack ns.
        self.acks = array("q")
        self.ack_ok = 0
        self.ack_err = 0
        self.sent = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.closes: collections.Counter[str] = collections.Counter()
        # Per room: seq -> send ns (from acks on livegift, at publish on peers).
        self.seq_sent: list[dict[int, int]] = [{} for _ in range(rooms)]
        self.last_seq: list[int] = [0] * rooms

    def record(self, room: int, first: int, last: int, t: int) -> None:
        rec = self.rec
        if len(rec) < self.rec_cap:
            rec.extend((room, first, last, t))
        else:
            self.rec_dropped += last - first + 1


class Conn(asyncio.Protocol):
    def __init__(
        self,
        stats: Stats,
        target: Target,
        role: int,
        room_idx: int,
        path: str,
        name: str = "",
    ) -> None:
        self.stats = stats
        self.target = target
        self.role = role
        self.room = room_idx
        self.path = path
        self.name = name
        self.binary = target.codec == "msgpack"
        self.verify: wire.Verifier = wire.verify_msgpack if self.binary else wire.verify_json
        self.token = wire.MSGPACK_TOKEN if self.binary else wire.JSON_TOKEN
        self.fast = False  # a joined viewer: the hot path applies
        self.chunks = 0
        self.loads: wire.Loader = wire.loads_msgpack if self.binary else wire.loads_json
        self.ack_marker = b"\xa3ack" if self.binary else b'"ack"'
        self.state = ST_HANDSHAKE
        self.transport: asyncio.Transport | None = None
        self.key = wire.new_key()
        self.buf = b""
        self.frag = bytearray()
        self.frag_op = 0
        self.next = 0  # next expected seq once joined
        self.start_seq = 0  # the welcome seq: events after it are expected
        self.received = 0
        self.gaps = 0
        self.close_code: int | None = None
        self.loop = asyncio.get_running_loop()
        self.joined: asyncio.Future[None] = self.loop.create_future()
        # A join that failed after its opener gave up is counted, not logged as unretrieved.
        self.joined.add_done_callback(lambda f: f.cancelled() or f.exception())
        # Gifter / publisher state.
        self.pending: dict[str, int] = {}
        self.req_n = 0
        self.pub_seq = 0

    # ---- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = self.transport = cast(asyncio.Transport, transport)
        sock = tr.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = self.target
        tr.write(wire.handshake_request(t.host, t.port, self.path, self.key, t.subprotocol))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fast = False
        if self.state != ST_CLOSED:
            self.stats.closes["eof" if self.close_code is None else str(self.close_code)] += 1
        self.state = ST_CLOSED
        if not self.joined.done():
            self.joined.set_exception(ConnectionError(f"closed before join ({self.close_code})"))
        self.transport = None

    def data_received(self, data: bytes) -> None:
        # The hot path, inlined: a joined viewer's chunk that is exactly one final data
        # frame (what a server that writes one frame per flush produces).
        if self.fast and not self.buf:
            n = len(data)
            if n > 4:
                ln = data[1]
                ln = ((data[2] << 8) | data[3]) + 4 if ln == 126 else ln + 2
                if ln == n and 0x81 <= data[0] <= 0x82:
                    t = perf_counter_ns()
                    count = data.count(self.token)
                    if not count:
                        return
                    self.chunks += 1
                    if self.chunks & 63:
                        # Counted, not decoded: the seqs are taken to be the next ones.
                        # Every 64th chunk is decoded (below) and puts the position
                        # right, so a gap or a duplicate shows up there at the latest.
                        nxt = self.next
                        self.next = nxt + count
                        self.received += count
                        stats = self.stats
                        stats.delivered += count
                        if len(stats.rec) < stats.rec_cap:
                            stats.rec.extend((self.room, nxt, nxt + count - 1, t))
                        else:
                            stats.rec_dropped += count
                        return
                    self._slow(data, n, t)
                    return
        if self.state >= ST_JOINING:
            self._frames(data)
        elif self.state == ST_HANDSHAKE:
            self._handshake(data)

    # ---- handshake ----------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        data = self.buf + data
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            if len(data) > 65536:
                self._fail("bad_handshake")
            else:
                self.buf = data
            return
        self.buf = b""
        status, headers = wire.parse_response_head(data[:head_end])
        if status != 101:
            self._fail(f"http_{status}")
            return
        if headers.get("sec-websocket-accept", "").encode() != wire.accept_for(self.key):
            self._fail("bad_accept")
            return
        self.state = ST_JOINING
        if self.target.join_mode == JOIN_UPGRADE:
            self._set_joined(0)
        rest = data[head_end + 4 :]
        if rest:
            self._frames(rest)

    def _fail(self, code: str) -> None:
        self.stats.errors[f"connect:{code}"] += 1
        self.state = ST_CLOSED
        if not self.joined.done():
            self.joined.set_exception(ConnectionError(code))
        if self.transport is not None:
            self.transport.abort()

    def _set_joined(self, seq: int) -> None:
        self.start_seq = seq
        self.next = seq + 1
        self.state = ST_JOINED
        self.fast = self.role == ROLE_VIEWER
        if not self.joined.done():
            self.joined.set_result(None)

    # ---- frames ---------------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        t = perf_counter_ns()
        if self.buf:
            data = self.buf + data
            self.buf = b""
        n = len(data)
        pos = 0
        special = False
        while n - pos >= 2:
            ln = data[pos + 1] & 0x7F
            if ln < 126:
                hl = 2
            elif ln == 126:
                if n - pos < 4:
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                hl = 4
            else:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                hl = 10
            end = pos + hl + ln
            if end > n:
                break
            b0 = data[pos]
            if (b0 != 0x81 and b0 != 0x82) or ln < 3:
                special = True
            pos = end
        if pos < n:
            self.buf = data[pos:]
        if not pos:
            return
        if special or not self.fast:
            self._slow(data, pos, t)
        else:
            self._deliver(data, pos, t)

    def _deliver(self, data: bytes, end: int, t: int) -> None:
        """Complete data frames for a joined viewer: count, check, record."""
        nxt = self.next
        count = self.verify(data, end, nxt)
        if count <= 0:
            if count < 0:
                self._slow(data, end, t)
            return
        self.chunks += 1
        if not self.chunks & 63:
            # Every 64th chunk is decoded in full, to check the cheap test above.
            self._slow(data, end, t)
            return
        last = nxt + count - 1
        self.next = last + 1
        self.received += count
        stats = self.stats
        stats.delivered += count
        rec = stats.rec
        if len(rec) < stats.rec_cap:
            rec.extend((self.room, nxt, last, t))
        else:
            stats.rec_dropped += count

    def _slow(self, data: bytes, end: int, t: int) -> None:
        """Walk every frame of ``data[:end]`` and decode what needs decoding."""
        frames, _ = wire.split_frames(data[:end])
        for b0, payload in frames:
            if self.state == ST_CLOSED:
                return
            op = b0 & 0x0F
            fin = b0 & 0x80
            if op == wire.OP_PING:
                self._send(payload, wire.OP_PONG)
            elif op == wire.OP_CLOSE:
                self._on_close(payload)
            elif op == wire.OP_PONG:
                pass
            elif op == wire.OP_CONT:
                self.frag += payload
                if fin:
                    whole = bytes(self.frag)
                    self.frag.clear()
                    self._message(whole, t)
            elif not fin:
                self.frag_op = op
                self.frag[:] = payload
            else:
                self._message(payload, t)

    def _on_close(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        self.close_code = code
        self.stats.closes[str(code)] += 1
        self.state = ST_CLOSED
        self.fast = False
        if not self.joined.done():
            self.joined.set_exception(ConnectionError(f"close {code}"))
        if self.transport is not None:
            self.transport.write(wire.client_frame(wire.close_payload(1000), wire.OP_CLOSE))
            self.transport.close()

    def _message(self, payload: bytes, t: int) -> None:
        if self.target.join_mode == JOIN_SOCKETIO:
            self._socketio_message(payload, t)
            return
        if self.role != ROLE_VIEWER and self.state == ST_JOINED:
            # Gifters and publishers only care about their acks.
            if self.role == ROLE_GIFTER and self.ack_marker in payload:
                for ev in wire.events_of(self.loads(payload)):
                    if ev.get("type") == "ack":
                        self._on_ack(ev, t)
            return
        try:
            obj = self.loads(payload)
        except Exception:
            self.stats.errors["client:undecodable_frame"] += 1
            return
        for ev in wire.events_of(obj):
            self._event(ev, t)

    def _socketio_message(self, payload: bytes, t: int) -> None:
        if payload == b"2":  # engine.io ping
            self._send(b"3")
        elif payload[:1] == b"0":  # engine.io open: connect the default namespace
            self._send(b"40")
        elif payload[:2] == b"40":
            if self.state == ST_JOINING:
                self._set_joined(0)
        elif payload[:2] == b"42" and self.role == ROLE_VIEWER and self.state == ST_JOINED:
            try:
                arr = orjson.loads(payload[2:])
            except orjson.JSONDecodeError:
                self.stats.errors["client:undecodable_frame"] += 1
                return
            if isinstance(arr, list) and len(arr) > 1 and isinstance(arr[1], dict):
                self._event(arr[1], t)
        elif payload[:2] == b"41" or payload[:2] == b"44":
            self.stats.errors[f"socketio:{payload[:2].decode()}"] += 1

    def _event(self, ev: dict[str, Any], t: int) -> None:
        typ = ev.get("type")
        if typ == "welcome" and self.state == ST_JOINING:
            seq = ev.get("seq", 0)
            self._set_joined(seq if isinstance(seq, int) else 0)
            return
        if typ == "ack":
            if self.role == ROLE_GIFTER:
                self._on_ack(ev, t)
            return
        seq = ev.get("seq")
        if self.state != ST_JOINED or self.role != ROLE_VIEWER or not isinstance(seq, int):
            return
        if typ is not None and typ not in DURABLE:
            return
        self._seq(seq, t)

    def _seq(self, seq: int, t: int) -> None:
        nxt = self.next
        stats = self.stats
        if seq == nxt:
            self.next = seq + 1
        elif seq > nxt:
            self.gaps += seq - nxt
            self.next = seq + 1
        elif seq <= self.start_seq:
            return  # history before the join: not part of this run's expectation
        else:
            # A duplicate, or a late arrival after a gap: either breaks the contract.
            stats.duplicates += 1
            return
        self.received += 1
        stats.delivered += 1
        stats.record(self.room, seq, seq, t)

    # ---- sending ----------------------------------------------------------------

    def _send(self, payload: bytes, opcode: int = wire.OP_TEXT) -> None:
        tr = self.transport
        if tr is not None and self.state != ST_CLOSED:
            tr.write(wire.client_frame(payload, opcode))

    def send_gift(self, gift: str) -> None:
        """livegift: one gift op; the ack maps its seq to this send time."""
        if self.state != ST_JOINED or self.transport is None:
            self.stats.errors["client:gifter_closed"] += 1
            return
        self.req_n += 1
        req = f"{self.name}.{self.req_n}"
        op = {"op": "gift", "req": req, "gift": gift, "count": 1}
        if self.binary:
            payload = msgpack.packb(op)
            opcode = wire.OP_BINARY
        else:
            payload = orjson.dumps(op)
            opcode = wire.OP_TEXT
        self.stats.sent += 1
        self.pending[req] = perf_counter_ns()
        self.transport.write(wire.client_frame(payload, opcode))

    def _on_ack(self, ev: dict[str, Any], t: int) -> None:
        req = ev.get("req")
        sent = self.pending.pop(req, None) if isinstance(req, str) else None
        stats = self.stats
        if sent is None:
            stats.errors["client:unmatched_ack"] += 1
            return
        if ev.get("ok"):
            stats.ack_ok += 1
            stats.acks.extend((sent, t))
            seq = ev.get("seq")
            if isinstance(seq, int):
                stats.seq_sent[self.room][seq] = sent
                if seq > stats.last_seq[self.room]:
                    stats.last_seq[self.room] = seq
        else:
            stats.ack_err += 1
            err = ev.get("error")
            code = err.get("code") if isinstance(err, dict) else None
            stats.errors[str(code or "unknown")] += 1

    def publish(self, publisher: int, event: bytes | None = None) -> None:
        """Peers: publish the next ready-made event of this room."""
        if self.state != ST_JOINED or self.transport is None:
            self.stats.errors["client:publisher_closed"] += 1
            return
        self.pub_seq += 1
        seq = self.pub_seq
        now = perf_counter_ns()
        body = event if event is not None else peer_event(seq, now // 1_000_000, publisher)
        if self.target.join_mode == JOIN_SOCKETIO:
            body = b'42["pub",' + body + b"]"
        stats = self.stats
        stats.sent += 1
        stats.seq_sent[self.room][seq] = now
        stats.last_seq[self.room] = seq
        self.transport.write(wire.client_frame(body, wire.OP_TEXT))

    def close(self) -> None:
        tr = self.transport
        if tr is None or self.state == ST_CLOSED:
            return
        self.state = ST_CLOSED
        self.fast = False
        try:
            if self.target.join_mode == JOIN_SOCKETIO:
                tr.write(wire.client_frame(b"41"))
            tr.write(wire.client_frame(wire.close_payload(1000), wire.OP_CLOSE))
        finally:
            tr.close()


async def open_conn(
    stats: Stats,
    target: Target,
    role: int,
    room_idx: int,
    path: str,
    name: str = "",
    timeout: float = 10.0,
) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(
            lambda: Conn(stats, target, role, room_idx, path, name), target.host, target.port
        ),
        timeout,
    )
    try:
        await asyncio.wait_for(asyncio.shield(conn.joined), timeout)
    except BaseException:
        if conn.transport is not None:
            conn.transport.abort()
        raise
    return conn
