"""The load tool's "other processes" CPU figure, computed from made-up process snapshots.

Pure: no server, no sockets, no real /proc. The figure used to be system busy minus our
processes, two totals from different kernel accounting, and went below zero; it is now
the sum of what each other process used, step by step, so it cannot.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from loadtest.probes import OtherCpu, ProcCpu, Snapshot, other_cpu_used, tree_pids

CLIENT, SERVER, WORKER, REDIS = 100, 200, 201, 300
KTHREADD, KSOFTIRQD, EDITOR, TESTS = 2, 12, 400, 500


def snap(**cpu: float) -> Snapshot:
    """A snapshot of the processes named in ``cpu`` (the others are absent: not started
    yet, or exited), each keyed by (pid, start time)."""
    table = {
        "client": (CLIENT, 1, 10.0),
        "server": (SERVER, CLIENT, 11.0),
        "worker": (WORKER, SERVER, 12.0),
        "redis": (REDIS, CLIENT, 13.0),
        "ksoftirqd": (KSOFTIRQD, KTHREADD, 0.5),
        "editor": (EDITOR, 1, 5.0),
        "tests": (TESTS, 1, 20.0),
        "tests_again": (TESTS, 1, 21.0),  # the same pid, handed out again to a new process
    }
    out: Snapshot = {}
    for name, used in cpu.items():
        pid, ppid, started = table[name]
        out[(pid, started)] = ProcCpu(ppid, ppid == KTHREADD, used)
    return out


def test_tree_pids_follows_children_but_not_parents() -> None:
    s = snap(client=1, server=1, worker=1, redis=1, editor=1)
    assert tree_pids(s, [SERVER]) == {SERVER, WORKER}
    assert tree_pids(s, [SERVER, REDIS]) == {SERVER, WORKER, REDIS}
    assert tree_pids(s, []) == set()


def test_other_cpu_used_counts_only_others_and_never_negative() -> None:
    before = snap(client=5, server=10, ksoftirqd=1, editor=3, tests=50)
    # The tests process exited and its pid was reused; a server worker started; the
    # editor used nothing.
    after = snap(client=6, server=12, worker=0.7, ksoftirqd=1.4, editor=3, tests_again=0.2)
    ours = {CLIENT} | tree_pids(after, [SERVER])
    used = other_cpu_used(before, after, ours)
    assert used == {(KSOFTIRQD, 0.5): 1.4 - 1, (TESTS, 21.0): 0.2}
    assert all(v > 0 for v in used.values())


def scripted(snaps: list[Snapshot]) -> Iterator[Snapshot]:
    return iter(snaps)


def test_running_total_never_decreases_when_processes_exit() -> None:
    """On a shared machine programs start, burn CPU and exit between samples; a total
    recomputed against the first snapshot would drop when they go, and the plotted step
    (the difference of two totals) would be negative. Kept step by step it cannot drop."""
    steps = [
        snap(client=0, server=0, ksoftirqd=0, editor=1),
        snap(client=0.3, server=0.6, ksoftirqd=0.1, editor=1, tests=0.4),
        snap(client=0.6, server=1.2, ksoftirqd=0.2, editor=1.1),  # tests exited
        snap(client=0.9, server=1.8, worker=0.2, ksoftirqd=0.2, editor=1.1, tests_again=0.3),
    ]
    source = scripted(steps)
    other = OtherCpu(lambda: next(source))
    totals = [other.step([CLIENT], [SERVER]) for _ in steps[1:]]
    assert all(b >= a for a, b in itertools.pairwise([0.0, *totals])), totals
    assert [round(t, 6) for t in totals] == [0.5, 0.7, 1.0]
    assert round(other.kernel, 6) == 0.2  # ksoftirqd
    assert round(other.user, 6) == 0.8  # tests 0.4, the editor 0.1, the new tests 0.3
    assert other.top(2) == [(TESTS, 0.4), (TESTS, 0.3)]


def test_children_of_the_server_are_ours_even_when_they_appear_later() -> None:
    steps = [snap(server=1), snap(server=2, worker=5)]
    source = scripted(steps)
    other = OtherCpu(lambda: next(source))
    assert other.step([CLIENT], [SERVER]) == 0.0
    # Without the server's tree, its new worker's CPU would be the others'.
    source = scripted(steps)
    other = OtherCpu(lambda: next(source))
    assert other.step([CLIENT], []) == 6.0
