"""The faults of a chaos run, and the schedule that injects them while the workload runs.

Why: a checker can only prove that nothing acknowledged was lost or doubled *under
faults* if the faults really happened and the system really came back from each before
the next. So every fault here injects, waits for a recovery it can observe from outside
(every server's /healthz, the store's own view of its subscribers and replicas), and
returns a :class:`FaultRecord` saying what happened, how long recovery took and whether
it came. A fault that breaks is a record with ``ok=False`` and an ``error``, never an
exception out of the run; whatever a fault stopped or froze is restarted or thawed in a
``finally``.

- ``store_kill``: kill -9 the store. Single: restart it on its AOF after ``down_s``.
  Cluster: kill one master, wait until its replica serves its slots, restart the killed
  node (it rejoins as a replica). ``details["healthz_503_seen"]`` says whether /healthz
  reported the outage; a marker written (and, on a cluster, replicated) before the kill
  must be readable after it.
- ``store_stall``: SIGSTOP the store (or one master) for ``stall_s``, then SIGCONT. On a
  cluster with a short node timeout this is also a failover.
- ``server_kill``: kill -9 one livegift server (in turn), restart it on its port.
- ``pubsub_cut``: ``CLIENT KILL TYPE pubsub`` on every store node; recovered when every
  watched room channel has as many shard subscribers (``PUBSUB SHARDNUMSUB`` on the
  master that owns it) as before the cut. Target: 2 s.
- ``pubsub_overflow``: a tiny pubsub output-buffer limit and a burst of big SPUBLISHes
  on one room's channel make the store drop the servers' subscriber connections; the
  limit is restored, recovery as for ``pubsub_cut``. The payload is not JSON, so the
  hub counts it as a bad event and drops it (livegift.hub ``_read``): no client sees it.
- ``rolling_restart``: SIGTERM each server in turn; each must exit by itself within
  ``exit_timeout`` (its WebSockets closed 1001/1013: a probe socket per server checks),
  then it is restarted and must answer /healthz 200 before the next.

``recovery_s``: seconds from the end of the injection (the kill, cut or burst itself;
for a fault held on for a while, a store kept down or stalled, the moment it is lifted)
until the recovery check passed; None when it did not pass in time. ``details
["outage_s"]`` is from the first moment of the fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import redis
import redis.asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from livegift import keys
from loadtest.chaos.cast import Cast, ClusterStore, SingleStore
from loadtest.lgsetup import user_token

LEAD = 0.15  # no fault in the first 15 % of the run: the workload gets going first
TAIL = 0.15  # nor in the last 15 %: the run ends with everything recovered
PUBSUB_TARGET_S = 2.0
SUBPROTOCOL = Subprotocol("livegift.json")
# What a server may close its WebSockets with when it stops (PROTOCOL: going away, or
# try again later).
RESTART_CLOSES = frozenset({1001, 1013})
# How a server that stopped by itself on SIGTERM exits: uvicorn drains, then raises the
# signal it caught again, so the exit status is "killed by SIGTERM" after a clean stop.
CLEAN_EXITS = frozenset({0, -signal.SIGTERM})
OVERFLOW_PAYLOAD_HEAD = b"chaos-overflow: not an event, dropped by the hub "


@dataclass(slots=True)
class FaultRecord:
    """One injected fault: when (time.time()), how long recovery took, what was seen."""

    name: str
    started: float
    ended: float
    recovery_s: float | None
    details: dict[str, Any]
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FaultOptions:
    """Knobs of the faults. ``rooms``: the room ids the workload uses (asked at each
    fault, since rooms are made after the cast starts): their channels are where
    resubscription is watched, and the first one is what the probes join."""

    rooms: Callable[[], Sequence[str]] = tuple
    down_s: float = 1.0  # single store_kill: how long the store stays dead
    stall_s: float = 3.0  # store_stall: how long it is frozen
    timeout: float = 30.0  # for any recovery
    poll_s: float = 0.05
    exit_timeout: float = 15.0  # rolling_restart: SIGTERM until exit
    overflow_limit: str = "pubsub 64kb 32kb 1"
    overflow_messages: int = 16
    overflow_bytes: int = 256 * 1024
    _next_server: int = field(default=0, repr=False)

    def next_server(self, count: int) -> int:
        """The server the next server_kill takes: each in turn."""
        index = self._next_server % count
        self._next_server += 1
        return index


class _Fault:
    """The clock and notes of one fault while it runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.time()
        self.t0 = time.monotonic()
        self.details: dict[str, Any] = {}

    def since(self, t: float | None = None) -> float:
        return round(time.monotonic() - (self.t0 if t is None else t), 3)

    def record(self, recovery_s: float | None, ok: bool) -> FaultRecord:
        self.details["outage_s"] = self.since()
        return FaultRecord(self.name, self.started, time.time(), recovery_s, self.details, ok)


