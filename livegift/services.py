"""The process's long-lived resources, created in the app's lifespan and nowhere else."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from livegift.admission import Admission
from livegift.broker import Broker
from livegift.catalog import Catalog, default_catalog
from livegift.config import Settings
from livegift.errors import LiveGiftError
from livegift.expiry import Deadlines
from livegift.follow import Following
from livegift.hub import Hub
from livegift.ledger import Ledger
from livegift.liveliness import Liveliness
from livegift.scripts import Scripts
from livegift.store import Store, connect, is_cluster, replicas
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
    sweep_task: asyncio.Task[None] | None = None
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
        try:
            waits = await replicas(redis, settings.wait_replicas)
        except (OSError, RedisError, RedisClusterException) as exc:
            # The store is away: assume the safe answer until a restart asks again.
            waits = 1 if is_cluster(redis) else 0
            log.warning("could not ask the data store for its replicas: %s", exc)
        ledger = Ledger(redis, settings, catalog, scripts, replicas=waits)
        streams = Streams(redis, settings, scripts)
        try:
            await scripts.load()
        except (OSError, RedisError, RedisClusterException) as exc:
            # Not fatal: scripts load themselves on first use once Redis is reachable.
            log.warning("could not preload Lua scripts: %s", exc)
        # Sharded pub/sub on connections of the broker's own, one per master in use;
        # room reads and live events through the store client.
        hub = Hub(
            partial(Broker, redis),
            batch_ms=settings.batch_ms,
            max_batch_ms=settings.max_batch_ms,
            send_limit=settings.send_buffer_limit,
        )
        liveliness = Liveliness(hub, redis, streams.top)
        services = cls(settings, catalog, redis, ledger, streams, hub, liveliness)
        await hub.start()
        liveliness.start()
        loop = asyncio.get_running_loop()
        services.keepalive_task = loop.create_task(services._keepalive())
        services.sweep_task = loop.create_task(services._sweep())
        return services

    async def _sweep(self) -> None:
        """Every sweep_interval (with jitter, so processes spread out), finish the gift
        transfers a crash left between their two steps (livegift.ledger.Ledger.sweep)."""
        s = self.settings
        while True:
            await asyncio.sleep(s.sweep_interval * random.uniform(0.5, 1.5))
            try:
                done = await self.ledger.sweep(s.sweep_age_ms)
            except LiveGiftError as exc:
                log.warning("gift sweep: %s", exc)
                continue
            except Exception:  # never let one bad round stop the sweeping
                log.exception("gift sweep failed")
                continue
            if done:
                log.info("gift sweep finished %d transfer(s) left between their steps", done)

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
        for task in (self.keepalive_task, self.sweep_task):
            if task is not None:
                task.cancel()
        self.hub.drain()
        await self.liveliness.close()
        await self.ledger.aclose()
        await self.hub.close()
        await self.redis.aclose()
