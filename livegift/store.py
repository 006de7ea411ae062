"""The data store: one Redis or a Redis Cluster, reached one way.

``REDIS_URL`` may name a single server or any node of a Redis Cluster. :func:`connect`
asks that node (``INFO cluster`` → ``cluster_enabled``) and builds the matching client:
redis-py's async ``RedisCluster`` (which learns the other nodes and which slots each
serves, and follows MOVED/ASK), or a plain ``Redis`` on a ``BlockingConnectionPool``
that waits for a free connection at the cap. Every part of the server, the CLI and the
reconcile talks to the store through a client made here; everything else only asks
:func:`is_cluster` or :func:`node_for` when it must send to one node itself (the gift
``Pipeliner``, the pub/sub connections of :mod:`livegift.broker`).

Keys spread over the masters by partition (:mod:`livegift.keys`); :func:`replicas` says
how many replicas each money write waits for (:mod:`livegift.pipeline`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

import redis
import redis.cluster
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from livegift import keys

# A store client of either kind (the type the rest of the code passes around).
Store = Redis | RedisCluster

# How long a cluster command may take before it counts as failed. A hung master (no
# answer at all) must become an `unavailable` ack, not a socket that waits forever.
CLUSTER_SOCKET_TIMEOUT: Final = 5.0
CLUSTER_CONNECT_TIMEOUT: Final = 2.0
# redis-py retries MOVED-after-failover, CLUSTERDOWN and connection errors itself,
# refreshing the slot map between tries; a few short tries, then the caller answers
# `unavailable` and the client retries with the same req (scripts are idempotent).
CLUSTER_RETRIES: Final = 2
# /healthz waits at most this long for a keyed read on every master, made in every
# HEALTH_STRIDE-th partition (partitions are spread evenly over the slots).
HEALTH_TIMEOUT: Final = 2.0
HEALTH_STRIDE: Final = 16
PROBE_TIMEOUT: Final = 5.0


# Connections a cluster client may open to one node beyond its command limit, for the
# pipelines that take connections of their own (liveliness presence, entry reads).
PIPELINE_HEADROOM: Final = 32


class Cluster(RedisCluster):
    """redis-py's ``RedisCluster`` whose commands wait for one of ``max_connections``
    slots instead of failing: its nodes raise ``MaxConnectionsError`` at their cap
    (where the single server's ``BlockingConnectionPool`` waits), and redis-py answers
    that error by dropping every connection and refreshing the slot map."""

    gate: asyncio.Semaphore

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.gate:
            return await super().execute_command(*args, **kwargs)


def _cluster_enabled(info: dict[str, Any]) -> bool:
    return int(info.get("cluster_enabled", 0) or 0) == 1


async def probe(url: str) -> bool:
    """Whether the node ``url`` names is part of a Redis Cluster."""
    client = Redis.from_url(url, socket_timeout=PROBE_TIMEOUT, socket_connect_timeout=PROBE_TIMEOUT)
    try:
        return _cluster_enabled(await client.info("cluster"))
    finally:
        await client.aclose()


def probe_sync(url: str) -> bool:
    client = redis.Redis.from_url(
        url, socket_timeout=PROBE_TIMEOUT, socket_connect_timeout=PROBE_TIMEOUT
    )
    try:
        return _cluster_enabled(client.info("cluster"))
    finally:
        client.close()


def _retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), CLUSTER_RETRIES)


async def connect(url: str, max_connections: int) -> Store:
    """The client for ``url``: a cluster client if the node is in a cluster."""
    if not await probe(url):
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=10, health_check_interval=30
        )
        return Redis(connection_pool=pool)
    cluster = Cluster.from_url(
        url,
        max_connections=max_connections + PIPELINE_HEADROOM,
        retry=_retry(),
        socket_timeout=CLUSTER_SOCKET_TIMEOUT,
        socket_connect_timeout=CLUSTER_CONNECT_TIMEOUT,
        health_check_interval=30,
    )
    assert isinstance(cluster, Cluster)
    cluster.gate = asyncio.Semaphore(max_connections)
    await cluster.initialize()
    return cluster


def connect_sync(url: str) -> redis.Redis | redis.cluster.RedisCluster:
    """A blocking client for ``url`` (the CLI, reconcile), a cluster client if need be."""
    if not probe_sync(url):
        return redis.Redis.from_url(url)
    return redis.cluster.RedisCluster.from_url(
        url,
        retry=_retry(),
        socket_timeout=CLUSTER_SOCKET_TIMEOUT * 6,  # reconcile reads big batches
        socket_connect_timeout=CLUSTER_CONNECT_TIMEOUT,
    )


def is_cluster(client: Any) -> bool:
    return isinstance(client, (RedisCluster, redis.cluster.RedisCluster))


def gate(client: RedisCluster) -> contextlib.AbstractAsyncContextManager[Any]:
    """One of the client's command slots (a ``Cluster``'s; none for another client)."""
    return client.gate if isinstance(client, Cluster) else contextlib.nullcontext()


def node_for(client: RedisCluster, key: str) -> ClusterNode:
    """The master that serves ``key``'s slot, as the client knows it now."""
    node = client.get_node_from_key(key)
    if node is None:  # pragma: no cover - get_node_from_key raises instead
        raise redis_errors.SlotNotCoveredError(f"no node serves {key!r}")
    return node


class Refresher:
    """Refreshes a cluster client's slot map, once at a time, after a redirect or a
    failure seen outside redis-py's own command path (our hand-sent batches)."""

    def __init__(self, client: RedisCluster) -> None:
        self.client = client
        self._task: asyncio.Task[None] | None = None

    def __call__(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        # A failure here (cluster still down) is fine: the next error asks again.
        with contextlib.suppress(Exception):
            await self.client.nodes_manager.initialize()


async def ping(client: Store) -> None:
    """Raise unless the store answers; on a cluster, a keyed read in partitions spread
    over every slot range (so a cluster that is down, or a master mid-failover, fails it)."""
    if not is_cluster(client):
        await client.ping()
        return
    reads = [client.exists(keys.sync(p)) for p in range(0, keys.PARTITIONS, HEALTH_STRIDE)]
    try:
        await asyncio.wait_for(asyncio.gather(*reads), HEALTH_TIMEOUT)
    except TimeoutError:
        raise redis_errors.TimeoutError("a master of the data store did not answer") from None


async def replicas(client: Store, wanted: int) -> int:
    """How many replicas each money write waits for: ``wanted``, or with -1 the fewest
    that any master has now (0 on a store without replicas)."""
    if wanted >= 0:
        return wanted
    if not is_cluster(client):
        info = await client.info("replication")
        return int(info.get("connected_slaves", 0) or 0) and 1
    assert isinstance(client, RedisCluster)
    counts = []
    for node in client.get_primaries():
        info = await client.info("replication", target_nodes=node)
        counts.append(int(info.get("connected_slaves", 0) or 0))
    return min(counts, default=0) and 1
