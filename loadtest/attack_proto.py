"""The protocol and token attacks of ``python -m loadtest attacks`` (issue 9, items 10, 11
and 14): RFC 6455 failures, bad room ids and seqs, an expired token on an open socket.

Raw frames over loopback; each function returns ``outcome``, ``passed`` and details, like
:mod:`loadtest.attack_dos`.
"""

from __future__ import annotations

import base64
import select
import time
from typing import Any

import orjson

from . import wire
from .attack_kit import Ws, of_type, uid
from .attack_server import Ctx


def _gift(req: str) -> bytes:
    return wire.client_frame(orjson.dumps({"op": "gift", "req": req, "gift": "rose"}))


def _masked(first: int, payload: bytes) -> bytes:
    """A masked client frame with a raw first byte (FIN, RSV bits, opcode)."""
    frame = bytearray(wire.client_frame(payload))
    frame[0] = first
    return bytes(frame)


BAD_FRAMES = {
    "RSV1 set (1002)": _masked(0xC1, b"x"),
    "invalid UTF-8 (1007)": _masked(0x81, b"\xff\xfe"),
    "5000-byte frame (1009)": wire.client_frame(b"x" * 5000),
}
INVALID_CLOSE_CODES = (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)


def _member(ctx: Ctx, room: str, funded: bool = True) -> tuple[str, Ws]:
    user = uid("member")
    tok = ctx.target.token(user)
    if funded:
        ctx.target.fund(user, tok)
    return user, ctx.target.join(room, tok)


def rfc_fail_fast(ctx: Ctx, wait: float = 8.0) -> dict[str, Any]:
    """A frame that fails the connection, with a gift op right behind it in the same write:
    how soon is TCP closed, and is the gift still charged?"""
    t = ctx.target
    _, _, room = t.live_room()
    members = {name: _member(ctx, room) for name in BAD_FRAMES}
    coins = {name: t.coins(user) for name, (user, _) in members.items()}
    sent_at = {}
    for name, (_, ws) in members.items():
        ws.sock.sendall(BAD_FRAMES[name] + _gift("after-the-bad-frame"))
        sent_at[name] = time.monotonic()
    eof_at: dict[str, float] = {}
    while len(eof_at) < len(members) and time.monotonic() - min(sent_at.values()) < wait:
        open_ = [ws.sock for n, (_, ws) in members.items() if n not in eof_at]
        for sock in select.select(open_, [], [], 0.1)[0]:
            name = next(n for n, (_, ws) in members.items() if ws.sock is sock)
            ws = members[name][1]
            ws.read(0.01)
            if ws.eof:
                eof_at[name] = time.monotonic() - sent_at[name]
    time.sleep(0.3)
    rows, passed = [], True
    for name, (user, ws) in members.items():
        charged = coins[name] - t.coins(user)
        took = eof_at.get(name)
        acked = any(ev.get("type") == "ack" for ev in ws.events)
        rows.append(f"{name}: close {ws.close_code}, TCP closed "
                    + (f"after {took:.2f} s" if took is not None else f"not within {wait:.0f} s")
                    + f", op after it {'acked' if acked else 'not acked'}, charged {charged}")  # fmt: skip
        passed &= took is not None and took < 1.0 and charged == 0 and not acked
        ws.close()
    return {"outcome": "; ".join(rows), "passed": passed}


def rfc_close_codes(ctx: Ctx) -> dict[str, Any]:
    """Close frames with codes a peer may not send, and one with a non-UTF-8 reason."""
    t = ctx.target
    _, _, room = t.live_room()
    tok = t.token(uid("closer"))
    cases = [(c, wire.close_payload(c)) for c in INVALID_CLOSE_CODES]
    cases.append((-1, wire.close_payload(1000, b"\xff\xfe")))
    answers: dict[str, int | None] = {}
    for code, payload in cases:
        ws = t.join(room, tok)
        ws.sock.sendall(wire.client_frame(payload, wire.OP_CLOSE))
        ws.wait_eof(3)
        answers["bad reason" if code < 0 else str(code)] = ws.close_code
        ws.close()
    bad = {k: v for k, v in answers.items() if v != (1007 if k == "bad reason" else 1002)}
    return {"outcome": "answered " + ", ".join(f"{k}→{v}" for k, v in answers.items()),
            "passed": not bad, "answers": answers}  # fmt: skip


