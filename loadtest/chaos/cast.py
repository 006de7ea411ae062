"""The processes of one chaos run: a data store and N ``livegift serve`` processes.

Why a module of its own: the faults (:mod:`loadtest.chaos.faults`) kill, freeze and
restart these processes in the middle of a run, so each one must be restartable on the
same port (clients and the servers' REDIS_URL keep pointing at it) and with the same
data (the store reloads its AOF), and none may outlive the run, also on Ctrl-C or an
exception. ``Cast`` is a context manager that stops everything it started, and every
child also gets a parent-death signal on Linux when started from the main thread.

- The store, ``single``: one Valkey/Redis (livegift.embedded's binary discovery) with
  the repo's ``redis.conf`` (AOF, ``appendfsync always``, noeviction) on a port, folder
  and password of its own. ``cluster``: 3 masters + 3 replicas from ``tests/cluster.py``
  (``ValkeyCluster``, which knows how to kill, freeze and heal nodes), with a short
  ``cluster-node-timeout`` so that a failover happens within the run.
- The servers: ``python -m livegift serve --host 127.0.0.1 --port P`` with the secrets
  of the run, generous per-user limits (like tests/conftest.py's LiveServer), logs
  appended to ``server-<i>.log`` in the run folder across restarts.

Starting is blocking (before the workload runs); what the faults call while the workload
runs is async (spawning a process is quick, waiting for it is not).

    with Cast(CastConfig(run_dir=Path("run"), store="single", servers=2)) as cast:
        cast.store_url, cast.base_urls, cast.server_pids(), cast.healthz(0)
        await cast.restart_server(1)
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio

from livegift.embedded import config_file, find_server_binary, free_port
from loadtest.lgsetup import Secrets

ROOT = Path(__file__).resolve().parent.parent.parent
HOST = "127.0.0.1"
STORES = ("single", "cluster")
# Per-user limits far above what the workload does: the run tests money, not throttling.
SERVER_LIMITS = {
    "LIVEGIFT_GIFT_RATE": "1000",
    "LIVEGIFT_GIFT_BURST": "1000",
    "LIVEGIFT_MAX_CONNECTIONS_PER_USER": "1000",
}
# Valkey settings for the single store when no redis.conf is found (as in embedded.py).
FALLBACK_CONFIG = ("appendonly yes", 'save ""', "maxmemory-policy noeviction")
HEALTHZ_TIMEOUT = 1.0
POLL = 0.05
PR_SET_PDEATHSIG = 1


class CastError(RuntimeError):
    """A process of the cast would not start, or did not come back in time."""


def _child_setup(deathsig: int | None) -> Callable[[], None]:
    """Own process group (a Ctrl-C reaches only the runner, which then stops the cast in
    order), and on Linux a signal when the starting thread dies (no orphans after a
    ``kill -9`` of the runner). Only from the main thread: the signal follows the thread,
    not the process, so a child started from a worker thread would die with that thread."""

    def setup() -> None:  # pragma: no cover - runs in the child
        os.setpgrp()
        if deathsig is not None and sys.platform.startswith("linux"):
            import ctypes

            with contextlib.suppress(Exception):
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, deathsig)

    return setup


def _deathsig(sig: int) -> int | None:
    return sig if threading.current_thread() is threading.main_thread() else None


def _ping_sync(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


async def _ping(url: str) -> bool:
    client = redis.asyncio.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(await client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        await client.aclose()


def _stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM (a store fsyncs, a server drains), SIGCONT in case it is frozen, then
    SIGKILL if it does not exit in time; always reaped."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(OSError):
        process.terminate()
        process.send_signal(signal.SIGCONT)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            process.kill()
        process.wait()


def _kill_process(process: subprocess.Popen[bytes] | None) -> None:
    """kill -9 and reap."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(OSError):
        process.kill()
    process.wait()


# -- the data store ----------------------------------------------------------------------


