"""The configuration checks of ``python -m loadtest attacks`` (issue 9, items 1, 2, 3, 8b,
12, 13 and 15): things an attacker finds rather than floods. Each is a pass/fail with what
was seen; the runner still records what the check cost the server.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import procs
from .attack_kit import MINOR, Ws, of_type, request, token, uid
from .attack_server import Ctx, livegift_cmd, raw_ping, store_port

# -- 1: free coins from the development receipt endpoint -------------------------------------


def dev_receipt(ctx: Ctx) -> dict[str, Any]:
    """``POST /api/dev/receipt`` on a server started with production defaults."""
    t = ctx.target
    adult, minor = uid("freeloader"), uid("kid")
    r = t.post("/api/dev/receipt", {"package": "p6607"}, t.token(adult))
    kid = t.post("/api/dev/receipt", {"package": "p6607"}, t.token(minor, birthdate=MINOR))
    seen = f"dev receipt for an adult: HTTP {r.status}, for a minor: HTTP {kid.status}"
    if r.status == 200:
        rc = t.post("/api/wallet/recharge", {"receipt": r.json()["receipt"]}, t.token(adult))
        seen += f"; recharge with it: HTTP {rc.status}, coins now {t.coins(adult)}"
    return {"outcome": seen, "passed": r.status == 404 and kid.status == 404}


# -- 2: serving on every interface with public secrets -----------------------------------------

PROBE = """
import sys, urllib.request as u
def call(path, tok=None, data=None):
    req = u.Request("http://127.0.0.1:%s%s" % (sys.argv[1], path), data=data,
                    headers={"authorization": "Bearer " + tok} if tok else {})
    try:
        return u.urlopen(req, timeout=2).status
    except Exception as e:
        return getattr(e, "code", 0)
print(call("/healthz"), call("/api/wallet", sys.argv[2]),
      call("/api/dev/receipt", sys.argv[3], b"{}"))
"""


def _serve_everywhere(ctx: Ctx, env: dict[str, str], name: str) -> tuple[str, str]:
    """``livegift serve --host 0.0.0.0`` in a network namespace of its own (only its own
    loopback exists there, so nothing is exposed): did it refuse, or serve? Also returns
    which livegift it imported."""
    port = procs.free_port()
    data = Path(tempfile.mkdtemp(prefix="attacks-public-", dir=ctx.work_dir))
    env = {**env, "LIVEGIFT_DATA_DIR": str(data / "data")}
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
           *livegift_cmd("serve", "--host", "0.0.0.0", "--port", str(port))]  # fmt: skip
    sp = procs.Spawned(name, cmd, env=env, log_dir=ctx.work_dir, cwd=str(ctx.work_dir))
    dev_secret = public_dev_secret(ctx)
    forged = token(dev_secret, uid("forger"))
    valid = token(env.get("LIVEGIFT_SECRET", dev_secret), uid("user"))
    probe = [
        "nsenter",
        "-t",
        str(sp.pid),
        "-n",
        sys.executable,
        "-c",
        PROBE,
        str(port),
        forged,
        valid,
    ]
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if sp.proc.poll() is not None:
                return f"refused, exit {sp.proc.returncode} ({_why(sp)})", _imported(sp)
            codes = subprocess.run(probe, capture_output=True, text=True, timeout=10).stdout.split()
            if codes and codes[0] == "200":
                return f"served on 0.0.0.0 (token forged with the public development secret: " \
                       f"HTTP {codes[1]}; POST /api/dev/receipt: HTTP {codes[2]})", _imported(sp)  # fmt: skip
            time.sleep(0.3)
        return "neither refused nor served within 20 s", _imported(sp)
    finally:
        sp.stop()
        shutil.rmtree(data, ignore_errors=True)


def public_dev_secret(ctx: Ctx) -> str:
    """The development secret, as anyone can read it in the server's source."""
    with contextlib.suppress(OSError, AttributeError):
        found = re.search(r'DEV_SECRET\s*=\s*"([^"]+)"', (ctx.code / "config.py").read_text())
        return found.group(1)  # type: ignore[union-attr]
    return "livegift-dev-secret-change-me-0123456789"


def _why(sp: procs.Spawned) -> str:
    """The first reason the server printed for refusing (its first ``  - `` line)."""
    lines = [ln.strip() for ln in sp.tail(40).splitlines() if ln.strip()]
    reasons = [ln[2:] for ln in lines if ln.startswith("- ")] or lines[-1:]
    return reasons[0][:110] + ("…" if len(reasons[0]) > 110 else "") if reasons else "no message"


