"""Batching money scripts into pipelines, with a WAIT for a replica after each batch.

:class:`Pipeliner` sends the script calls made in one loop tick as one write per master
(every call's keys share one slot), packed by hand (:func:`pack_evalsha`: every argument
is a str, int or bytes, and redis-py's general packer was a fifth of the server's CPU at
5,000 gifts/s). When the store has replicas, the same write ends with ``WAIT <n> <ms>``
on the same connection: the calls are answered only once a replica has them, so an
acknowledged purchase, gift or payout survives the loss of its master. When too few
replicas confirm in time, each call that succeeded fails with ``NotReplicated``
(``unavailable``); the write did run, and a retry with the same req replays it. Replays
write too (the scripts' ``synced``), so the WAIT after a replay covers the first write.

On a Redis Cluster a MOVED, ASK, TRYAGAIN or CLUSTERDOWN reply, or a failed connection,
fails those callers (``store_errors`` makes it ``unavailable``; nothing ran) and
refreshes the client's slot map for the next batch. A promoted replica or a restarted
master has no scripts: they are loaded on that connection and the calls sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any, cast

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript

from livegift import store
from livegift.scripts import NotReplicated

# hiredis's stub types the command as a 1-tuple; it takes any tuple of str, int, bytes.
_pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)

log = logging.getLogger("livegift.pipeline")

_Call = tuple[AsyncScript, list[str], list[Any], asyncio.Future[Any]]

# Replies after which the client's idea of who serves a slot is stale, or the cluster is
# between owners: fail the call (nothing ran) and refresh the slot map.
_REROUTE = (redis_errors.AskError, redis_errors.TryAgainError, redis_errors.ClusterError)


def pack_evalsha(sha: str, keys_: list[str], args: list[Any]) -> bytes:
    """One EVALSHA command in RESP (hiredis's packer, in C: a third of the cost of packing
    in Python, which was a fifth of the server's CPU at 3,000 gifts/s)."""
    return _pack(("EVALSHA", sha, len(keys_), *keys_, *args))


def pack_wait(replicas: int, timeout_ms: int) -> bytes:
    return _pack(("WAIT", replicas, timeout_ms))


class _Line:
    """One master's connection for money calls: batches are written on it back to back
    and their replies read in order, by one reader task."""

    __slots__ = ("conn", "inflight", "node", "reader", "stack")

    def __init__(self, conn: Any, node: ClusterNode | None, stack: AsyncExitStack) -> None:
        self.conn = conn
        self.node = node  # None: a single Redis (the connection came from its pool)
        self.stack = stack  # what to give back when the line closes (a cluster slot)
        self.inflight: deque[list[_Call]] = deque()  # written, not yet answered, in order
        self.reader: asyncio.Task[None] | None = None


class Pipeliner:
    """Sends script calls as pipelines, one connection per master, at most ``DEPTH``
    batches in flight on it: calls made while those are out wait and go together in the
    next batch (group commit). Under load a batch grows with the round trip, so that
    thousands of concurrent gifts cost a few writes and, on the store, a few AOF fsyncs
    (``appendfsync always``: one per event-loop turn that wrote) instead of one each; an
    idle process still sends a lone call at once. One connection also keeps order: a
    master runs one connection's commands in the order written, so calls run, and are
    answered, in the order they were made (one socket's back-to-back gifts get their seqs
    in the order sent).

    Each call still runs as its own atomic script, and each caller gets its own result or
    error (redis-py's exceptions: map them with ``store_errors``). A connection that fails
    fails every call in flight on it; they retry with the same ``req`` and the scripts'
    idempotency makes that safe. ``replicas`` > 0 ends every batch with a WAIT for that
    many replicas, at most ``wait_ms``.
    """

    DEPTH = 2

    def __init__(self, redis: Any, replicas: int = 0, wait_ms: int = 1000) -> None:
        self.redis = redis
        self.replicas = replicas
        self.wait_ms = wait_ms
        # Per master (its node name; '' for a single Redis): calls not sent yet, and
        # its line.
        self.pending: dict[str, list[_Call]] = {}
        self.lines: dict[str, _Line] = {}
        self.writing: set[str] = set()  # masters with a write under way
        self.tasks: set[asyncio.Task[Any]] = set()
        self._cluster = isinstance(redis, RedisCluster)
        self._refresh = store.Refresher(redis) if self._cluster else None

    def call(self, script: AsyncScript, keys_: list[str], args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        target = ""
        if self._cluster:
            try:
                target = store.node_for(self.redis, keys_[0]).name
            except redis_errors.RedisClusterException as exc:
                future.set_exception(exc)
                self._stale()
                return future
        queue = self.pending.setdefault(target, [])
        if not queue:
            loop.call_soon(self._send, target)
        queue.append((script, keys_, args, future))
        return future

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _stale(self) -> None:
        if self._refresh is not None:
            self._refresh()

    def _send(self, target: str) -> None:
        """Write the master's pending calls as one batch, unless a write is under way or
        ``DEPTH`` batches are in flight (then it runs again when one comes back)."""
        if target in self.writing:
            return
        line = self.lines.get(target)
        if line is not None and len(line.inflight) >= self.DEPTH:
            return
        batch = self.pending.pop(target, None)
        if batch:
            self.writing.add(target)
            self._spawn(self._write(target, batch))

    async def _write(self, target: str, batch: list[_Call]) -> None:
        """The one write under way to this master: batches go out in the order made."""
        try:
            await self._write_batch(target, batch)
        finally:
            self.writing.discard(target)
            if self.pending.get(target):
                asyncio.get_running_loop().call_soon(self._send, target)

    async def _write_batch(self, target: str, batch: list[_Call]) -> None:
        payload = b"".join(pack_evalsha(s.sha, k, a) for s, k, a, _ in batch)
        if self.replicas:
            payload += pack_wait(self.replicas, self.wait_ms)
        for _ in range(3):
            try:
                line = self.lines.get(target) or await self._open(target)
            except (redis_errors.RedisError, redis_errors.RedisClusterException, OSError) as exc:
                log.warning("money calls to %s: no connection (%r)", target or "redis", exc)
                _fail(batch, exc)
                self._stale()
                return
            if self.lines.get(target) is not line:
                continue  # it went idle or broke meanwhile; nothing of this was sent
            line.inflight.append(batch)
            if line.reader is None:
                line.reader = asyncio.get_running_loop().create_task(self._read(target, line))
            try:
                await line.conn.send_packed_command(payload, check_health=False)
            except BaseException as exc:
                await self._break(target, line, exc)
                if not isinstance(exc, Exception):
                    raise
            return
        _fail(batch, redis_errors.ConnectionError("no connection to the data store"))

    async def _open(self, target: str) -> _Line:
        """The master's line, made on first use (a connection of its own)."""
        stack = AsyncExitStack()
        node: ClusterNode | None = None
        try:
            if self._cluster:
                node = self.redis.get_node(node_name=target)
                if node is None:
                    raise redis_errors.ConnectionError(f"no node {target} in the slot map")
                # One of the client's command slots (livegift.store.Cluster), held while
                # the line lives, so that this connection is never the one past the cap.
                await stack.enter_async_context(store.gate(self.redis))
                conn = node.acquire_connection()
                stack.callback(node.release, conn)
            else:
                pool = self.redis.connection_pool
                conn = await pool.get_connection()
                stack.push_async_callback(pool.release, conn)
            if not conn.is_connected:
                await conn.connect()
        except BaseException:
            await stack.aclose()
            raise
        if target in self.lines:  # another write opened one meanwhile: use it
            await stack.aclose()
            return self.lines[target]
        line = self.lines[target] = _Line(conn, node, stack)
        return line

    async def _read(self, target: str, line: _Line) -> None:
        """Read the line's replies, batch after batch, and answer the callers. Once none
        is in flight, the line closes: its connection goes back to the pool, which checks
        it before the next use (the store may have restarted while it sat idle)."""
        try:
            while line.inflight:
                batch = line.inflight[0]
                results = await self._replies(line.conn, len(batch))
                line.inflight.popleft()
                self._answer(target, batch, results)
                if self.pending.get(target):
                    # After this turn, so that the calls these answers cause (a gift's
                    # landing after its debit) join the next batch.
                    asyncio.get_running_loop().call_soon(self._send, target)
        except BaseException as exc:
            line.reader = None
            await self._break(target, line, exc)
            if not isinstance(exc, Exception):
                raise
            return
        line.reader = None
        if self.lines.get(target) is line:
            del self.lines[target]
            await line.stack.aclose()

    async def _replies(self, conn: Any, n: int) -> list[Any]:
        """One batch's replies (errors as values), then its WAIT's verdict."""
        results: list[Any] = []
        # One deadline for the whole batch (the connection's socket timeout), not one per
        # reply: read_response's own costs a timer per call.
        async with asyncio.timeout(conn.socket_timeout):
            for _ in range(n):
                try:
                    results.append(await conn.read_response(timeout=math.inf))
                except redis_errors.ResponseError as exc:
                    results.append(exc)
            if self.replicas:
                try:
                    acked = int(await conn.read_response(timeout=math.inf))
                    why = f"{acked} of {self.replicas} replicas in {self.wait_ms} ms"
                except redis_errors.ResponseError as exc:  # the node became a replica
                    acked, why = -1, str(exc)
                if acked < self.replicas:
                    lost = NotReplicated(why)
                    results = [r if isinstance(r, BaseException) else lost for r in results]
        return results

    def _answer(self, target: str, batch: list[_Call], results: list[Any]) -> None:
        missing: list[_Call] = []
        for call, result in zip(batch, results, strict=True):
            future = call[3]
            if future.done():
                continue
            if isinstance(result, redis_errors.NoScriptError):
                missing.append(call)
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if any(isinstance(r, _REROUTE) for r in results):
            self._stale()
        if missing:
            self._spawn(self._load_and_resend(target, missing))

    async def _load_and_resend(self, target: str, calls: list[_Call]) -> None:
        """Scripts are not replicated: a promoted replica or a restarted master has none.
        Load them there, then send the calls again (in a later batch)."""
        try:
            for script in {id(c[0]): c[0] for c in calls}.values():
                if self._cluster:
                    node = self.redis.get_node(node_name=target)
                    await self.redis.execute_command(
                        "SCRIPT LOAD", script.script, target_nodes=node
                    )
                else:
                    await self.redis.script_load(script.script)
        except (redis_errors.RedisError, redis_errors.RedisClusterException, OSError) as exc:
            _fail(calls, exc)
            return
        queue = self.pending.setdefault(target, [])
        if not queue:
            asyncio.get_running_loop().call_soon(self._send, target)
        queue.extend(calls)

    async def _break(self, target: str, line: _Line, exc: BaseException) -> None:
        """The line failed: every call in flight on it fails, and the next batch opens a
        new one (on whichever node then serves the slot)."""
        if self.lines.get(target) is line:
            del self.lines[target]
        log.warning("money connection to %s failed: %r", target or "redis", exc)
        if not isinstance(exc, redis_errors.RedisError):
            exc = redis_errors.ConnectionError(f"money connection failed: {exc!r}")
        while line.inflight:
            _fail(line.inflight.popleft(), exc)
        if line.reader is not None and line.reader is not asyncio.current_task():
            line.reader.cancel()
        with contextlib.suppress(Exception):
            await line.conn.disconnect()
        with contextlib.suppress(Exception):
            await line.stack.aclose()
        self._stale()
        if self.pending.get(target):
            asyncio.get_running_loop().call_soon(self._send, target)


def _fail(batch: list[_Call], exc: BaseException) -> None:
    for *_, future in batch:
        if not future.done():
            future.set_exception(exc)