@dataclass
class SingleStore:
    """One Valkey with AOF on a port and folder of its own, restartable on both, so a
    restart after a ``kill -9`` reloads what was acknowledged."""

    dir: Path
    timeout: float = 30.0
    kind: str = field(default="single", init=False)
    port: int = field(default_factory=free_port, init=False)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24), init=False)
    binary: str = field(default_factory=find_server_binary, init=False)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    frozen: bool = field(default=False, init=False)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{HOST}:{self.port}/0"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None and self.alive else []

    def node_urls(self) -> list[str]:
        return [self.url] if self.alive else []

    def owner_url(self, key: str) -> str:
        return self.url

    def _write_config(self) -> Path:
        """The config, 0600 since it holds the password (never on a command line)."""
        base = config_file()
        lines = [f'include "{base}"'] if base else list(FALLBACK_CONFIG)
        lines += [
            f"port {self.port}",
            f"bind {HOST}",
            f'dir "{self.dir.resolve()}"',
            "daemonize no",
            'logfile "store.log"',
            "appendonly yes",
            "appendfsync always",
            f'requirepass "{self.password}"',
        ]
        conf = self.dir / "store.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")
        return conf

    def spawn(self) -> None:
        """Start the process (same port, folder, AOF); does not wait for it."""
        if self.alive:
            raise CastError(f"the store on :{self.port} is running")
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self._write_config()
        with open(self.dir / "store.stderr", "ab") as err:
            self.process = subprocess.Popen(
                [self.binary, str(conf)],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                preexec_fn=_child_setup(_deathsig(signal.SIGTERM)),
            )
        self.frozen = False

    def _check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            tail = ""
            with contextlib.suppress(OSError):
                tail = (self.dir / "store.log").read_text(errors="replace")[-1500:]
            raise CastError(f"the store on :{self.port} exited at start\n{tail}")

    def start(self) -> None:
        """Spawn and wait (blocking) until it answers PING (its AOF loaded)."""
        self.spawn()
        deadline = time.monotonic() + self.timeout
        while not _ping_sync(self.url):
            self._check_alive()
            if time.monotonic() > deadline:
                raise CastError(f"the store on :{self.port} did not answer in time")
            time.sleep(POLL)

    async def wait_ready(self, timeout: float | None = None) -> float:
        """Seconds until it answers PING (after loading its AOF)."""
        began = time.monotonic()
        deadline = began + (timeout or self.timeout)
        while not await _ping(self.url):
            self._check_alive()
            if time.monotonic() > deadline:
                raise CastError(f"the store on :{self.port} did not answer in time")
            await asyncio.sleep(POLL)
        return time.monotonic() - began

    def kill(self) -> None:
        """kill -9: whatever the AOF holds is all that survives."""
        _kill_process(self.process)
        self.frozen = False

    def freeze(self) -> None:
        """SIGSTOP: it keeps its sockets but answers nothing (a hung machine)."""
        if self.process is None or not self.alive:
            raise CastError("the store is not running")
        self.process.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.process is not None and self.alive:
            self.process.send_signal(signal.SIGCONT)
        self.frozen = False

    def stop(self) -> None:
        _stop_process(self.process)


def cluster_class() -> Any:
    """tests/cluster.py's ValkeyCluster (the repository's own, importable from its root)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:  # by name: mypy checks loadtest/, not the tests' harness
        module = importlib.import_module("tests.cluster")
    except ImportError as exc:  # pragma: no cover - a checkout without tests/ or pytest
        raise CastError(f"a cluster store needs tests/cluster.py and pytest: {exc}") from exc
    return module.ValkeyCluster


@dataclass
class ClusterStore:
    """3 masters + 3 replicas (tests/cluster.py); ``harness`` kills, freezes and heals."""

    dir: Path
    node_timeout_ms: int = 1000
    appendfsync: str = "always"
    kind: str = field(default="cluster", init=False)
    harness: Any = field(default=None, init=False)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.harness = cluster_class()(
            root=self.dir,
            node_timeout_ms=self.node_timeout_ms,
            appendfsync=self.appendfsync,
            keep_dir=True,  # the nodes' logs stay with the run
        )
        self.harness.start()

    @property
    def url(self) -> str:
        """One live node's URL (a server started now must not be pointed at a dead one)."""
        return str(self.harness.url)

    def pids(self) -> list[int]:
        return [int(p) for p in self.harness.pids()] if self.harness else []

    def node_urls(self) -> list[str]:
        return [str(u) for u in self.harness.urls]

    def owner_url(self, key: str) -> str:
        """The master that serves ``key``'s slot now (blocking: a CLUSTER NODES)."""
        return str(self.harness.master_for_key(key).url)

    def stop(self) -> None:
        if self.harness is not None:
            self.harness.stop()


# -- the livegift servers ----------------------------------------------------------------


@dataclass
class ServerProc:
    """One ``livegift serve`` on a fixed port, restartable there."""

    index: int
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.alive else None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class CastConfig:
    """One run's processes. ``store``: "single" or "cluster"."""

    run_dir: Path
    store: str = "single"
    servers: int = 2
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    payment_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    node_timeout_ms: int = 1000
    server_env: dict[str, str] = field(default_factory=dict)
    timeout: float = 30.0  # for one process to come up

    def __post_init__(self) -> None:
        if self.store not in STORES:
            raise ValueError(f"store must be one of {STORES}, not {self.store!r}")
        if self.servers < 1:
            raise ValueError("a cast needs at least one server")