def _imported(sp: procs.Spawned) -> str:
    lines = [ln for ln in sp.tail(400).splitlines() if ln.startswith("attacks: livegift from")]
    return lines[0].split(" from ", 1)[1] if lines else "?"


def public_secrets(ctx: Ctx) -> dict[str, Any]:
    """Start on 0.0.0.0 without secrets, and with secrets but in development mode."""
    if not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")):
        return {"outcome": "not applicable here: needs unshare, nsenter and ip", "passed": None}
    secretless = ("LIVEGIFT_SECRET", "LIVEGIFT_PAYMENT_SECRET")
    bare = {k: v for k, v in ctx.env.items() if k not in secretless}
    no_secrets, code1 = _serve_everywhere(ctx, bare, "public-no-secrets")
    dev, code2 = _serve_everywhere(ctx, {**ctx.env, "LIVEGIFT_DEV": "1"}, "public-dev-mode")
    return {"outcome": f"no secrets: {no_secrets}; secrets but LIVEGIFT_DEV=1: {dev}",
            "passed": no_secrets.startswith("refused") and dev.startswith("refused"),
            "livegift_files": sorted({code1, code2})}  # fmt: skip


# -- 3: the embedded data store, seen by another local user -------------------------------------


def redis_open(ctx: Ctx) -> dict[str, Any]:
    """Modes of the data folder and its files; an unauthenticated PING to the store."""
    root = ctx.data_dir
    modes = {".": root.stat().st_mode & 0o777}
    for path in sorted(root.rglob("*")):
        with contextlib.suppress(OSError):
            modes[str(path.relative_to(root))] = path.stat().st_mode & 0o777
    loose = {k: oct(v) for k, v in modes.items() if v & 0o077}
    port = store_port(root)
    ping = raw_ping(port) if port else "no server.json"
    return {"outcome": f"unauthenticated PING: {ping!r}; data folder {oct(modes['.'])}; "
                       f"{len(loose)} of {len(modes)} paths open to other users"
                       + (f" ({', '.join(f'{k} {v}' for k, v in list(loose.items())[:3])}, …)" if loose else ""),
            "passed": ping.startswith("-NOAUTH") and not loose, "modes": {k: oct(v) for k, v in modes.items()}}  # fmt: skip


# -- 8b: what the store keeps -------------------------------------------------------------------


def _ended_room_keys(ctx: Ctx) -> list[tuple[str, str, int]]:
    """(key, type, TTL) of every key of a room that had a shout-out and then ended."""
    t, store = ctx.target, ctx.store()
    _, ctok, room = t.live_room()
    ws = t.join(room, ctok)
    ws.send({"op": "shoutout", "req": "s1", "to": "fan", "text": "thanks"})
    ws.until(of_type("ack", req="s1"), 5)
    ws.close()
    request(t.host, t.port, "DELETE", f"/api/streams/{room}", tok=ctok)
    time.sleep(0.2)
    return [(k.decode(), store.type(k).decode(), int(store.ttl(k)))
            for k in store.scan_iter(match=f"*{room}*", count=1000)]  # fmt: skip


def redis_growth(ctx: Ctx) -> dict[str, Any]:
    """maxmemory and its policy; two streams by one creator; the keys of an ended room."""
    t, store = ctx.target, ctx.store()
    creator = uid("hoster")
    tok = t.token(creator)
    rooms = [
        t.post("/api/streams", {"title": f"stream {i}"}, tok).json().get("room") for i in range(2)
    ]
    live = [bool(t.get(f"/api/streams/{r}").json().get("live")) for r in rooms]
    two = f"two POST /api/streams by one creator: {sum(live)} live"
    if store is None:
        return {"outcome": f"store closed to the harness; {two}", "passed": None}
    mm = int(store.config_get("maxmemory")["maxmemory"])
    policy = store.config_get("maxmemory-policy")["maxmemory-policy"]
    keys = _ended_room_keys(ctx)
    forever = [f"{k} ({typ})" for k, typ, ttl in keys if ttl == -1]
    kept = [k for k, typ, ttl in keys if ttl == -1 and typ != "hash"]
    return {"outcome": f"maxmemory {mm // 2**20} MB, policy {policy}; {two}; ended room: "
                       f"{len(keys)} keys, {len(forever)} never expire ({', '.join(forever) or 'none'})",
            "passed": mm > 0 and policy == "noeviction" and sum(live) <= 1 and not kept,
            "maxmemory": mm, "policy": policy, "ended_room_keys": keys}  # fmt: skip