class _HealthWatch:
    """Polls every server's /healthz in the background while a fault is on."""

    def __init__(self, cast: Cast, http: httpx.AsyncClient, poll_s: float) -> None:
        self.cast, self.http, self.poll_s = cast, http, poll_s
        self.seen: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _HealthWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            self.seen.update(await self.cast.all_healthz(self.http))
            await asyncio.sleep(self.poll_s)

    def note(self, details: dict[str, Any]) -> None:
        details["healthz_seen"] = sorted(self.seen)  # 0: no answer
        details["healthz_503_seen"] = 503 in self.seen


async def _recovered(
    fault: _Fault, cast: Cast, http: httpx.AsyncClient, since: float, opt: FaultOptions
) -> float | None:
    """Seconds from ``since`` until every server answers /healthz 200, or None."""
    if not await cast.wait_all_healthy(http, opt.timeout):
        fault.details["healthz_after"] = await cast.all_healthz(http)
        return None
    return fault.since(since)


# -- store_kill ----------------------------------------------------------------------------


async def store_kill(cast: Cast, opt: FaultOptions) -> FaultRecord:
    """kill -9 the store (single: restart on its AOF; cluster: one master, failover,
    rejoin as a replica); recovered when every server's /healthz is 200 again."""
    if isinstance(cast.store, SingleStore):
        return await _single_store_kill(cast, cast.store, opt)
    assert isinstance(cast.store, ClusterStore)
    return await _cluster_store_kill(cast, cast.store, opt)


async def _single_store_kill(cast: Cast, store: SingleStore, opt: FaultOptions) -> FaultRecord:
    fault = _Fault("store_kill")
    marker, value = f"chaos:marker:{secrets.token_hex(6)}", secrets.token_hex(8)
    await _set(store.url, marker, value)  # acknowledged = fsynced (appendfsync always)
    async with httpx.AsyncClient() as http:
        async with _HealthWatch(cast, http, opt.poll_s) as watch:
            fault.t0 = time.monotonic()
            store.kill()
            try:
                await asyncio.sleep(opt.down_s)
            finally:
                store.spawn()
            back = time.monotonic()
            fault.details["store_ready_s"] = round(await store.wait_ready(opt.timeout), 3)
            recovery = await _recovered(fault, cast, http, back, opt)
        watch.note(fault.details)
    survived = await _get(store.url, marker) == value
    fault.details.update(down_s=opt.down_s, marker_survived=survived, pid=store.pids())
    return fault.record(recovery, recovery is not None and survived)


async def _cluster_store_kill(cast: Cast, store: ClusterStore, opt: FaultOptions) -> FaultRecord:
    fault = _Fault("store_kill")
    harness = store.harness
    victim = await asyncio.to_thread(_victim, store, opt)
    key, value, acked = await asyncio.to_thread(_cluster_marker, harness, victim)
    fault.details.update(victim=victim.port, marker_replicas=acked)
    async with httpx.AsyncClient() as http:
        async with _HealthWatch(cast, http, opt.poll_s) as watch:
            fault.t0 = time.monotonic()
            await asyncio.to_thread(harness.kill_master, victim)
            try:
                failover = await asyncio.to_thread(harness.wait_failover, victim, opt.timeout)
                fault.details["failover_s"] = round(failover, 3)
                recovery = await _recovered(fault, cast, http, fault.t0, opt)
            finally:
                rejoined = await asyncio.to_thread(harness.restart, victim.port, opt.timeout)
        watch.note(fault.details)
        back = await cast.wait_all_healthy(http, opt.timeout)
    promoted = [m.port for m in await asyncio.to_thread(harness.masters) if m.slots == victim.slots]
    survived = await asyncio.to_thread(_cluster_get, harness, key) == value
    fault.details.update(
        promoted=promoted, rejoined_as=rejoined.role, marker_survived=survived, healthy_after=back
    )
    ok = recovery is not None and back and survived and rejoined.role == "replica"
    return fault.record(recovery, ok)


