"""The state one load run's phases share, and what they measure along the way."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from time import perf_counter_ns
from typing import Any

from . import lgsetup
from .client import Conn, Stats
from .config import RunConfig
from .probes import (
    OtherCpu,
    ServerProbe,
    ServerSample,
    client_cpu,
    per_core_busy,
    system_busy,
    system_softirq,
)
from .profiler import Profiler
from .progress import Progress
from .server import ServerHandle
from .targets import Target


@dataclasses.dataclass
class RunState:
    """What the phases share: the run's set-up, its connections and the result so far."""

    cfg: RunConfig
    handle: ServerHandle
    progress: Progress
    target: Target
    probe: ServerProbe
    secrets: lgsetup.Secrets
    run_id: str
    rooms: list[str]
    gift_id: str  # livegift's gift to send; "" for the peers
    stats: Stats
    result: dict[str, Any]
    viewers: list[Conn] = dataclasses.field(default_factory=list)
    senders: list[Conn] = dataclasses.field(default_factory=list)
    rss_base: ServerSample = (0.0, 0, 0.0, 0)

    @property
    def is_lg(self) -> bool:
        return self.cfg.kind == "livegift"

    @property
    def gifts_total(self) -> int:
        return int(self.cfg.rate * self.cfg.duration)

    @property
    def gifters(self) -> int:
        return max(1, self.cfg.gifters) if self.is_lg else self.cfg.rooms


@dataclasses.dataclass
class Mark:
    """The clock and the CPU counters at one instant: the start or the end of the load."""

    ns: int
    client_cpu: float
    server: ServerSample
    busy: float
    irq: float
    cores: list[float]

    @classmethod
    def take(cls, probe: ServerProbe) -> Mark:
        return cls(
            perf_counter_ns(),
            client_cpu(),
            probe.sample(),
            system_busy(),
            system_softirq(),
            per_core_busy(),
        )


@dataclasses.dataclass
class Window:
    """The measured window, from the first send to the end of the drain."""

    start: Mark
    other: OtherCpu  # CPU of the processes that are not ours, step by step
    profiler: Profiler | None = None
    sampler: asyncio.Task[None] | None = None
    samples: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sending: bool = True
    send_end_ns: int = 0

    def step_other(self, probe: ServerProbe) -> float:
        """Others' CPU so far: ours are this client and the server's and Redis's trees."""
        return self.other.step([os.getpid()], probe.roots())


@dataclasses.dataclass
class Tally:
    """What the viewers got and the senders still wait for, counted when the drain ends."""

    expected: int
    received: int
    closed_early: int
    unacked: int
    per_room: list[dict[str, Any]]