# -- 12: control characters in the terminal client ----------------------------------------------

EVIL_TEXT = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x1b[0m \x9b1m"
EVIL_NAME = "\x1b[2J\x1b]0;owned\x07evil"
CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")


def watch_escapes(ctx: Ctx) -> dict[str, Any]:
    """``livegift watch`` while a shout-out and a gifter's name carry terminal escapes."""
    t = ctx.target
    _, ctok, room = t.live_room()
    base = f"http://{t.host}:{t.port}"
    proc = subprocess.Popen(livegift_cmd("watch", room, "--url", base, "--token", t.token(uid("tty"))),
                            env=ctx.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=ctx.work_dir)  # fmt: skip
    out = bytearray()
    reader = threading.Thread(target=_pump, args=(proc, out), daemon=True)
    reader.start()
    try:
        _wait_for(out, b"joined", 15)
        creator = t.join(room, ctok)
        creator.send({"op": "shoutout", "req": "evil", "to": "fan", "text": EVIL_TEXT})
        ack = creator.until(of_type("ack", req="evil"), 5) or {}
        gifter = uid("evilname")
        t.fund(gifter, t.token(gifter))
        g = t.join(room, t.token(gifter, name=EVIL_NAME))
        g.send({"op": "gift", "req": "evil-gift", "gift": "rose"})
        gack = g.until(of_type("ack", req="evil-gift"), 5) or {}
        _wait_for(out, b"sent", 5)
        creator.close()
        g.close()
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        reader.join(2)
    lines = [ln for ln in bytes(out).splitlines() if not ln.startswith(b"attacks:")]
    raw = CONTROL.findall(b"\n".join(lines))
    shown = sum(b"shout-out" in ln or b"sent" in ln for ln in lines)
    return {"outcome": f"shout-out ack ok={ack.get('ok')}, gift ack ok={gack.get('ok')}; "
                       f"{shown} of those lines printed, {len(raw)} raw control characters in them",
            "passed": shown > 0 and not raw, "output": [ln.decode(errors="replace")[:160] for ln in lines[:8]]}  # fmt: skip


def _pump(proc: subprocess.Popen[bytes], out: bytearray) -> None:
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
        out.extend(chunk)


def _wait_for(buf: bytearray, needle: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        time.sleep(0.05)


# -- 13: the pages' Content-Security-Policy ----------------------------------------------------


def csp(ctx: Ctx) -> dict[str, Any]:
    """``connect-src`` of the pages: may a page's script talk to any host?"""
    r = ctx.target.get("/watch/some-room")
    policy = r.headers.get("content-security-policy", "")
    directives = {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.split()}
    sources = directives.get("connect-src", directives.get("default-src", ["*"]))
    anywhere = [s for s in sources if s in ("*", "ws:", "wss:", "http:", "https:")]
    return {"outcome": f"connect-src {' '.join(sources) or '(none)'}"
                       + (f" ({' '.join(anywhere)}: any host)" if anywhere else ""),
            "passed": bool(policy) and not anywhere, "policy": policy}  # fmt: skip


# -- 15: the creator's token in the OBS overlay URL ---------------------------------------------


def overlay_token(ctx: Ctx) -> dict[str, Any]:
    """What the studio puts in an overlay URL (read from studio.js: a room overlay URL
    built next to the token), and whether an overlay key works instead."""
    t = ctx.target
    creator, ctok, _ = t.live_room()
    js = t.get("/static/studio.js").body.decode(errors="replace")
    builds = any("token" in js[max(0, m.start() - 800) : m.end() + 200]
                 for m in re.finditer(r"/overlay/(?!u/)", js))  # fmt: skip
    r = t.post("/api/overlay-key", None, ctok)
    seen = f"studio.js {'builds' if builds else 'does not build'} overlay URLs with ?token=; " \
           f"POST /api/overlay-key: HTTP {r.status}"  # fmt: skip
    ok = False
    if r.status == 201:
        body = r.json()
        ws = Ws.open(t.host, t.port, f"/ws/creator/{creator}?key={body['key']}")
        first = ws.until(lambda ev: ev.get("type") in ("welcome", "offline"), 5)
        ws.close()
        ok = "token=" not in body["url"] and first is not None
        seen += f" (url {'with' if 'token=' in body['url'] else 'without'} a token; its socket got " \
                f"{first.get('type') if first else 'nothing'})"  # fmt: skip
    return {"outcome": seen, "passed": ok and not builds}
