"""The process's long-lived resources, created in the app's lifespan and nowhere else."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from livegift.admission import Admission
from livegift.broker import Broker
from livegift.catalog import Catalog, default_catalog
from livegift.config import Settings
from livegift.expiry import Deadlines
from livegift.follow import Following
from livegift.hub import Hub
from livegift.ledger import Ledger
from livegift.liveliness import Liveliness
from livegift.scripts import Scripts
from livegift.store import Store, connect, is_cluster, subscriber_factory
from livegift.streams import Streams

log = logging.getLogger("livegift")

# Seconds between two looks at the token deadlines of open sockets (livegift.expiry).
EXPIRY_TICK = 1.0


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    # A single Redis or a Redis Cluster (livegift.store).
    redis: Store
    ledger: Ledger
    streams: Streams
    hub: Hub
    liveliness: Liveliness
    # Connections served by livegift.api.fastws (pinged by one timer per process).
    sockets: set[Any] = field(default_factory=set)
    keepalive_task: asyncio.Task[None] | None = None
    # Open connections per user here, and their gift-attempt buckets.
    admission: Admission = field(init=False)
    # When the token of each open socket expires (either driver), swept by _keepalive.
    deadlines: Deadlines = field(default_factory=Deadlines)
    # The creators whose overlays (/ws/creator/{user}) are open here.
    following: Following = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.admission = Admission(s.max_connections_per_user, s.gift_rate, s.gift_burst)
        self.following = Following(self.hub.broker)

    @classmethod
    async def start(cls, settings: Settings) -> Services:
        if not settings.redis_url:
            raise RuntimeError("REDIS_URL is not set (livegift serve sets it for you)")
        redis = await connect(settings.redis_url, settings.redis_max_connections)
        catalog = default_catalog()
        scripts = Scripts(redis)
        ledger = Ledger(redis, settings, catalog, scripts)
        streams = Streams(redis, settings, scripts)
        try:
            await scripts.load()
        except (OSError, RedisError, RedisClusterException) as exc:
            # Not fatal: scripts load themselves on first use once Redis is reachable.
            log.warning("could not preload Lua scripts: %s", exc)
        # Pub/sub: on one server a plain client of its own (which also reads room seqs and
        # history); on a cluster a plain client to one node at a time (another after a
        # loss), with room reads through the cluster client.
        if is_cluster(redis):
            subscriber = subscriber_factory(redis, settings.redis_url)
            broker = partial(Broker, redis, subscriber=subscriber)
        else:
            broker = partial(Broker, Redis.from_url(settings.redis_url))
        hub = Hub(
            broker,
            batch_ms=settings.batch_ms,
            max_batch_ms=settings.max_batch_ms,
            send_limit=settings.send_buffer_limit,
        )
        liveliness = Liveliness(hub, redis, streams.top)
        services = cls(settings, catalog, redis, ledger, streams, hub, liveliness)
        await hub.start()
        liveliness.start()
        services.keepalive_task = asyncio.get_running_loop().create_task(services._keepalive())
        return services

    async def _keepalive(self) -> None:
        """Every EXPIRY_TICK, close the sockets whose token expired (both drivers); every
        ping_interval/2, ping idle sockets of livegift.api.fastws (uvicorn pings its own)."""
        interval = self.settings.ping_interval
        next_ping = time.monotonic() + interval / 2
        while True:
            await asyncio.sleep(EXPIRY_TICK)
            for connection in self.deadlines.due(time.time()):
                try:
                    connection.expire()
                except Exception:
                    log.exception("closing a socket whose token expired failed")
            now = time.monotonic()
            if now < next_ping:
                continue
            next_ping = now + interval / 2
            for sock in list(self.sockets):
                sock.keepalive(now, interval)

    async def close(self) -> None:
        if self.keepalive_task is not None:
            self.keepalive_task.cancel()
        self.hub.drain()
        await self.liveliness.close()
        await self.hub.close()
        await self.redis.aclose()