def _victim(store: ClusterStore, opt: FaultOptions) -> Any:
    """The master of the first watched room's channel (the fault then hits the run's
    rooms), else the first master. Blocking."""
    rooms = list(opt.rooms())
    if rooms:
        return store.harness.master_for_key(keys.channel(rooms[0]))
    return store.harness.masters()[0]


def _cluster_marker(harness: Any, victim: Any) -> tuple[str, str, int]:
    """A key on ``victim``, acknowledged by a replica (WAIT) before the kill. Blocking."""
    key = f"chaos:marker:{harness.hashtag_for(victim)}:{secrets.token_hex(6)}"
    value = secrets.token_hex(8)
    client = harness.node_client(victim, decode_responses=True)
    try:
        client.set(key, value)
        acked = int(client.execute_command("WAIT", 1, 2000))
    finally:
        client.close()
    return key, value, acked


def _cluster_get(harness: Any, key: str) -> str | None:
    client = harness.client(decode_responses=True)
    try:
        return client.get(key)  # type: ignore[no-any-return]
    finally:
        client.close()


async def _set(url: str, key: str, value: str) -> None:
    client = redis.asyncio.Redis.from_url(url, socket_timeout=5)
    try:
        await client.set(key, value)
    finally:
        await client.aclose()


async def _get(url: str, key: str) -> str | None:
    client = redis.asyncio.Redis.from_url(url, socket_timeout=5)
    try:
        raw = await client.get(key)
    except (redis.RedisError, OSError):
        return None
    finally:
        await client.aclose()
    return raw.decode() if isinstance(raw, bytes) else None


# -- store_stall ---------------------------------------------------------------------------


async def store_stall(cast: Cast, opt: FaultOptions) -> FaultRecord:
    """SIGSTOP the store (or one master) for ``stall_s``, then SIGCONT; recovered when
    every server's /healthz is 200 again (and a cluster is whole)."""
    fault = _Fault("store_stall")
    store = cast.store
    async with httpx.AsyncClient() as http:
        async with _HealthWatch(cast, http, opt.poll_s) as watch:
            if isinstance(store, SingleStore):
                fault.t0 = time.monotonic()
                store.freeze()
                try:
                    await asyncio.sleep(opt.stall_s)
                finally:
                    store.thaw()
            else:
                assert isinstance(store, ClusterStore)
                await _cluster_stall(fault, store, opt)
            thawed = time.monotonic()
            recovery = await _recovered(fault, cast, http, thawed, opt)
        watch.note(fault.details)
    fault.details["stall_s"] = opt.stall_s
    return fault.record(recovery, recovery is not None)


async def _cluster_stall(fault: _Fault, store: ClusterStore, opt: FaultOptions) -> None:
    harness = store.harness
    victim = await asyncio.to_thread(_victim, store, opt)
    fault.details["victim"] = victim.port
    fault.t0 = time.monotonic()
    await asyncio.to_thread(harness.freeze, victim)
    try:
        await asyncio.sleep(opt.stall_s)
    finally:
        harness.thaw(victim.port)  # a signal: instant
    await asyncio.to_thread(harness.wait_ready, opt.timeout)
    node = await asyncio.to_thread(harness.node, victim.port)
    fault.details["failover"] = node.role != "master"


# -- server_kill ---------------------------------------------------------------------------


async def server_kill(cast: Cast, opt: FaultOptions) -> FaultRecord:
    """kill -9 one livegift server (each in turn), restart it on the same port."""
    fault = _Fault("server_kill")
    index = opt.next_server(len(cast.servers))
    fault.details.update(server=index, pid=cast.servers[index].pid)
    async with httpx.AsyncClient() as http:
        fault.t0 = time.monotonic()
        cast.kill_server(index)
        try:
            cast.spawn_server(index)
            await cast.wait_server(index, http, opt.timeout)
            recovery: float | None = fault.since()
        except Exception as exc:
            fault.details["error"] = str(exc)
            recovery = None
        others = await cast.all_healthz(http)
    fault.details.update(new_pid=cast.servers[index].pid, healthz_after=others)
    return fault.record(recovery, recovery is not None and all(c == 200 for c in others))


