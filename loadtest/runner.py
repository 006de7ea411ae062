"""One load run: set up, connect, send at a rate, drain, measure, reconcile.

The phases are in ``phases.py`` (the state they share in ``state.py``), what they measured
becomes the result in ``results.py``; the server is started or found in ``server.py``, the
machine probes are in ``probes.py`` and the py-spy helpers in ``profiler.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import resource
import time
from pathlib import Path
from typing import Any

from . import phases, probes, procs, rcluster, results
from .config import RunConfig
from .progress import Progress
from .server import ServerHandle, run_reconcile, start_server

__all__ = ["Progress", "RunConfig", "raise_nofile", "run", "run_async"]

OwnRedis = procs.Spawned | rcluster.SpawnedCluster  # a data store started for this run


def raise_nofile(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def run_async(
    cfg: RunConfig,
    handle: ServerHandle,
    progress: Progress,
    cluster: rcluster.SpawnedCluster | None = None,
) -> dict[str, Any]:
    """The phases of one run against a server that is up; the result, without reconcile.

    With a cluster, each node's counters are read just before the first send and just
    after the drain: the same window as the rest of the figures."""
    st = await phases.set_up(cfg, handle, progress)
    await phases.connect_viewers(st)
    await phases.measure_idle(st)
    await phases.connect_senders(st)
    before = cluster.snapshot() if cluster is not None else None
    window = await phases.send_load(st)
    end = await phases.drain(st, window)
    after = cluster.snapshot() if cluster is not None else None
    tally = await phases.close(st)
    result = results.collect(st, window, end, tally)
    if cluster is not None and before is not None and after is not None:
        result["redis_cluster"] = {
            **cluster.describe(),
            **rcluster.summarise(before, after, st.stats.ack_ok),
        }
    return result


def start_processes(
    cfg: RunConfig, log_dir: Path
) -> tuple[RunConfig, ServerHandle, OwnRedis | None]:
    """The server (spawned or found) and, when wanted, a Redis (or a cluster) of our own."""
    own_redis: OwnRedis | None = None
    if cfg.cluster_masters:
        if not cfg.spawn or cfg.redis_url or cfg.kind != "livegift":
            raise SystemExit("--cluster-masters goes with --spawn, livegift and no --redis-url")
        own_redis = rcluster.SpawnedCluster(cfg.cluster_masters, cfg.redis_cpus, cfg.cluster_fsync)
        cfg = dataclasses.replace(cfg, redis_url=own_redis.url, redis_pids=tuple(own_redis.pids()))
    elif cfg.spawn and not cfg.redis_url and (cfg.kind != "livegift" or cfg.redis_cpus):
        own_redis, url = procs.start_redis(cfg.redis_cpus or cfg.server_cpus, log_dir)
        cfg = dataclasses.replace(cfg, redis_url=url, redis_pid=own_redis.pid)
    try:
        handle = start_server(cfg, log_dir)
    except BaseException:
        if own_redis is not None:
            own_redis.stop()
        raise
    return cfg, handle, own_redis


def run_phases(
    cfg: RunConfig,
    handle: ServerHandle,
    progress: Progress,
    cluster: rcluster.SpawnedCluster | None = None,
) -> dict[str, Any]:
    try:
        import uvloop

        return uvloop.run(run_async(cfg, handle, progress, cluster))
    except ImportError:
        return asyncio.run(run_async(cfg, handle, progress, cluster))


def reconcile_and_stop(
    cfg: RunConfig, handle: ServerHandle, own_redis: OwnRedis | None, result: dict[str, Any]
) -> None:
    """Reconcile the books against the live data store, then stop what was started."""
    if cfg.kind == "livegift" and cfg.reconcile:
        # Against the live data store, before the server (and its Redis) stop.
        result["reconcile"] = run_reconcile(handle.env)
    if handle.spawned is not None:
        if handle.spawned.proc.poll() is not None:
            result["server_exit_code"] = handle.spawned.proc.returncode
            result["server_log_tail"] = handle.spawned.tail(40)
        handle.spawned.stop()
        result["server_log"] = str(handle.spawned.log_path)
    if own_redis is not None:
        own_redis.stop()


def write_result(cfg: RunConfig, result: dict[str, Any], path: Path) -> dict[str, Any]:
    from . import report

    if cfg.plot and "series" in result:
        try:
            result["plot"] = str(report.plot_run(result, path.with_suffix(".png")))
        except Exception as e:  # the plot is a convenience; the JSON is the record
            result["plot_error"] = f"{type(e).__name__}: {e}"
    report.write_json(result, path)
    result["json"] = str(path)
    return result


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run one load test, write its JSON (and plot) and return the result."""
    nofile = raise_nofile()
    if cfg.viewers + cfg.gifters + 64 > nofile:
        raise SystemExit(f"RLIMIT_NOFILE is {nofile}: too low for {cfg.viewers} viewers")
    cfg.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.label or f"{cfg.kind}-v{cfg.viewers}-r{cfg.rooms}-g{cfg.gifters}-rate{cfg.rate:g}"
    progress = Progress(cfg.progress)
    idle_wait = probes.wait_machine_idle(cfg.wait_idle) if cfg.wait_idle > 0 else None
    cfg, handle, own_redis = start_processes(cfg, cfg.out / "logs")
    result: dict[str, Any] = {
        "tool": "livegift-loadtest",
        "kind": cfg.kind,
        "label": name,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(cfg).items()
            if k not in ("secret", "payment_secret")
        },
        "machine": probes.machine_info(),
    }
    if idle_wait is not None:
        result["machine"]["wait_idle"] = idle_wait
    try:
        cluster = own_redis if isinstance(own_redis, rcluster.SpawnedCluster) else None
        result.update(run_phases(cfg, handle, progress, cluster))
    except Exception as e:
        result["failed"] = f"{type(e).__name__}: {e}"
        if handle.spawned is not None:
            result["server_log_tail"] = handle.spawned.tail(40)
    finally:
        progress.close()
        reconcile_and_stop(cfg, handle, own_redis, result)
    return write_result(cfg, result, cfg.out / f"{stamp}-{name}.json")