def rfc_bad_key(ctx: Ctx) -> dict[str, Any]:
    """Sec-WebSocket-Key values of the right length that are not base64 of 16 bytes."""
    t = ctx.target
    _, _, room = t.live_room()
    tok = t.token(uid("keyless"))
    keys = {"not base64": b"!!!!!!!!!!!!!!!!!!!!!!==", "17 bytes": b"AAAAAAAAAAAAAAAAAAAAAAA="}
    got = {}
    for name, key in keys.items():
        ws = Ws.open(t.host, t.port, f"/ws/{room}?token={tok}", key=key)
        got[name] = ws.status
        ws.close()
    return {"outcome": ", ".join(f"{k}: HTTP {v}" for k, v in got.items()),
            "passed": all(v == 400 for v in got.values()), "statuses": got}  # fmt: skip


def bad_room_id(ctx: Ctx) -> dict[str, Any]:
    """``GET /api/streams/<room>:hist``: a room id naming another key of the room."""
    t = ctx.target
    _, ctok, room = t.live_room()
    ws = t.join(room, ctok)  # a shout-out, so that the room's history exists
    ws.send({"op": "shoutout", "req": "s1", "to": "fan", "text": "hello"})
    ws.until(of_type("ack", req="s1"), 5)
    ws.close()
    r = t.get(f"/api/streams/{room}:hist")
    return {"outcome": f"HTTP {r.status} {r.body[:120].decode(errors='replace')}",
            "passed": r.status in (400, 404), "status": r.status}  # fmt: skip


def huge_since(ctx: Ctx) -> dict[str, Any]:
    """``?since=`` past 2^64 (and far past it)."""
    t = ctx.target
    _, _, room = t.live_room()
    tok = t.token(uid("since"))
    seen, passed = [], True
    for since in (2**64, 10**30):
        ws = t.ws(room, tok, f"&since={since}")
        if ws.open_ok:
            ws.until(of_type("welcome"), 3)
            ws.wait_eof(3)
            what = f"accepted, then close {ws.close_code} {ws.close_reason}".rstrip()
            passed &= ws.close_code not in (None, 1011)
        else:
            body = ws.body_json() or {}
            what = f"HTTP {ws.status} {body.get('error', {}).get('code', '')}".rstrip()
            passed &= ws.status == 400
        seen.append(f"since={since}: {what}")
        ws.close()
    return {"outcome": "; ".join(seen), "passed": passed}


def expired_token(ctx: Ctx) -> dict[str, Any]:
    """A socket opened with a token about to expire, then a gift after ``exp``."""
    t = ctx.target
    _, _, room = t.live_room()
    user = uid("expiring")
    t.fund(user, t.token(user))
    tok = t.token(user, ttl=2)
    exp = orjson.loads(base64.urlsafe_b64decode(tok.split(".")[1] + "=="))["exp"]
    ws = t.join(room, tok)
    coins = t.coins(user)
    while time.time() < exp + 1.2 and not ws.eof:
        ws.read(0.2)
    closed_first = ws.eof or ws.close_code is not None
    ack = None
    if not closed_first:
        ws.sock.sendall(_gift("after-exp"))
        ack = ws.until(of_type("ack", req="after-exp"), 5)
        ws.wait_eof(1)
    charged = coins - t.coins(user)
    ws.close()
    if closed_first:
        what = f"socket closed {ws.close_code} {ws.close_reason} at expiry, before any op"
    elif ack is not None:
        what = f"gift after exp: ack ok={ack.get('ok')} {ack.get('error', {}).get('code', '')}"
    else:
        what = f"gift after exp: no ack, close {ws.close_code} {ws.close_reason}"
    return {"outcome": f"{what.strip()}; coins charged after exp: {charged}",
            "passed": charged == 0 and not (ack and ack.get("ok")), "charged": charged}  # fmt: skip