# -- pub/sub -------------------------------------------------------------------------------


class _Subscribers:
    """``PUBSUB SHARDNUMSUB`` of the watched rooms' channels, each on its owner master."""

    def __init__(self, cast: Cast, rooms: Sequence[str]) -> None:
        self.cast = cast
        self.channels = [keys.channel(room) for room in rooms]
        self.clients: dict[str, redis.asyncio.Redis] = {}
        self.owner: dict[str, str] = {}

    async def locate(self) -> None:
        """Find each channel's master (blocking on a cluster: a CLUSTER NODES)."""
        for channel in self.channels:
            url = await asyncio.to_thread(self.cast.store.owner_url, channel)
            self.owner[channel] = url
            if url not in self.clients:
                self.clients[url] = redis.asyncio.Redis.from_url(
                    url, socket_timeout=2, socket_connect_timeout=2
                )

    async def counts(self) -> dict[str, int]:
        out = {}
        for channel in self.channels:
            client = self.clients[self.owner[channel]]
            try:
                reply = await client.pubsub_shardnumsub(channel)
            except (redis.RedisError, OSError):
                out[channel] = -1
                continue
            out[channel] = _numsub(reply)
        return out

    async def wait_back(self, wanted: dict[str, int], opt: FaultOptions) -> bool:
        """Until every channel has at least its ``wanted`` subscribers again."""
        deadline = time.monotonic() + opt.timeout
        while True:
            now = await self.counts()
            if all(now[ch] >= n for ch, n in wanted.items()):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(opt.poll_s)

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


def _numsub(reply: Any) -> int:
    """The count from a SHARDNUMSUB reply for one channel: [name, n], {name: n} or
    [(name, n)], as the client parses it."""
    if isinstance(reply, dict):
        return int(next(iter(reply.values()), 0))
    if reply and isinstance(reply[0], (list, tuple)):
        return int(reply[0][1])
    return int(reply[1]) if len(reply) > 1 else 0


async def _watched(cast: Cast, opt: FaultOptions) -> tuple[_Subscribers, dict[str, int]]:
    """The watched channels and their subscriber counts before the fault (those with
    none are left out: nothing to come back)."""
    subs = _Subscribers(cast, list(opt.rooms()))
    await subs.locate()
    before = await subs.counts()
    return subs, {ch: n for ch, n in before.items() if n > 0}


async def _resubscribed(
    fault: _Fault, subs: _Subscribers, wanted: dict[str, int], cut: float, opt: FaultOptions
) -> float | None:
    fault.details["watched"] = len(wanted)
    back = await subs.wait_back(wanted, opt)
    recovery = fault.since(cut) if back else None
    fault.details["target_s"] = PUBSUB_TARGET_S
    fault.details["target_met"] = recovery is not None and recovery <= PUBSUB_TARGET_S
    if not back:
        fault.details["subscribers_after"] = await subs.counts()
    return recovery


async def _kill_pubsub(url: str) -> int:
    client = redis.asyncio.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        command = ("CLIENT", "KILL", "TYPE", "pubsub")
        return int(await client.execute_command(*command))  # type: ignore[no-untyped-call]
    except (redis.RedisError, OSError):
        return -1
    finally:
        await client.aclose()


async def pubsub_cut(cast: Cast, opt: FaultOptions) -> FaultRecord:
    """Drop every pub/sub connection on every store node; recovered when the watched
    room channels have their shard subscribers back."""
    fault = _Fault("pubsub_cut")
    subs, wanted = await _watched(cast, opt)
    try:
        if not wanted:
            fault.details["error"] = "no watched room has a subscriber: nothing to measure"
        fault.t0 = time.monotonic()
        killed = [await _kill_pubsub(url) for url in cast.store.node_urls()]
        fault.details["killed"] = killed
        recovery = await _resubscribed(fault, subs, wanted, fault.t0, opt) if wanted else None
    finally:
        await subs.aclose()
    async with httpx.AsyncClient() as http:
        fault.details["healthz_after"] = await cast.all_healthz(http)
    return fault.record(recovery, recovery is not None and sum(killed) > 0)


