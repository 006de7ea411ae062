"""The denial-of-service attacks of ``python -m loadtest attacks`` (issue 9, items 4-9).

Each function sends real traffic over loopback to the spawned server, is bounded in time
and bytes, and returns what the attacker observed: ``outcome`` (one line), ``passed``
(whether the server did what the hardened contract asks) and details. The runner wraps
each call in a :class:`~loadtest.attack_kit.Meter`, which measures what it cost the server.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import orjson

from . import wire
from .attack_kit import Ws, read_head, uid
from .attack_server import Ctx, script_calls

MB = 2**20


def _send_until_answered(
    sock: socket.socket, chunks: Iterable[bytes | memoryview], budget: float
) -> tuple[int, str]:
    """Send chunk after chunk until done, the server answers or hangs up, or ``budget``
    seconds pass: (bytes sent, why it stopped)."""
    sent, deadline = 0, time.monotonic() + budget
    sock.settimeout(budget)
    for chunk in chunks:
        if select.select([sock], [], [], 0)[0]:
            return sent, "server answered or closed"
        if time.monotonic() > deadline:
            return sent, f"stopped after {budget:.0f} s"
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return sent, "server hung up"
        except TimeoutError:
            return sent, "server stopped reading"
        sent += len(chunk)
    return sent, "all sent"


def _answer(sock: socket.socket, timeout: float) -> tuple[int, float]:
    """(HTTP status, seconds) of the server's answer; status 0 when it closed without one."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    try:
        status = read_head(sock)[0]
    except TimeoutError:
        status = -1
    return status, time.monotonic() - t0


def _status(status: int) -> str:
    return {0: "closed without an answer", -1: "no answer"}.get(status, f"HTTP {status}")


# -- 4: oversized handshakes -----------------------------------------------------------------


