"""The server under test: starting (or finding) it, and reconciling its books afterwards."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from . import procs
from .config import RunConfig
from .targets import Kind, check_loopback


@dataclasses.dataclass
class ServerHandle:
    base_url: str
    host: str
    port: int
    spawned: procs.Spawned | None
    watch: procs.ProcWatch | None
    env: dict[str, str]


def livegift_env(cfg: RunConfig, data_dir: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["LIVEGIFT_SECRET"] = cfg.secret
    env["LIVEGIFT_PAYMENT_SECRET"] = cfg.payment_secret
    env.setdefault("LIVEGIFT_GIFT_RATE", "100000")
    env.setdefault("LIVEGIFT_GIFT_BURST", "100000")
    if cfg.batch_ms is not None:
        env["LIVEGIFT_BATCH_MS"] = str(cfg.batch_ms)
    if cfg.redis_url:
        env["REDIS_URL"] = cfg.redis_url
    else:
        env.pop("REDIS_URL", None)
        if data_dir:
            env["LIVEGIFT_DATA_DIR"] = data_dir
    env.update(cfg.server_env)
    return env


def peer_module(kind: Kind) -> list[str]:
    if kind == "raw":
        return ["-m", "loadtest.peers.rawlimit"]
    if kind == "socketio":
        return ["-m", "loadtest.peers.sio"]
    if kind == "channels":
        return ["-m", "loadtest.peers.channels_peer", "--layer", "core"]
    if kind == "channels-pubsub":
        return ["-m", "loadtest.peers.channels_peer", "--layer", "pubsub"]
    raise ValueError(kind)


def start_server(cfg: RunConfig, log_dir: Path) -> ServerHandle:
    """The server to load: a running one (``--url``) or one started here (``--spawn``)."""
    if not cfg.spawn:
        return find_server(cfg)
    host, port = "127.0.0.1", procs.free_port()
    if cfg.kind == "livegift":
        sp, env = spawn_livegift(cfg, host, port, log_dir)
    else:
        sp, env = spawn_peer(cfg, host, port, log_dir)
    return ServerHandle(f"http://{host}:{port}", host, port, sp, procs.ProcWatch(sp.pid), env)


def find_server(cfg: RunConfig) -> ServerHandle:
    if not cfg.url:
        raise SystemExit("give --url of a running server or --spawn")
    u = urllib.parse.urlparse(cfg.url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    check_loopback(host)
    watch = procs.ProcWatch(cfg.server_pid) if cfg.server_pid else None
    # A running livegift is reconciled against whatever store it uses (the caller's env).
    return ServerHandle(cfg.url.rstrip("/"), host, port, None, watch, dict(os.environ))


def spawn_livegift(
    cfg: RunConfig, host: str, port: int, log_dir: Path
) -> tuple[procs.Spawned, dict[str, str]]:
    binary = procs.livegift_binary()
    if binary is None:
        raise SystemExit("livegift is not installed in this environment")
    data_dir = None if cfg.redis_url else tempfile.mkdtemp(prefix="loadtest-livegift-")
    env = livegift_env(cfg, data_dir)
    cmd = [binary, "serve", "--host", host, "--port", str(port)]
    if cfg.workers:
        cmd += ["--workers", str(cfg.workers)]
    sp = procs.Spawned("livegift", procs.pinned(cmd, cfg.server_cpus), env=env, log_dir=log_dir)
    try:
        procs.wait_http_ok(f"http://{host}:{port}/healthz", 90, sp.proc)
    except Exception as e:
        tail = sp.tail()
        sp.stop()
        raise RuntimeError(f"livegift did not start: {e}\n{tail}") from e
    return sp, env


def spawn_peer(
    cfg: RunConfig, host: str, port: int, log_dir: Path
) -> tuple[procs.Spawned, dict[str, str]]:
    if not cfg.redis_url:
        raise SystemExit(f"the {cfg.kind} peer needs --redis-url")
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, *peer_module(cfg.kind), "--host", host, "--port", str(port),
           "--redis", cfg.redis_url]  # fmt: skip
    sp = procs.Spawned(cfg.kind, procs.pinned(cmd, cfg.server_cpus), env=env, log_dir=log_dir)
    try:
        procs.wait_port(host, port, 60, sp.proc)
    except Exception as e:
        tail = sp.tail()
        sp.stop()
        raise RuntimeError(f"{cfg.kind} peer did not start: {e}\n{tail}") from e
    return sp, env


def run_reconcile(env: dict[str, str]) -> dict[str, Any]:
    binary = procs.livegift_binary()
    if binary is None:
        return {"ran": False, "reason": "livegift command not installed"}
    try:
        p = subprocess.run(
            [binary, "reconcile"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {"ran": True, "exit_code": None, "ok": False, "output": "timed out after 300 s"}
    out = (p.stdout + p.stderr).strip()
    if p.returncode == 2 and ("No such command" in out or "invalid choice" in out):
        return {
            "ran": False,
            "reason": "livegift has no reconcile command yet",
            "output": out[-2000:],
        }
    return {"ran": True, "exit_code": p.returncode, "ok": p.returncode == 0, "output": out[-4000:]}