async def pubsub_overflow(cast: Cast, opt: FaultOptions) -> FaultRecord:
    """Push the subscribers of one room's master past a tiny output-buffer limit (a
    burst of big messages no client will see), restore the limit, then recovery as in
    ``pubsub_cut``."""
    fault = _Fault("pubsub_overflow")
    subs, wanted = await _watched(cast, opt)
    try:
        if not wanted:
            fault.details["error"] = "no watched room has a subscriber: nothing to overflow"
            return fault.record(None, False)
        channel = max(wanted, key=lambda ch: wanted[ch])
        fault.details["channel"] = channel
        dropped = await _overflow(fault, subs.owner[channel], channel, opt)
        recovery = await _resubscribed(fault, subs, wanted, fault.t0, opt)
    finally:
        await subs.aclose()
    async with httpx.AsyncClient() as http:
        fault.details["healthz_after"] = await cast.all_healthz(http)
    return fault.record(recovery, recovery is not None and dropped)


async def _overflow(fault: _Fault, url: str, channel: str, opt: FaultOptions) -> bool:
    """Tiny limit, burst, confirm the store dropped a subscriber, restore the limit."""
    client = redis.asyncio.Redis.from_url(url, socket_timeout=5, decode_responses=True)
    try:
        limits = await client.config_get("client-output-buffer-limit")
        original = str(limits["client-output-buffer-limit"])
        before = await _overflow_disconnections(client)
        ids = {c["id"] for c in await client.client_list(_type="pubsub")}
        await client.config_set("client-output-buffer-limit", opt.overflow_limit)
        try:
            payload = OVERFLOW_PAYLOAD_HEAD + b"x" * opt.overflow_bytes
            fault.t0 = time.monotonic()
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(opt.overflow_messages):
                    pipe.spublish(channel, payload)
                await pipe.execute()
            dropped = await _wait_dropped(client, before, opt)
        finally:
            await client.config_set("client-output-buffer-limit", original)
        after = {c["id"] for c in await client.client_list(_type="pubsub")}
    finally:
        await client.aclose()
    fault.details.update(
        limit=opt.overflow_limit,
        restored=original,
        burst_bytes=opt.overflow_messages * len(payload),
        disconnections=dropped,
        pubsub_clients_gone=len(ids - after),
    )
    return dropped > 0


async def _overflow_disconnections(client: redis.asyncio.Redis) -> int:
    stats = await client.info("stats")
    return int(stats.get("client_output_buffer_limit_disconnections", 0))


async def _wait_dropped(client: redis.asyncio.Redis, before: int, opt: FaultOptions) -> int:
    """How many clients the store dropped for their output buffer (waits up to 3 s)."""
    deadline = time.monotonic() + 3.0
    while True:
        dropped = await _overflow_disconnections(client) - before
        if dropped > 0 or time.monotonic() > deadline:
            return dropped
        await asyncio.sleep(opt.poll_s)


# -- rolling_restart -----------------------------------------------------------------------


async def rolling_restart(cast: Cast, opt: FaultOptions) -> FaultRecord:
    """SIGTERM every server in turn; each must exit by itself (its sockets closed 1001
    or 1013), come back on its port and answer /healthz 200 before the next."""
    fault = _Fault("rolling_restart")
    rooms = list(opt.rooms())
    steps: list[dict[str, Any]] = []
    ok = True
    async with httpx.AsyncClient() as http:
        for index in cast.indices():
            step = await _restart_one(cast, http, index, rooms[0] if rooms else None, opt)
            steps.append(step)
            ok = ok and step["ok"]
    fault.details["servers"] = steps
    downs = [s["down_s"] for s in steps if s.get("down_s") is not None]
    recovery = max(downs) if ok and downs else None
    return fault.record(recovery, ok)


async def _restart_one(
    cast: Cast, http: httpx.AsyncClient, index: int, room: str | None, opt: FaultOptions
) -> dict[str, Any]:
    step: dict[str, Any] = {"server": index, "pid": cast.servers[index].pid}
    probe = await _probe(cast, index, room) if room else None
    began = time.monotonic()
    cast.terminate_server(index)
    try:
        code = await cast.wait_exit(index, opt.exit_timeout)
        step["exit_s"] = round(time.monotonic() - began, 3)
        step["exit_code"] = code  # -15: uvicorn raised the SIGTERM again after its clean stop
        if code is None:  # it did not stop by itself
            cast.kill_server(index)
        step["close_code"] = await _closed_with(probe) if probe is not None else None
    finally:  # also when cancelled: the run never ends with a server down
        cast.kill_server(index)
        cast.spawn_server(index)
    try:
        await cast.wait_server(index, http)
        step["down_s"] = round(time.monotonic() - began, 3)
    except Exception as exc:
        step["error"] = str(exc)
    probed_ok = probe is None or step["close_code"] in RESTART_CLOSES
    step["ok"] = code in CLEAN_EXITS and probed_ok and "down_s" in step
    return step


