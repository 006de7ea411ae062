"""The server under attack in ``python -m loadtest attacks``: starting ``livegift serve``
with production defaults on a free loopback port (fresh data folder, its own embedded
Redis, secrets only this run knows), telling which livegift code it imported, and opening
its embedded data store the way another local user would try to.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import secrets
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import procs
from .attack_kit import Target

# -- what every attack is handed -----------------------------------------------------------

# Runs `livegift ARGS` from whichever livegift the environment's PYTHONPATH imports, and
# says which one it was (the "before" run points PYTHONPATH at a checkout of an old commit).
BOOT = (
    "import sys, livegift; print('attacks: livegift from', livegift.__file__, flush=True); "
    "from livegift.cli import main; sys.argv[0] = 'livegift'; raise SystemExit(main())"
)


def livegift_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", BOOT, *args]


@dataclass
class Ctx:
    """The spawned server under attack and what the harness knows about it."""

    target: Target
    pid: int
    redis_pid: int | None
    data_dir: Path
    env: dict[str, str]  # the server's environment (PYTHONPATH says which code it runs)
    work_dir: Path  # logs and scratch data of this run
    code: Path  # the livegift package the server imported
    cache: dict[str, Any] = field(default_factory=dict)

    def store(self) -> Any:
        """A redis client on the server's embedded store (None when it cannot be opened)."""
        if "store" not in self.cache:
            self.cache["store"] = store_client(self.data_dir, self.redis_pid)[0]
        return self.cache["store"]


# -- starting it -----------------------------------------------------------------------------


