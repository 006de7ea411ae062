"""The attacker's kit for ``python -m loadtest attacks``: raw sockets, a minimal WebSocket
client, signed tokens and receipts, and the meter that watches the server while an attack
runs (CPU seconds and peak RSS from /proc, a concurrent ``GET /healthz``).

Nothing here imports livegift: tokens and receipts are plain HS256 JWTs signed with the
secrets the harness gave the server, so the same kit drives the code of any commit.
Every address is loopback.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import msgpack
import orjson

from . import wire

CLK_TCK = os.sysconf("SC_CLK_TCK")
ADULT, MINOR = "1990-01-01", "2015-01-01"


# -- the server process, from /proc -------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss(pid: int) -> int:
    """VmRSS of one process, in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_busy() -> float:
    """CPU seconds every core has spent busy since boot (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields)
    return (user + nice + system + irq + softirq) / CLK_TCK


def healthz_ms(host: str, port: int, timeout: float = 30.0) -> float | None:
    """One ``GET /healthz`` on a fresh connection: ms to the whole answer (None: failed)."""
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return None
    return (time.monotonic() - t0) * 1000 if data.startswith(b"HTTP/1.1 200") else None


class Meter:
    """Watches the server over one attack: CPU seconds used, peak RSS growth (VmRSS sampled
    every 20 ms) and how long ``GET /healthz`` requests issued meanwhile took."""

    def __init__(self, pid: int, host: str, port: int, redis_pid: int | None = None) -> None:
        self.pid, self.host, self.port, self.redis_pid = pid, host, port, redis_pid
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.rss0 = self.rss_peak = 0
        self.cpu0 = self.cpu1 = self.redis0 = self.redis1 = self.busy0 = self.busy1 = 0.0
        self.t0 = self.t1 = 0.0
        self.probes: list[float | None] = []

    def __enter__(self) -> Meter:
        self.rss0 = self.rss_peak = proc_rss(self.pid)
        self.cpu0 = proc_cpu(self.pid)
        self.redis0 = proc_cpu(self.redis_pid) if self.redis_pid else 0.0
        self.busy0 = machine_busy()
        self.t0 = time.monotonic()
        for target in (self._sample, self._probe):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu1 = proc_cpu(self.pid)
        self.redis1 = proc_cpu(self.redis_pid) if self.redis_pid else 0.0
        self.busy1 = machine_busy()
        self.t1 = time.monotonic()
        self._stop.set()
        for t in self._threads:
            t.join(35)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.rss_peak = max(self.rss_peak, proc_rss(self.pid))
            time.sleep(0.02)

    def _probe(self) -> None:
        while not self._stop.is_set():
            self.probes.append(healthz_ms(self.host, self.port))
            self._stop.wait(0.1)

    def _busy_pct(self) -> float | None:
        """All cores, everything on the machine (this harness too): was it disturbed? Not
        over windows too short for the kernel's 10 ms ticks to say."""
        wall = self.t1 - self.t0
        if wall < 0.5:
            return None
        return round(100 * (self.busy1 - self.busy0) / (wall * (os.cpu_count() or 1)), 1)

    def result(self) -> dict[str, Any]:
        done = [p for p in self.probes if p is not None]
        return {
            "server_cpu_s": round(self.cpu1 - self.cpu0, 3),
            "peak_rss_growth_mb": round((self.rss_peak - self.rss0) / 2**20, 1),
            "rss_start_mb": round(self.rss0 / 2**20, 1),
            "redis_cpu_s": round(self.redis1 - self.redis0, 3),
            "healthz_ms_max": round(max(done), 1) if done else None,
            "healthz_ms_median": round(statistics.median(done), 1) if done else None,
            "healthz_n": len(done),
            "healthz_failed": len(self.probes) - len(done),
            "window_s": round(self.t1 - self.t0, 2),
            "machine_busy_pct": self._busy_pct(),
        }


# -- tokens and receipts -------------------------------------------------------------------


def token(secret: str, sub: str, *, birthdate: str | None = ADULT, name: str | None = None,
          ttl: int = 3600) -> str:  # fmt: skip
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl}
    if birthdate:
        claims["birthdate"] = birthdate
    if name:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm="HS256")


def receipt(payment_secret: str, sub: str, package: dict[str, Any], region: str,
            currency: str) -> str:  # fmt: skip
    """A store receipt as an app store would send it (no sandbox marker)."""
    claims = {"txn": f"attack-{secrets.token_hex(8)}", "sub": sub, "package": package["id"],
              "region": region, "amount": package["price"], "currency": currency}  # fmt: skip
    return jwt.encode(claims, payment_secret, algorithm="HS256")


