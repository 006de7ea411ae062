"""The process's long-lived resources, created in the app's lifespan and nowhere else."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from livegift import keys
from livegift.broker import Broker
from livegift.catalog import Catalog, default_catalog
from livegift.config import Settings
from livegift.hub import Hub
from livegift.ledger import Ledger

PRESENCE_TTL_MS = 6000
log = logging.getLogger("livegift")


def connect(url: str, max_connections: int) -> Redis:
    """A client whose pool waits for a free connection instead of failing at the cap."""
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=10, health_check_interval=30
    )
    return Redis(connection_pool=pool)


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    redis: Redis
    ledger: Ledger
    hub: Hub
    # Connections served by livegift.api.fastws (pinged by one timer per process).
    sockets: set[Any] = field(default_factory=set)
    keepalive_task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings) -> Services:
        if not settings.redis_url:
            raise RuntimeError("REDIS_URL is not set (livegift serve sets it for you)")
        redis = connect(settings.redis_url, settings.redis_max_connections)
        catalog = default_catalog()
        ledger = Ledger(redis, settings, catalog)
        try:
            await ledger.load_scripts()
        except (OSError, RedisError) as exc:
            # Not fatal: scripts load themselves on first use once Redis is reachable.
            log.warning("could not preload Lua scripts: %s", exc)
        pubsub_redis = Redis.from_url(settings.redis_url)
        hub = Hub(
            lambda on_message, on_reconnect: Broker(pubsub_redis, on_message, on_reconnect),
            batch_ms=settings.batch_ms,
            max_batch_ms=settings.max_batch_ms,
        )
        services = cls(settings, catalog, redis, ledger, hub)
        await hub.start(top=services.top, presence=services.presence)
        services.keepalive_task = asyncio.get_running_loop().create_task(services._keepalive())
        return services

    async def _keepalive(self, interval: float = 20.0) -> None:
        while True:
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            for sock in list(self.sockets):
                sock.keepalive(now, interval)

    async def close(self) -> None:
        if self.keepalive_task is not None:
            self.keepalive_task.cancel()
        self.hub.drain()
        await self.hub.close()
        await self.redis.aclose()

    async def top(self, room: str) -> list[dict[str, Any]]:
        return [
            {"user": {"id": uid, "name": name}, "coins": coins}
            for uid, name, coins in await self.ledger.top(room)
        ]

    async def presence(self, counts: dict[str, int]) -> dict[str, int]:
        """Publish this process's member counts; return each room's total over processes."""
        now = int(time.time() * 1000)
        me = self.hub.process_id
        async with self.redis.pipeline(transaction=False) as pipe:
            for room, count in counts.items():
                pipe.hset(keys.presence(room), me, f"{count}:{now}")
                pipe.pexpire(keys.presence(room), PRESENCE_TTL_MS * 2)
                pipe.hgetall(keys.presence(room))
            results = await pipe.execute()
        totals: dict[str, int] = {}
        for i, room in enumerate(counts):
            totals[room] = _sum_fresh(results[i * 3 + 2], now)
        return totals

    async def viewers(self, room: str) -> int:
        raw = await self.redis.hgetall(keys.presence(room))
        return _sum_fresh(raw, int(time.time() * 1000))


def _sum_fresh(raw: Any, now: int) -> int:
    total = 0
    for value in raw.values():
        count, _, ts = value.partition(b":")
        if now - int(ts or 0) <= PRESENCE_TTL_MS:
            total += int(count)
    return total