def server_env(extra: dict[str, str], data_dir: Path) -> tuple[dict[str, str], str, str]:
    """Production defaults: no LIVEGIFT_* or REDIS_URL from the caller, fresh secrets."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("LIVEGIFT_") and k != "REDIS_URL"
    }
    env.pop("PYTHONPATH", None)
    secret, payment = secrets.token_hex(24), secrets.token_hex(24)
    env.update(LIVEGIFT_SECRET=secret, LIVEGIFT_PAYMENT_SECRET=payment,
               LIVEGIFT_DATA_DIR=str(data_dir))  # fmt: skip
    env.update(extra)
    return env, env["LIVEGIFT_SECRET"], env["LIVEGIFT_PAYMENT_SECRET"]


def spawn(extra: dict[str, str], work: Path, n: int) -> tuple[procs.Spawned, Ctx, dict[str, Any]]:
    data_dir = work / f"server{n}" / "data"  # created by the server, with its own modes
    data_dir.parent.mkdir(parents=True)
    env, secret, payment = server_env(extra, data_dir)
    port = procs.free_port()
    sp = procs.Spawned(f"server{n}", livegift_cmd("serve", "--host", "127.0.0.1", "--port", str(port)),
                       env=env, log_dir=work, cwd=str(data_dir.parent))  # fmt: skip
    try:
        procs.wait_http_ok(f"http://127.0.0.1:{port}/healthz", 60, sp.proc)
    except Exception as e:
        tail = sp.tail()
        sp.stop()
        raise SystemExit(f"livegift did not start: {e}\n{tail}") from e
    redis_pid = next((c.pid for c in sp.ps.children(recursive=True)
                      if "redis" in c.name() or "valkey" in c.name()), None)  # fmt: skip
    ident = identify(sp)
    ctx = Ctx(Target("127.0.0.1", port, secret, payment), sp.pid, redis_pid, data_dir, env, work,
              Path(ident["livegift_file"]).parent)  # fmt: skip
    return sp, ctx, ident


def identify(sp: procs.Spawned) -> dict[str, Any]:
    """Which livegift the server imported, from its log and /proc/<pid>/environ."""
    code = next((ln.split(" from ", 1)[1] for ln in sp.tail(200).splitlines()
                 if ln.startswith("attacks: livegift from")), "?")  # fmt: skip
    env: dict[str, str] = {}
    with contextlib.suppress(OSError):
        environ = Path(f"/proc/{sp.pid}/environ").read_bytes().split(b"\0")
        env = {k.decode(): v.decode() for k, _, v in (e.partition(b"=") for e in environ if e)}
    tree = Path(code).resolve().parent.parent if code != "?" else None
    return {"pid": sp.pid, "livegift_file": code, "pythonpath": env.get("PYTHONPATH", ""),
            "commit": head_commit(tree) if tree else None}  # fmt: skip


def head_commit(tree: Path) -> str | None:
    """The commit a checkout is at, read from .git (no git command runs)."""
    git = tree / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


# -- the embedded data store ---------------------------------------------------------------


def _secrets_in(data_dir: Path, redis_pid: int | None) -> Iterator[str]:
    """Strings that may be the embedded Redis's password, likeliest first: the small files
    of its data folder (files named like a password first; JSON values, lines,
    ``requirepass`` settings, URLs) and its command line. Logs and the AOF are skipped."""
    files = [p for p in data_dir.rglob("*") if p.is_file() and p.suffix != ".log"
             and "aof" not in p.name and p.stat().st_size < 4096]  # fmt: skip
    files.sort(key=lambda p: (not re.search(r"pass|secret|auth", p.name), p.name))
    texts = [p.read_text(errors="replace") for p in files]
    if redis_pid:
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{redis_pid}/cmdline").read_bytes().split(b"\0")
            texts.append("\n".join(a.decode(errors="replace") for a in args))
    for text in texts:
        with contextlib.suppress(ValueError):
            obj = json.loads(text)
            if isinstance(obj, dict):
                yield from (str(v) for v in obj.values() if isinstance(v, str))
        yield text.strip()
        yield from re.findall(r"requirepass\s+\"?([^\s\"]+)", text)
        yield from re.findall(r"redis://[^:@/\s]*:([^@/\s]+)@", text)
        lines = text.splitlines()
        yield from (ln.strip() for ln in lines)
        yield from (b.strip() for a, b in itertools.pairwise(lines) if a.strip() == "--requirepass")


def store_port(data_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return int(json.loads((data_dir / "server.json").read_text())["port"])
    return None


def _auth(port: int, password: str | None) -> bool | None:
    """Does the store answer PING after AUTH with ``password`` (None: no AUTH)? None when
    it cannot be reached. Raw RESP, so a wrong guess costs one round trip, no retries."""
    cmds = ([[b"AUTH", password.encode()]] if password is not None else []) + [[b"PING"]]
    wire = b"".join(b"*%d\r\n" % len(c) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in c)
                   for c in cmds)  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            sock.sendall(wire)
            data = b""
            while data.count(b"\r\n") < len(cmds) and (chunk := sock.recv(4096)):
                data += chunk
    except OSError:
        return None
    return data.split(b"\r\n")[len(cmds) - 1] == b"+PONG"


def store_client(data_dir: Path, redis_pid: int | None) -> tuple[Any, bool]:
    """A redis client on the server's embedded store: (client, whether a password was
    needed), or (None, False) when none of the candidates opens it."""
    import redis

    port = store_port(data_dir)
    if port is None:
        return None, False
    seen: set[str] = set()
    for password in [None, *_secrets_in(data_dir, redis_pid)]:
        if password is not None and (not password or password in seen or len(password) > 512):
            continue
        seen.add(password or "")
        ok = _auth(port, password)
        if ok is None:
            return None, False
        if ok:
            return redis.Redis(host="127.0.0.1", port=port, password=password,
                               socket_timeout=10), password is not None  # fmt: skip
    return None, False


def raw_ping(port: int) -> str:
    """What the store answers an unauthenticated PING (first line)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.sendall(b"PING\r\n")
            return s.recv(256).split(b"\r\n")[0].decode(errors="replace")
    except OSError as e:
        return f"connect failed: {e}"


def script_calls(client: Any) -> int:
    """Scripts run by the store so far (EVAL, EVALSHA, FCALL and their _RO forms)."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items()
               if k.removeprefix("cmdstat_") in {"eval", "evalsha", "eval_ro", "evalsha_ro",
                                                 "fcall", "fcall_ro"})  # fmt: skip