def big_handshake(ctx: Ctx) -> dict[str, Any]:
    """An 8 MB upgrade request (a query of 2M parameters) with no token."""
    t = ctx.target
    head = (b"GET /ws/room?" + b"a=1&" * (2 * MB) + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: " + wire.new_key() + b"\r\n\r\n")  # fmt: skip
    view = memoryview(head)
    with socket.create_connection((t.host, t.port), timeout=20) as sock:
        t0 = time.monotonic()
        sent, why = _send_until_answered(
            sock, (view[i : i + 65536] for i in range(0, len(head), 65536)), 20
        )
        status, _ = _answer(sock, 20)
    total = time.monotonic() - t0
    return {
        "outcome": f"{_status(status)} {total:.2f} s after the first byte; "
        f"{sent / MB:.1f} of {len(head) / MB:.1f} MB sent ({why})",
        "passed": status in (414, 431),
        "status": status, "bytes_sent": sent, "request_bytes": len(head),
        "answer_s": round(total, 3),
    }  # fmt: skip


def long_request_line(ctx: Ctx) -> dict[str, Any]:
    """A request line that never ends: up to 200 MB of path, for at most 15 s."""
    t = ctx.target
    chunk = b"a" * 262144
    chunks = (b"GET /" if i == 0 else chunk for i in range(200 * 4 + 1))
    with socket.create_connection((t.host, t.port), timeout=20) as sock:
        t0 = time.monotonic()
        sent, why = _send_until_answered(sock, chunks, 15)
        send_s = time.monotonic() - t0
        status, _ = _answer(sock, 2)
    return {
        "outcome": f"{sent / MB:.1f} MB of request line sent in {send_s:.1f} s ({why}); "
        f"{_status(status)}",
        "passed": status in (400, 414, 431),
        "status": status, "bytes_sent": sent,
    }  # fmt: skip


# -- 5: idle handshakes, one token with many sockets -------------------------------------------


def slowloris(ctx: Ctx, n: int = 40, wait: float = 20.0) -> dict[str, Any]:
    """``n`` half-sent handshakes and ``n`` silent connections; how long do they stay?"""
    t = ctx.target
    socks: list[socket.socket] = []
    half = f"GET /ws/room?token=x HTTP/1.1\r\nHost: {t.host}\r\nUpgrade: websocket\r\n".encode()
    for i in range(2 * n):
        s = socket.create_connection((t.host, t.port), timeout=5)
        if i < n:
            s.sendall(half)
        socks.append(s)
    t0 = time.monotonic()
    closed: dict[int, tuple[float, bytes]] = {}
    while len(closed) < len(socks) and time.monotonic() - t0 < wait:
        open_ = [s for s in socks if s.fileno() not in closed]
        for s in select.select(open_, [], [], 0.25)[0]:
            try:
                first = s.recv(64)
            except OSError:
                first = b""
            closed[s.fileno()] = (time.monotonic() - t0, first)
    waited = time.monotonic() - t0
    answers = Counter(
        (first.split(b"\r\n")[0].decode(errors="replace") or "closed")
        for _, first in closed.values()
    )
    for s in socks:
        s.close()
    still = len(socks) - len(closed)
    latest = max((c[0] for c in closed.values()), default=0.0)
    outcome = (f"{still} of {len(socks)} still open after {waited:.0f} s" if still
               else f"all {len(socks)} closed by the server, the last after {latest:.1f} s")  # fmt: skip
    return {"outcome": outcome + (f"; answers: {dict(answers)}" if answers else ""),
            "passed": still == 0, "still_open": still, "closed_after_s_max": round(latest, 2),
            "answers": dict(answers)}  # fmt: skip


def one_token_sockets(ctx: Ctx, n: int = 60) -> dict[str, Any]:
    """``n`` sockets into one room with the same viewer token."""
    t = ctx.target
    _, _, room = t.live_room()
    tok = t.token(uid("hoarder"))
    held: list[Ws] = []
    refused: Counter[str] = Counter()
    for _ in range(n):
        ws = t.ws(room, tok, timeout=5)
        held.append(ws)
        if not ws.open_ok:
            body = ws.body_json() or {}
            refused[f"HTTP {ws.status} {body.get('error', {}).get('code', '')}".strip()] += 1
        elif ws.until(lambda ev: ev.get("type") == "welcome", 5) is None:
            refused[f"close {ws.close_code} {ws.close_reason}".strip()] += 1
    joined = n - sum(refused.values())
    viewers = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and viewers < joined:
        viewers = max(viewers, int(t.get(f"/api/streams/{room}").json().get("viewers", 0)))
        time.sleep(0.25)
    for ws in held:
        ws.close()
    return {"outcome": f"{joined} of {n} joined with one token; refused: {dict(refused) or 'none'}; "
                       f"room showed viewers: {viewers}",
            "passed": joined <= 16 and all(("429" in k or "1008" in k) for k in refused),
            "joined": joined, "refused": dict(refused), "viewers": viewers}  # fmt: skip


# -- 6: oversized bodies ----------------------------------------------------------------------


def _post_head(ctx: Ctx, length: str) -> bytes:
    tok = ctx.target.token(uid("poster"))
    return (f"POST /api/wallet/recharge HTTP/1.1\r\nHost: {ctx.target.host}\r\n"
            f"Authorization: Bearer {tok}\r\nContent-Type: application/json\r\n{length}\r\n").encode()  # fmt: skip


def _big_post(ctx: Ctx, chunked: bool, size: int = 300 * MB) -> dict[str, Any]:
    t = ctx.target
    block = b" " * MB
    body = (b"%x\r\n" % MB + block + b"\r\n") if chunked else block
    head = _post_head(
        ctx, "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {size}\r\n"
    )
    with socket.create_connection((t.host, t.port), timeout=20) as sock:
        sock.sendall(head)
        t0 = time.monotonic()
        sent, why = _send_until_answered(sock, (body for _ in range(size // MB)), 25)
        if chunked and why == "all sent":
            with contextlib.suppress(OSError):
                sock.sendall(b"0\r\n\r\n")
        status, _ = _answer(sock, 15)
    took = time.monotonic() - t0
    return {"outcome": f"{_status(status)} after {sent / MB:.0f} MB of {size // MB} MB sent "
                       f"in {took:.1f} s ({why})",
            "passed": status == 413, "status": status, "bytes_sent": sent}  # fmt: skip


def big_post(ctx: Ctx) -> dict[str, Any]:
    """A 300 MB POST body with its Content-Length."""
    return _big_post(ctx, chunked=False)


def big_post_chunked(ctx: Ctx) -> dict[str, Any]:
    """A 300 MB POST body in chunked encoding (no Content-Length to refuse up front)."""
    return _big_post(ctx, chunked=True)


# -- 7, 8: resume floods ----------------------------------------------------------------------


def full_room(ctx: Ctx, events: int = 20000, budget: float = 40.0) -> None:
    """Setup (not measured): a live room whose history holds ``events`` shout-outs of 200
    characters, sent over 4 of the creator's sockets. Cached for every resume attack."""
    if "full_room" in ctx.cache:
        return
    t = ctx.target
    _, ctok, room = t.live_room()
    socks = [t.join(room, ctok) for _ in range(4)]
    text, sent, acks, errors = "x" * 200, 0, 0, Counter[str]()
    t0 = time.monotonic()
    while acks < events and time.monotonic() - t0 < budget:
        for i, ws in enumerate(socks):
            batch = b"".join(wire.client_frame(orjson.dumps(
                {"op": "shoutout", "req": f"f{i}-{sent + k}", "to": "fan", "text": text}))
                for k in range(250))  # fmt: skip
            ws.sock.sendall(batch)
            sent += 250
        for ws in socks:
            got = 0
            while got < 250 and not ws.eof:
                for ev in ws.read(10):
                    if ev.get("type") == "ack":
                        got += 1
                        acks += ev.get("ok") is True
                        if not ev.get("ok"):
                            errors[ev.get("error", {}).get("code", "?")] += 1
            ws.events.clear()
    for ws in socks:
        ws.close()
    seq = int(t.get(f"/api/streams/{room}").json().get("seq", acks))
    ctx.cache["full_room"] = {"room": room, "events": seq, "fill_s": round(time.monotonic() - t0, 1),
                              "fill_errors": dict(errors)}  # fmt: skip


def resume_flood(ctx: Ctx) -> dict[str, Any]:
    """One ``?since=0`` join on the full room, read to the end (or 64 MB, or 15 s). The
    replay is as long as the room's history (the contract asks for it); what matters is
    that a reader gets it all at its own pace, without being cut, for a bounded cost."""
    t, room = ctx.target, ctx.cache["full_room"]
    tok = t.token(uid("resumer"))
    path = f"/ws/{room['room']}?token={tok}&since=0"
    hs = len(wire.handshake_request(t.host, t.port, path, wire.new_key(), "livegift.json"))
    ws = Ws.open(t.host, t.port, path)
    replayed, resumed, deadline = 0, None, time.monotonic() + 15
    while not ws.eof and ws.received < 64 * MB and time.monotonic() < deadline:
        for ev in ws.read(1.0 if resumed is None else 0.5):
            replayed += ev.get("type") == "shoutout"
            resumed = ev if ev.get("type") == "resumed" else resumed
        ws.events.clear()
        if resumed is not None and not select.select([ws.sock], [], [], 0.5)[0]:
            break
    ws.close()
    answered = ws.received
    return {"outcome": f"{answered / MB:.2f} MB ({replayed} events) answered one {hs}-byte "
                       f"handshake on a room of {room['events']} events; resumed: "
                       f"{'complete' if resumed and resumed.get('complete') else 'incomplete' if resumed else 'never'}"
                       + (f", close {ws.close_code}" if ws.close_code else ""),
            "passed": resumed is not None and ws.close_code is None, "bytes_answered": answered,
            "handshake_bytes": hs, "replayed": replayed, "room": room}  # fmt: skip


def stalled_resumers(ctx: Ctx, n: int = 8, hold: float = 10.0) -> dict[str, Any]:
    """``n`` msgpack ``?since=0`` joins on the full room that never read (4 KiB receive
    buffers), held ``hold`` seconds. Whether the server cut them is read afterwards, by
    :func:`stalled_verdict`, outside the measured window."""
    t, room = ctx.target, ctx.cache["full_room"]
    socks = [Ws.open(t.host, t.port, f"/ws/{room['room']}?token={t.token(uid('staller'))}&since=0",
                     proto="livegift.msgpack", rcvbuf=4096) for _ in range(n)]  # fmt: skip
    time.sleep(hold)
    return {"_socks": socks, "hold_s": hold, "room": room}


def stalled_verdict(ctx: Ctx, res: dict[str, Any], budget: float = 5.0) -> None:
    """Read what each stalled resumer was sent (at most ``budget`` s, 32 MB each): a close
    frame or EOF at the end means the server had cut it; data that keeps coming means
    it was still holding the replay for it. Runs after the measurement, so it can judge
    the peak RSS growth too."""
    socks: list[Ws] = res.pop("_socks")
    open_ = {ws.sock: ws for ws in socks if ws.open_ok}
    deadline = time.monotonic() + budget
    while open_ and time.monotonic() < deadline:
        for sock in select.select(list(open_), [], [], 0.1)[0]:
            ws = open_[sock]
            ws.read(0.01)
            ws.events.clear()
            if ws.eof or ws.close_code is not None or ws.received > 32 * MB:
                del open_[sock]
    codes = Counter(str(ws.close_code or ("EOF" if ws.eof else "none")) for ws in socks)
    cut = sum(ws.close_code is not None or ws.eof for ws in socks)
    for ws in socks:  # a reset, so the server frees what it holds at once
        with contextlib.suppress(OSError):
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ws.close()
    mb = max((ws.received for ws in socks), default=0) / MB
    res["outcome"] = (f"{sum(ws.open_ok for ws in socks)} of {len(socks)} accepted; after "
                      f"{res['hold_s']:.0f} s unread, {cut} had been cut (closes: {dict(codes)}), "
                      f"{len(socks) - cut} still served; at most {mb:.1f} MB was on its way to one")  # fmt: skip
    # Pass: every one cut, and the server's memory grew by at most 2 MB per resumer (twice
    # the default send bound, LIVEGIFT_SEND_BUFFER): it never held a whole replay for one.
    bounded = res.get("peak_rss_growth_mb", 0) <= 2 * len(socks)
    res.update(passed=cut == len(socks) and bounded, cut=cut, max_mb_sent=round(mb, 2))


# -- 9: failed gifts and the rate limit ---------------------------------------------------------


def failed_gifts(ctx: Ctx, n: int = 300) -> dict[str, Any]:
    """``n`` gift ops in one burst from an adult with no coins."""
    t = ctx.target
    _, _, room = t.live_room()
    user = uid("broke")
    ws = t.join(room, t.token(user))
    store = ctx.store()
    before = script_calls(store) if store is not None else None
    ops = b"".join(wire.client_frame(orjson.dumps({"op": "gift", "req": f"g{i}", "gift": "rose"}))
                   for i in range(n))  # fmt: skip
    t0 = time.monotonic()
    ws.sock.sendall(ops)
    acks: Counter[str] = Counter()
    deadline = t0 + 15
    while sum(acks.values()) < n and not ws.eof and time.monotonic() < deadline:
        for ev in ws.read(deadline - time.monotonic()):
            if ev.get("type") == "ack":
                acks["ok" if ev.get("ok") else ev.get("error", {}).get("code", "?")] += 1
    took = time.monotonic() - t0
    ws.close()
    ran = script_calls(store) - before if store is not None and before is not None else None
    return {"outcome": f"{sum(acks.values())} of {n} acked in {took:.2f} s: {dict(acks)}; "
                       f"scripts run meanwhile: {'unknown (store closed to us)' if ran is None else ran}"
                       + (f"; closed {ws.close_code}" if ws.close_code else ""),
            "passed": ran is not None and ran <= 40 and sum(acks.values()) == n, "acks": dict(acks), "scripts_run": ran,
            "acked_in_s": round(took, 3)}  # fmt: skip
