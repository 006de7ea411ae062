"""The Valkey Cluster test harness itself (tests/cluster.py): that it comes up whole,
spreads hash tags over the masters, survives a ``kill -9`` of a master by promoting its
replica, and leaves no process behind. Run with ``-s`` to see the measured times."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from tests.cluster import (
    FACTOR,
    SLOTS,
    ClusterError,
    ValkeyCluster,
    valkey_cluster_fixture,  # noqa: F401  (the session fixture `valkey_cluster`)
)

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): look at its state.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_comes_up_with_three_masters_three_replicas_and_every_slot(
    valkey_cluster: ValkeyCluster,
) -> None:
    cluster = valkey_cluster
    print(
        f"\ncluster start-up: {cluster.startup_seconds:.2f}s "
        + str({k: round(v, 2) for k, v in cluster.startup_phases.items()})
    )
    assert cluster.startup_seconds < 20 * FACTOR
    masters, replicas = cluster.masters(), cluster.replicas()
    assert len(masters) == 3 and len(replicas) == 3
    ranges = sorted(r for m in masters for r in m.slots)
    covered = 0
    for (lo, hi), (next_lo, _) in zip(ranges, [*ranges[1:], (SLOTS, SLOTS)], strict=True):
        assert hi + 1 == next_lo, f"gap or overlap after slot {hi}"
        covered += hi - lo + 1
    assert ranges[0][0] == 0 and covered == SLOTS
    assert {r.master_id for r in replicas} == {m.id for m in masters}
    pids = [n.pid for n in masters + replicas]
    assert None not in pids and len(set(pids)) == 6
    assert len(cluster.urls) == 6 and cluster.url in cluster.urls
    for url in cluster.urls:
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            info = client.execute_command("CLUSTER", "INFO")
            text = info if isinstance(info, str) else info.decode()
            assert "cluster_state:ok" in text and f"cluster_slots_ok:{SLOTS}" in text
            assert client.info("cluster")["cluster_enabled"] == 1
        finally:
            client.close()


def test_hash_tags_land_on_different_masters(valkey_cluster: ValkeyCluster) -> None:
    cluster = valkey_cluster
    masters = cluster.masters()
    tags = [cluster.hashtag_for(m) for m in masters]
    assert len(set(tags)) == 3
    client = cluster.client(decode_responses=True)
    try:
        for tag, master in zip(tags, masters, strict=True):
            key = f"harness:{tag}:x"
            assert cluster.master_for_key(key).id == master.id
            assert cluster.master_for_key(f"other:{tag}").id == master.id  # the tag decides
            client.set(key, master.port)
            direct = cluster.node_client(master, decode_responses=True)
            try:
                assert direct.get(key) == str(master.port)  # served here, no MOVED
            finally:
                direct.close()
        # Any other master redirects.
        other = cluster.node_client(masters[1])
        try:
            with pytest.raises(redis.exceptions.MovedError):
                other.get(f"harness:{tags[0]}:x")
        finally:
            other.close()
    finally:
        client.close()


def test_kill_9_of_a_master_promotes_its_replica(valkey_cluster: ValkeyCluster) -> None:
    cluster = valkey_cluster
    victim = cluster.masters()[0]
    replica = cluster.replica_of(victim)
    tag = cluster.hashtag_for(victim)
    client = cluster.client(decode_responses=True)
    try:
        # Written to the master and acknowledged by its replica (WAIT, on the connection
        # that wrote) before the kill, so it must survive the failover.
        before = cluster.node_client(victim, decode_responses=True)
        try:
            before.set(f"{tag}:before", "kept")
            assert before.execute_command("WAIT", 1, 2000) == 1
        finally:
            before.close()
        assert client.get(f"{tag}:before") == "kept"
        killed = cluster.kill_master(0)
        assert killed.id == victim.id and not alive(victim.pid or 0)
        seconds = cluster.wait_failover(killed)
        print(f"\nfailover (kill -9 to cluster ok, replica promoted): {seconds:.2f}s")
        assert seconds < 15 * FACTOR
        promoted = cluster.master_for_key(tag)
        assert promoted.id == replica.id and promoted.port == replica.port

        # Writes to the dead master's slots work again: directly, through a client that
        # knew the old layout, and through a new one.
        direct = cluster.node_client(promoted, decode_responses=True)
        try:
            assert direct.get(f"{tag}:before") == "kept"
            assert direct.incr(f"{tag}:n") == 1
        finally:
            direct.close()
        assert client.incr(f"{tag}:n") == 2
        fresh = cluster.client(decode_responses=True)
        try:
            assert fresh.incr(f"{tag}:n") == 3
        finally:
            fresh.close()

        began = time.monotonic()
        back = cluster.restart(killed)
        print(
            f"restart of the old master until it serves as a replica: {time.monotonic() - began:.2f}s"
        )
        assert back.role == "replica" and back.master_id == promoted.id
        assert len(cluster.masters()) == 3 and len(cluster.replicas()) == 3
    finally:
        client.close()
        cluster.heal()  # leave the session cluster whole, whatever happened


def test_a_frozen_master_is_replaced_and_rejoins_as_a_replica(
    valkey_cluster: ValkeyCluster,
) -> None:
    """SIGSTOP (a hung machine: clients time out rather than being refused)."""
    cluster = valkey_cluster
    try:
        frozen = cluster.freeze(1)
        seconds = cluster.wait_failover(frozen)
        print(f"\nfailover after SIGSTOP of a master: {seconds:.2f}s")
        assert seconds < 15 * FACTOR
        cluster.thaw(frozen)
        cluster.wait_ready()
        back = cluster.node(frozen)
        promoted = next(m for m in cluster.masters() if m.owns(frozen.slots[0][0]))
        assert promoted.id != frozen.id
        assert back.role == "replica" and back.master_id == promoted.id
    finally:
        cluster.heal()


def test_move_slot_takes_the_keys_along(valkey_cluster: ValkeyCluster) -> None:
    cluster = valkey_cluster
    key = "harness:{moved}:k"
    slot = cluster.slot(key)
    source = cluster.master_for_key(key)
    target = next(m for m in cluster.masters() if m.id != source.id)
    client = cluster.client(decode_responses=True)
    try:
        client.set(key, "v")
        cluster.move_slot(slot, target)
        assert cluster.master_for_key(key).id == target.id
        assert client.get(key) == "v"  # the client follows the MOVED
        cluster.move_slot(slot, source)
        assert cluster.master_for_key(key).id == source.id
        assert client.get(key) == "v"
    finally:
        client.close()


def test_stop_kills_every_node_and_removes_the_folder(tmp_path) -> None:
    cluster = ValkeyCluster(root=tmp_path, replicas_per_master=0)
    with pytest.raises(RuntimeError, match="boom"), cluster:
        pids = cluster.pids()
        assert len(pids) == 3
        raise RuntimeError("boom")
    assert wait_dead(pids, 5) == []
    assert cluster.dir is not None and not cluster.dir.exists()
    cluster.stop()  # twice is fine


def test_nodes_die_with_a_killed_test_process(tmp_path) -> None:
    """Even a ``kill -9`` of the process that started the cluster leaves no node."""
    script = (
        "import sys, time\n"
        "from tests.cluster import ValkeyCluster\n"
        f"c = ValkeyCluster(root={str(tmp_path)!r}, replicas_per_master=0).start()\n"
        "print(*c.pids(), flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().decode()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 3 and all(alive(p) for p in pids)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        child.stdout.close()  # type: ignore[union-attr]
    assert wait_dead(pids, 5) == []


def test_a_timeout_says_what_each_node_says(valkey_cluster: ValkeyCluster) -> None:
    with pytest.raises(ClusterError, match="cluster_state"):
        valkey_cluster.wait_ready(timeout=0.2, masters=4)
