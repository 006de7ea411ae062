"""Batching one script's calls into pipelines, and the RESP packing that sends them.

:class:`Pipeliner` sends the calls made in one loop tick as one write on one pooled
connection; :func:`pack_evalsha` packs each call by hand (every argument is a str, int or
bytes), which costs a fraction of redis-py's general packer on the gift hot path.

On a Redis Cluster the calls are grouped by the master that serves their keys' slot
(each call's keys share one slot) and each group goes to a connection of that master.
A MOVED, ASK, TRYAGAIN or CLUSTERDOWN reply, or a failed connection, fails those callers
(``store_errors`` makes it ``unavailable``; they retry with the same req, which the
scripts' idempotency makes safe) and refreshes the client's slot map for the next batch.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript

from livegift import store

_Call = tuple[list[str], list[Any], asyncio.Future[Any]]

# Replies after which the client's idea of who serves a slot is stale, or the cluster is
# between owners: fail the call (nothing ran) and refresh the slot map.
_REROUTE = (redis_errors.AskError, redis_errors.TryAgainError, redis_errors.ClusterError)


def _bulk(value: str | int | bytes) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack_evalsha(sha: str, keys_: list[str], args: list[Any]) -> bytes:
    """One EVALSHA command in RESP."""
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys_) + len(args)), _bulk(sha),
             _bulk(len(keys_))]  # fmt: skip
    parts += [_bulk(k) for k in keys_]
    parts += [_bulk(a) for a in args]
    return b"".join(parts)


class Pipeliner:
    """Sends the calls of one script made in the same loop tick as one pipeline.

    Thousands of concurrent gifts then cost a few round trips and pool checkouts instead
    of one each. Each call still runs as its own atomic script, and each caller gets its
    own result or error (redis-py's exceptions: map them with ``store_errors``). A
    pipeline that fails in transit fails all its callers; they retry with the same
    ``req`` and the scripts' idempotency makes that safe.
    """

    def __init__(self, redis: Any, script: AsyncScript) -> None:
        self.redis = redis
        self.script = script
        self.pending: list[_Call] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self._refresh = store.Refresher(redis) if isinstance(redis, RedisCluster) else None

    def call(self, keys_: list[str], args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self.pending:
            loop.call_soon(self._send)
        self.pending.append((keys_, args, future))
        return future

    def _send(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, batch: list[_Call]) -> None:
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
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(
                        redis_errors.ConnectionError(f"gift batch failed: {exc!r}")
                    )
            raise
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        # The commands are packed here and sent in one write on one pooled connection;
        # redis-py's general packer was a fifth of the server's CPU at 5,000 gifts/s.
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        try:
            results = await self._exchange(conn, batch)
        finally:
            await pool.release(conn)
        if any(isinstance(r, redis_errors.NoScriptError) for r in results):
            await self._rerun_without_script(batch, results)
        return results

    async def _cluster_pipeline(self, batch: list[_Call]) -> list[Any]:
        """One write per master: each call goes to the master of its keys' slot."""
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        results: list[Any] = [None] * len(batch)
        for i, (keys_, _, _) in enumerate(batch):
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
        if any(isinstance(r, redis_errors.NoScriptError) for r in results):
            # A promoted replica or a restarted master has no scripts (they are not
            # replicated): load on every master, rerun those calls through redis-py.
            await self._rerun_without_script(batch, results)
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
        """Send the batch in one write, read one reply per call (errors as values)."""
        sha = self.script.sha
        payload = b"".join(pack_evalsha(sha, keys_, args) for keys_, args, _ in batch)
        results: list[Any] = []
        try:
            await conn.send_packed_command(payload)
            for _ in batch:
                try:
                    results.append(await conn.read_response())
                except redis_errors.ResponseError as exc:
                    results.append(exc)
        except BaseException:
            await conn.disconnect()
            raise
        return results

    async def _rerun_without_script(self, batch: list[_Call], results: list[Any]) -> None:
        """Redis restarted or failed over without the script: load it, rerun those calls."""
        try:
            await self.redis.script_load(self.script.script)
        except (redis_errors.RedisError, redis_errors.RedisClusterException):
            return  # the calls keep their NOSCRIPT (unavailable); the next batch loads it
        for i, (keys_, args, _) in enumerate(batch):
            if isinstance(results[i], redis_errors.NoScriptError):
                try:
                    results[i] = await self.script(keys=keys_, args=args)
                except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
                    results[i] = exc
