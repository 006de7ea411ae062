"""What one load run is asked to do."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .targets import Kind

try:  # the server's own development defaults, when livegift is importable
    from livegift.config import DEV_PAYMENT_SECRET, DEV_SECRET
except ImportError:  # pragma: no cover - the load tool also runs without the server package
    DEV_SECRET = "dev-secret-change-me"
    DEV_PAYMENT_SECRET = "dev-payment-secret-change-me"


@dataclasses.dataclass
class RunConfig:
    kind: Kind = "livegift"
    url: str | None = None  # an existing server; None with spawn
    spawn: bool = False
    redis_url: str | None = None
    viewers: int = 1000
    rooms: int = 1
    gifters: int = 10
    rate: float = 200.0
    duration: float = 10.0
    drain: float = 10.0
    batch_ms: int | None = None
    workers: int | None = None
    codec: str = "json"
    out: Path = Path("loadtest/results")
    label: str | None = None
    progress: bool = True
    reconcile: bool = True
    server_pid: int | None = None
    redis_pid: int | None = None  # a Redis outside the server's process tree, to measure too
    server_cpus: str | None = None
    redis_cpus: str | None = None  # start a Redis of our own, pinned here (with --spawn)
    redis_pids: tuple[int, ...] = ()  # more Redis processes to measure (a cluster's nodes)
    cluster_masters: int = 0  # with spawn: a Valkey Cluster of N masters + N replicas
    cluster_fsync: str = "always"  # its appendfsync (livegift's redis.conf says always)
    connect_concurrency: int = 200
    connect_timeout: float = 10.0
    connect_budget: float = 180.0
    idle_settle: float = 2.0
    secret: str = dataclasses.field(
        default_factory=lambda: os.environ.get("LIVEGIFT_SECRET", DEV_SECRET)
    )
    payment_secret: str = dataclasses.field(
        default_factory=lambda: os.environ.get("LIVEGIFT_PAYMENT_SECRET", DEV_PAYMENT_SECRET)
    )
    server_env: dict[str, str] = dataclasses.field(default_factory=dict)
    plot: bool = True
    wait_idle: float = 0.0  # wait up to this long for other processes to quiet down
    warm_rooms: bool = False  # join each room's first member alone before the crowd
    profile: bool = False  # py-spy the server during the load phase