async def _probe(cast: Cast, index: int, room: str) -> ClientConnection | None:
    """A viewer socket on server ``index`` joined to ``room`` (None when it cannot join:
    the room may have ended)."""
    token = user_token(cast.secrets, f"chaos_probe_{index}", "chaos probe", adult=False)
    url = f"{cast.servers[index].ws_url}/ws/{room}?token={token}"
    try:
        ws = await connect(url, subprotocols=[SUBPROTOCOL], open_timeout=5)
    except (OSError, InvalidHandshake, TimeoutError):
        return None
    try:
        first = await asyncio.wait_for(ws.recv(), 5)
    except (ConnectionClosed, TimeoutError):
        await ws.close()
        return None
    if b'"welcome"' not in (first if isinstance(first, bytes) else first.encode()):
        await ws.close()
        return None
    return ws


async def _closed_with(ws: ClientConnection) -> int | None:
    """The close code the server sent (None: none came, the socket just dropped)."""
    try:
        async with asyncio.timeout(5):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    except TimeoutError:
        await ws.close()
        return None


# -- the table and the schedule ------------------------------------------------------------

FaultFn = Callable[[Cast, FaultOptions], Awaitable[FaultRecord]]
FAULTS: dict[str, FaultFn] = {
    "store_kill": store_kill,
    "store_stall": store_stall,
    "server_kill": server_kill,
    "pubsub_cut": pubsub_cut,
    "pubsub_overflow": pubsub_overflow,
    "rolling_restart": rolling_restart,
}


async def inject(name: str, cast: Cast, opt: FaultOptions | None = None) -> FaultRecord:
    """Run one fault by name; a fault that breaks is recorded (ok=False), not raised."""
    started = time.time()
    try:
        return await FAULTS[name](cast, opt or FaultOptions())
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        return FaultRecord(name, started, time.time(), None, {"error": error}, False)


def plan(duration: float, names: Sequence[str]) -> list[tuple[float, str]]:
    """(seconds after the start, fault): the first at LEAD of the run, the others spread
    evenly until (1 - TAIL), each with an equal share of that span to run in."""
    if not names:
        return []
    step = duration * (1 - LEAD - TAIL) / len(names)
    return [(round(duration * LEAD + k * step, 3), name) for k, name in enumerate(names)]


class Schedule:
    """Injects the faults of ``plan`` one at a time in the background, and keeps their
    records. A fault that would start after (1 - TAIL) of the run, because an earlier one
    overran or the run is stopping, is recorded as skipped (ok=False)."""

    def __init__(
        self,
        cast: Cast,
        duration: float,
        names: Sequence[str],
        options: FaultOptions | None = None,
    ) -> None:
        unknown = [n for n in names if n not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; known: {sorted(FAULTS)}")
        self.cast = cast
        self.duration = duration
        self.plan = plan(duration, names)
        self.options = options or FaultOptions()
        self.records: list[FaultRecord] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[list[FaultRecord]] | None = None

    def start(self) -> asyncio.Task[list[FaultRecord]]:
        self._task = asyncio.create_task(self.run())
        return self._task

    async def run(self) -> list[FaultRecord]:
        began = time.monotonic()
        last_start = self.duration * (1 - TAIL)
        for at, name in self.plan:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, began + at - time.monotonic()))
            late = time.monotonic() - began > last_start
            if self._stop.is_set() or late:
                why = "the run is stopping" if self._stop.is_set() else "no time left in the run"
                now = time.time()
                self.records.append(FaultRecord(name, now, now, None, {"skipped": why}, False))
                continue
            self.records.append(await inject(name, self.cast, self.options))
        return self.records

    async def stop(self, grace: float = 60.0) -> list[FaultRecord]:
        """No new fault; the one in progress gets ``grace`` seconds to recover (then it is
        cancelled, and its ``finally`` restarts or thaws what it stopped)."""
        self._stop.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=grace)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        return self.records
