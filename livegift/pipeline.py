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
import math
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript

from livegift import store
from livegift.scripts import NotReplicated

# hiredis's stub types the command as a 1-tuple; it takes any tuple of str, int, bytes.
_pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)

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


class Pipeliner:
    """Sends script calls as one pipeline per master, one pipeline in flight to each
    master at a time: calls made while it is out wait and go together in the next one
    (group commit). Under load a batch then grows with the round trip, so that thousands
    of concurrent gifts cost a few round trips, pool checkouts and, on the store, a few
    AOF fsyncs (``appendfsync always``: one per event-loop turn that wrote) instead of one
    each; an idle process still sends a lone call at once. One at a time also keeps
    order: a master runs the calls in the order they were made, and they are answered in
    that order (one socket's back-to-back gifts get their seqs in the order sent: two
    pipelines in flight on two connections may run in either order).

    Each call still runs as its own atomic script, and each caller gets its
    own result or error (redis-py's exceptions: map them with ``store_errors``). A
    pipeline that fails in transit fails all its callers; they retry with the same
    ``req`` and the scripts' idempotency makes that safe. ``replicas`` > 0 ends every
    write with a WAIT for that many replicas, at most ``wait_ms``.
    """

    def __init__(self, redis: Any, replicas: int = 0, wait_ms: int = 1000) -> None:
        self.redis = redis
        self.replicas = replicas
        self.wait_ms = wait_ms
        # Per master (its node name; '' for a single Redis): calls not sent yet, and
        # whether a batch is in flight.
        self.pending: dict[str, list[_Call]] = {}
        self.busy: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
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
                assert self._refresh is not None
                self._refresh()
                return future
        queue = self.pending.setdefault(target, [])
        if not queue and target not in self.busy:
            loop.call_soon(self._send, target)
        queue.append((script, keys_, args, future))
        return future

    def _send(self, target: str) -> None:
        if target in self.busy:
            return  # sent when the batch in flight comes back
        batch = self.pending.pop(target, None)
        if not batch:
            return
        self.busy.add(target)
        task = asyncio.get_running_loop().create_task(self._run(target, batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, target: str, batch: list[_Call]) -> None:
        try:
            await self._answer(batch)
        finally:
            self.busy.discard(target)
            if self.pending.get(target):
                # After this turn, so that the calls this batch's answers cause (a gift's
                # landing after its debit) join the next batch.
                asyncio.get_running_loop().call_soon(self._send, target)

    async def _answer(self, batch: list[_Call]) -> None:
        try:
            if self._refresh is None:
                results = await self._pipeline(batch)
            else:
                results = await self._cluster_pipeline(batch)
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            results = [exc] * len(batch)
        except OSError as exc:
            results = [redis_errors.ConnectionError(str(exc))] * len(batch)
        except BaseException as exc:
            # Never leave a caller waiting: fail them all, then let the error go on.
            for *_, future in batch:
                if not future.done():
                    future.set_exception(redis_errors.ConnectionError(f"batch failed: {exc!r}"))
            raise
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        try:
            return await self._exchange(conn, batch)
        finally:
            await pool.release(conn)

    async def _cluster_pipeline(self, batch: list[_Call]) -> list[Any]:
        """One write per master: each call goes to the master of its keys' slot."""
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        results: list[Any] = [None] * len(batch)
        for i, (_, keys_, _, _) in enumerate(batch):
            try:
                node = store.node_for(self.redis, keys_[0])
            except redis_errors.RedisClusterException as exc:
                results[i] = exc
                continue
            groups.setdefault(node.name, (node, []))[1].append(i)
        outcomes = await asyncio.gather(
            *(self._to_node(node, [batch[i] for i in idx]) for node, idx in groups.values()),
            return_exceptions=True,
        )
        for (_, idx), outcome in zip(groups.values(), outcomes, strict=True):
            for n, i in enumerate(idx):
                results[i] = outcome if isinstance(outcome, BaseException) else outcome[n]
        if any(isinstance(r, (_REROUTE, redis_errors.ConnectionError, redis_errors.TimeoutError,
                              redis_errors.RedisClusterException)) for r in results):  # fmt: skip
            assert self._refresh is not None
            self._refresh()
        return results

    async def _to_node(self, node: ClusterNode, batch: list[_Call]) -> list[Any]:
        # One of the client's command slots (livegift.store.Cluster), so that this
        # connection is never the one past the node's cap.
        async with store.gate(self.redis):
            conn = node.acquire_connection()
            try:
                return await self._exchange(conn, batch)
            finally:
                node.release(conn)

    async def _exchange(self, conn: Any, batch: list[_Call]) -> list[Any]:
        """Send the batch (and the WAIT) in one write; one reply per call, errors as
        values. Calls that met NOSCRIPT are sent again once their scripts are loaded."""
        results = await self._send_batch(conn, batch)
        missing = [i for i, r in enumerate(results) if isinstance(r, redis_errors.NoScriptError)]
        if missing:
            # Scripts are not replicated: a promoted replica or a restarted master has none.
            try:
                for script in {id(batch[i][0]): batch[i][0] for i in missing}.values():
                    await conn.send_command("SCRIPT", "LOAD", script.script)
                    await conn.read_response()
            except BaseException:
                await conn.disconnect()
                raise
            again = await self._send_batch(conn, [batch[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _send_batch(self, conn: Any, batch: list[_Call]) -> list[Any]:
        payload = b"".join(pack_evalsha(s.sha, k, a) for s, k, a, _ in batch)
        if self.replicas:
            payload += pack_wait(self.replicas, self.wait_ms)
        results: list[Any] = []
        try:
            await conn.send_packed_command(payload)
            # One deadline for the whole batch (the connection's socket timeout), not one
            # per reply: read_response's own costs a timer per call.
            async with asyncio.timeout(conn.socket_timeout):
                for _ in batch:
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
            if self.replicas and acked < self.replicas:
                lost = NotReplicated(why)
                results = [r if isinstance(r, BaseException) else lost for r in results]
        except BaseException:
            await conn.disconnect()
            raise
        return results