def uid(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


# -- HTTP ----------------------------------------------------------------------------------


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None


def request(host: str, port: int, method: str, path: str, *, tok: str | None = None,
            body: Any = None, timeout: float = 15.0) -> Resp:  # fmt: skip
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"authorization": f"Bearer {tok}"} if tok else {}
    data = None if body is None else orjson.dumps(body)
    if data is not None:
        headers["content-type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def read_head(sock: socket.socket, limit: int = 65536) -> tuple[int, dict[str, str], bytes]:
    """Read an HTTP response head: (status, headers, bytes after the head); status 0 when
    the server closed first."""
    buf = b""
    while b"\r\n\r\n" not in buf and len(buf) < limit:
        try:
            chunk = sock.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            return 0, {}, buf
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status, headers = wire.parse_response_head(head)
    return status, headers, rest


# -- WebSocket -----------------------------------------------------------------------------


@dataclass
class Ws:
    """A raw WebSocket client socket that reads events and notices close frames and EOF."""

    sock: socket.socket
    status: int
    headers: dict[str, str]
    buf: bytes = b""
    binary: bool = False
    close_code: int | None = None
    close_reason: str = ""
    eof: bool = False
    received: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, host: str, port: int, path: str, *, proto: str | None = "livegift.json",
             key: bytes | None = None, rcvbuf: int | None = None, timeout: float = 10.0) -> Ws:  # fmt: skip
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(wire.handshake_request(host, port, path, key or wire.new_key(), proto))
        status, headers, rest = read_head(sock)
        ws = cls(sock, status, headers, binary=proto == "livegift.msgpack")
        if status == 101:
            ws.feed(rest)
        else:
            ws.buf = rest
        return ws

    @property
    def open_ok(self) -> bool:
        return self.status == 101

    def body_json(self) -> Any:
        """The JSON body of a refused handshake (what arrived of it)."""
        with contextlib.suppress(Exception):
            self.sock.settimeout(1.0)
            while len(self.buf) < 65536 and (chunk := self.sock.recv(65536)):
                self.buf += chunk
        try:
            return orjson.loads(self.buf)
        except orjson.JSONDecodeError:
            return None

    def send(self, obj: Any) -> None:
        self.sock.sendall(wire.client_frame(orjson.dumps(obj)))

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self.received += len(data)
        frames, self.buf = wire.split_frames(self.buf + data)
        out: list[dict[str, Any]] = []
        for first, payload in frames:
            op = first & 0x0F
            if op == wire.OP_PING:  # a live client answers pings, or is dropped
                with contextlib.suppress(OSError):
                    self.sock.sendall(wire.client_frame(payload, wire.OP_PONG))
            elif op == wire.OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_reason = payload[2:].decode("utf-8", "replace")
            elif op in (wire.OP_TEXT, wire.OP_BINARY):
                obj = msgpack.unpackb(payload) if op == wire.OP_BINARY else orjson.loads(payload)
                out.extend(wire.events_of(obj))
        self.events.extend(out)
        return out

    def read(self, timeout: float) -> list[dict[str, Any]]:
        """What arrives within ``timeout`` (one recv); [] on timeout or EOF."""
        if self.eof:
            return []
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(1 << 20)
        except (TimeoutError, BlockingIOError):
            return []
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return []
        return self.feed(data)

    def until(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any] | None:
        """Read until an event matches (returned), the socket closes, or time runs out."""
        for ev in self.events:
            if pred(ev):
                return ev
        deadline = time.monotonic() + timeout
        while not self.eof and (left := deadline - time.monotonic()) > 0:
            for ev in self.read(left):
                if pred(ev):
                    return ev
        return None

    def wait_eof(self, timeout: float) -> float | None:
        """Seconds until the server closes TCP (None: still open after ``timeout``)."""
        t0 = time.monotonic()
        while not self.eof and time.monotonic() - t0 < timeout:
            self.read(timeout - (time.monotonic() - t0))
        return time.monotonic() - t0 if self.eof else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def of_type(kind: str, **match: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda ev: ev.get("type") == kind and all(ev.get(k) == v for k, v in match.items())


# -- the server under attack, as a client sees it -----------------------------------------


@dataclass
class Target:
    """The spawned server: its address, the secrets it was given, and client helpers."""

    host: str
    port: int
    secret: str
    payment_secret: str
    _prices: dict[str, Any] = field(default_factory=dict)

    def get(self, path: str, tok: str | None = None, **kw: Any) -> Resp:
        return request(self.host, self.port, "GET", path, tok=tok, **kw)

    def post(self, path: str, body: Any = None, tok: str | None = None, **kw: Any) -> Resp:
        return request(self.host, self.port, "POST", path, tok=tok, body=body, **kw)

    def token(self, sub: str, **kw: Any) -> str:
        return token(self.secret, sub, **kw)

    def fund(self, sub: str, tok: str, times: int = 1) -> int:
        """Buy the biggest US package ``times`` times; returns the coins bought."""
        if not self._prices:
            self._prices = self.get("/api/coins/packages?region=US").json()
        pkg = max(self._prices["packages"], key=lambda p: p["coins"])
        for _ in range(times):
            r = self.post("/api/wallet/recharge", {"receipt": receipt(
                self.payment_secret, sub, pkg, "US", self._prices["currency"])}, tok)  # fmt: skip
            if r.status != 200:
                raise RuntimeError(f"recharge failed: {r.status} {r.body[:200]!r}")
        return int(pkg["coins"]) * times

    def coins(self, sub: str) -> int:
        return int(self.get("/api/wallet", self.token(sub)).json()["coins"])

    def live_room(self, prefix: str = "creator") -> tuple[str, str, str]:
        """A new creator and their live room: (creator id, creator token, room)."""
        creator = uid(prefix)
        tok = self.token(creator)
        r = self.post("/api/streams", {"title": "attack target"}, tok)
        if r.status not in (200, 201):
            raise RuntimeError(f"going live failed: {r.status} {r.body[:200]!r}")
        return creator, tok, str(r.json()["room"])

    def ws(self, room: str, tok: str, query: str = "", **kw: Any) -> Ws:
        return Ws.open(self.host, self.port, f"/ws/{room}?token={tok}{query}", **kw)

    def join(self, room: str, tok: str, query: str = "", **kw: Any) -> Ws:
        """A member who got its welcome (raises otherwise)."""
        ws = self.ws(room, tok, query, **kw)
        if not ws.open_ok or ws.until(of_type("welcome"), 10) is None:
            raise RuntimeError(f"join failed: HTTP {ws.status}, close {ws.close_code}")
        return ws