class Cast:
    """The store and the servers of one run; ``with Cast(config) as cast:`` stops all."""

    def __init__(self, config: CastConfig) -> None:
        self.config = config
        self.dir = config.run_dir
        self.store: SingleStore | ClusterStore
        if config.store == "single":
            self.store = SingleStore(self.dir / "store", timeout=config.timeout)
        else:
            self.store = ClusterStore(self.dir / "cluster", node_timeout_ms=config.node_timeout_ms)
        self.servers = [
            ServerProc(i, free_port(), self.dir / f"server-{i}.log") for i in range(config.servers)
        ]
        self.secrets = Secrets(token=config.secret, payment=config.payment_secret)
        self._started = False

    # -- life cycle ------------------------------------------------------------------------

    def __enter__(self) -> Cast:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Cast:
        """Start the store, then every server, and wait (blocking) until each answers
        /healthz 200. On any failure, whatever started is stopped again."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        self._started = True
        try:
            self.store.start()
            for server in self.servers:
                self.spawn_server(server.index)
            for server in self.servers:
                self._wait_healthy_sync(server)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Servers first (they drain), then the store. Safe to call twice."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.stop)
        for server in self.servers:  # all drain at once, then each is waited for
            self.terminate_server(server.index)
        for server in self.servers:
            _stop_process(server.process)
        self.store.stop()

    # -- what the run needs --------------------------------------------------------------

    @property
    def store_url(self) -> str:
        return self.store.url

    @property
    def base_urls(self) -> list[str]:
        return [s.base_url for s in self.servers]

    @property
    def ws_urls(self) -> list[str]:
        return [s.ws_url for s in self.servers]

    def server_pids(self) -> list[int | None]:
        return [s.pid for s in self.servers]

    def store_pids(self) -> list[int]:
        return self.store.pids()

    def healthz(self, i: int) -> int:
        """Server i's /healthz status; 0 when it does not answer."""
        try:
            return httpx.get(
                f"{self.servers[i].base_url}/healthz", timeout=HEALTHZ_TIMEOUT
            ).status_code
        except httpx.HTTPError:
            return 0

    async def ahealthz(self, i: int, http: httpx.AsyncClient) -> int:
        """The same, async, on the caller's client."""
        try:
            r = await http.get(f"{self.servers[i].base_url}/healthz", timeout=HEALTHZ_TIMEOUT)
        except httpx.HTTPError:
            return 0
        return r.status_code

    # -- servers ---------------------------------------------------------------------------

    def server_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            REDIS_URL=self.store.url,
            LIVEGIFT_SECRET=self.config.secret,
            LIVEGIFT_PAYMENT_SECRET=self.config.payment_secret,
            LIVEGIFT_DATA_DIR=str(self.dir / "data"),
            **SERVER_LIMITS,
        )
        env.update(self.config.server_env)
        return env

    def spawn_server(self, i: int) -> None:
        """Start server i on its port; does not wait for it."""
        server = self.servers[i]
        if server.alive:
            raise CastError(f"server {i} (:{server.port}) is running")
        argv = [sys.executable, "-m", "livegift", "serve", "--host", HOST]
        argv += ["--port", str(server.port)]
        with open(server.log, "ab") as out:
            server.starts += 1
            out.write(f"--- start {server.starts} at {time.time():.3f}\n".encode())
            out.flush()
            server.process = subprocess.Popen(
                argv,
                env=self.server_env(),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=_child_setup(_deathsig(signal.SIGTERM)),
            )

    def _wait_healthy_sync(self, server: ServerProc) -> None:
        deadline = time.monotonic() + self.config.timeout
        while self.healthz(server.index) != 200:
            self._check_server(server)
            if time.monotonic() > deadline:
                raise CastError(f"server {server.index} not healthy in time\n{server.tail()}")
            time.sleep(POLL)

    def _check_server(self, server: ServerProc) -> None:
        if server.process is None or server.process.poll() is not None:
            code = server.process.returncode if server.process else None
            raise CastError(f"server {server.index} exited ({code})\n{server.tail()}")

    async def wait_server(
        self, i: int, http: httpx.AsyncClient, timeout: float | None = None
    ) -> float:
        """Seconds until server i answers /healthz 200; CastError if it exits or the
        time runs out."""
        server = self.servers[i]
        began = time.monotonic()
        deadline = began + (timeout or self.config.timeout)
        while await self.ahealthz(i, http) != 200:
            self._check_server(server)
            if time.monotonic() > deadline:
                raise CastError(f"server {i} not healthy in time\n{server.tail()}")
            await asyncio.sleep(POLL)
        return time.monotonic() - began

    async def restart_server(self, i: int, http: httpx.AsyncClient) -> float:
        """Start a stopped server again on its port; seconds until /healthz 200."""
        self.spawn_server(i)
        return await self.wait_server(i, http)

    def kill_server(self, i: int) -> None:
        """kill -9 server i (reaped)."""
        _kill_process(self.servers[i].process)

    def terminate_server(self, i: int) -> None:
        """SIGTERM server i: it stops by itself (uvicorn's graceful shutdown)."""
        process = self.servers[i].process
        if process is not None and process.poll() is None:
            process.terminate()

    async def wait_exit(self, i: int, timeout: float) -> int | None:
        """Server i's exit code, or None if it still runs after ``timeout``."""
        process = self.servers[i].process
        if process is None:
            return None
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(POLL)
        return process.returncode

    async def wait_all_healthy(self, http: httpx.AsyncClient, timeout: float) -> bool:
        """Until every server answers /healthz 200 at once; False when time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            codes = await self.all_healthz(http)
            if all(code == 200 for code in codes):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(POLL)

    async def all_healthz(self, http: httpx.AsyncClient) -> list[int]:
        return list(await asyncio.gather(*(self.ahealthz(i, http) for i in self.indices())))

    def indices(self) -> Sequence[int]:
        return range(len(self.servers))
