"""The chaos workload (loadtest/chaos/workload.py) against real livegift servers.

Without faults every op must get a definite answer, every member must see its room's
seqs with no gap or duplicate, and the wallets must match the history exactly (so a
purchase replay that credited twice, or a gift acked but not applied, fails here). With
one of two servers killed, or frozen for a few seconds (SIGSTOP: nothing answers, nothing
is refused), the workload must move its sockets and requests to the other and still end
with every op answered once, the wallets right, and every member's seqs contiguous.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter, defaultdict
from collections.abc import Callable

import pytest

from loadtest.chaos.history import Member, Op
from loadtest.chaos.workload import Counters, WorkloadConfig, run_workload
from loadtest.lgsetup import Secrets
from tests.conftest import PAYMENT_SECRET, SECRET, LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

SECRETS = Secrets(token=SECRET, payment=PAYMENT_SECRET)
# Definite refusals a fault-free run may meet: a creator paying out faster than gifts
# come in, or a gifter who spent its coins. Anything else is a bug in one side.
EXPECTED_REFUSALS = {"insufficient_funds", "payout_limit"}


def config(seed: int, redis_url: str | None, duration: float) -> WorkloadConfig:
    # op_timeout and ping_interval are short so that a frozen server is left within the run.
    return WorkloadConfig(
        creators=2,
        viewers_per_room=4,
        gifters_per_room=3,
        rate=150.0,
        gift_weight=0.87,
        purchase_weight=0.08,
        payout_weight=0.05,
        replay_fraction=0.5,
        settle_fraction=0.4,
        duration=duration,
        seed=seed,
        payout_min=1000,
        payout_max=1500,
        op_timeout=3.0,
        ping_interval=1.5,
        drain_seconds=15.0,
        redis_url=redis_url,
        settle_workers=2,
    )


def check_answers(ops: list[Op]) -> None:
    unknown = [op for op in ops if op.outcome == "unknown"]
    assert not unknown, f"{len(unknown)} ops never answered, e.g. {unknown[:3]}"
    refused = Counter(op.code for op in ops if op.outcome == "refused")
    assert set(refused) <= EXPECTED_REFUSALS, refused
    ok = Counter(op.kind for op in ops if op.outcome == "ok")
    assert ok["gift"] >= 300, ok
    assert ok["purchase"] > 0 and ok["payout"] > 0, ok
    assert all(op.attempts >= 1 and op.first_sent > 0 for op in ops)


def check_replays(ops: list[Op]) -> None:
    """Two sends of one receipt answer one transaction, once with its coins."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind == "purchase":
            by_key[op.key].append(op)
    replayed = [group for group in by_key.values() if len(group) == 2]
    assert replayed, "no purchase was replayed"
    for group in replayed:
        assert {op.outcome for op in group} == {"ok"}, group
        assert len({op.result["transaction_id"] for op in group}) == 1, group


def check_members(ops: list[Op], members: list[Member]) -> None:
    """Each member saw every seq from its first, once, in order, up to the last ack."""
    top: dict[str, int] = defaultdict(int)
    seqs: dict[str, list[int]] = defaultdict(list)
    for op in ops:
        if op.kind == "gift" and op.outcome == "ok":
            top[op.args["room"]] = max(top[op.args["room"]], op.result["seq"])
            seqs[op.args["room"]].append(op.result["seq"])
    for room, acked in seqs.items():
        assert len(acked) == len(set(acked)), f"two gifts acked with one seq in {room}"
    assert members
    for m in members:
        assert m.first_seq >= 1
        assert not m.incomplete, m.incomplete
        expected = list(range(m.first_seq, m.first_seq + len(m.seen)))
        assert m.seen == expected, f"{m.member}: gap or duplicate near {_first_bad(m)}"
        assert m.seen and m.seen[-1] >= top[m.room], (m.member, m.seen[-1:], top[m.room])


def _first_bad(m: Member) -> int:
    for i, seq in enumerate(m.seen):
        if seq != m.first_seq + i:
            return seq
    return -1


def check_money(server: LiveServer, ops: list[Op]) -> None:
    """Wallets equal the history: purchases once per receipt, acked gifts, payouts held
    unless settled failed."""
    coins: dict[str, int] = defaultdict(int)
    diamonds: dict[str, int] = defaultdict(int)
    credited: set[str] = set()
    gross = {
        op.result["payout"]: op.result["gross"]
        for op in ops
        if op.kind == "payout" and op.outcome == "ok"
    }
    for op in ops:
        if op.outcome != "ok":
            continue
        if op.kind == "purchase" and op.key not in credited:
            credited.add(op.key)
            coins[op.user] += op.result["coins"]
        elif op.kind == "gift":
            coins[op.user] -= op.args["coins"]
            diamonds[op.args["creator"]] += op.args["coins"]
        elif op.kind == "payout":
            diamonds[op.user] -= op.result["gross"]
        elif op.kind == "settle" and op.args["outcome"] == "failed":
            diamonds[op.user] += gross[op.args["payout"]]
    for user, expected in coins.items():
        wallet = server.get("/api/wallet", token=server.token(user)).json()
        assert wallet["coins"] == expected, (user, wallet, expected)
    for user, expected in diamonds.items():
        wallet = server.get("/api/wallet", token=server.token(user)).json()
        assert wallet["diamonds"] == expected, (user, wallet, expected)


async def test_workload_without_faults(live_server: LiveServer) -> None:
    counters = Counters()
    reports: list[str] = []
    ops, members = await run_workload(
        config(seed=11, redis_url=live_server.redis_url, duration=8.0),
        [live_server.base_url],
        SECRETS,
        asyncio.Event(),
        counters,
        lambda c: reports.append(c.line()),
    )
    check_answers(ops)
    check_replays(ops)
    check_members(ops, members)
    check_money(live_server, ops)
    settles = [op for op in ops if op.kind == "settle"]
    assert settles and all(op.outcome == "ok" for op in settles), settles
    assert len(members) == 8 and all(m.reconnects == 0 for m in members)
    assert counters.sent == len(ops) and counters.ok == len(ops) - counters.refused
    assert reports, "no progress was reported"


async def test_workload_survives_a_killed_server(
    server_factory: Callable[..., LiveServer], redis_url: str
) -> None:
    doomed, survivor = server_factory(), server_factory()
    stop = asyncio.Event()
    counters = Counters()

    async def kill_later() -> None:
        while counters.ok < 400:  # mid-run: after setup and a few hundred answers
            await asyncio.sleep(0.05)
        assert doomed.process is not None
        os.kill(doomed.process.pid, signal.SIGKILL)

    killer = asyncio.create_task(kill_later())
    ops, members = await run_workload(
        config(seed=12, redis_url=None, duration=8.0),
        [doomed.base_url, survivor.base_url],
        SECRETS,
        stop,
        counters,
    )
    assert killer.done() and killer.exception() is None, "the server was never killed"
    check_answers(ops)
    check_members(ops, members)
    check_money(survivor, ops)
    assert sum(m.reconnects for m in members) > 0


async def test_workload_survives_a_frozen_server(
    server_factory: Callable[..., LiveServer], redis_url: str
) -> None:
    """Gifts stuck on a frozen server time out and are resent elsewhere with the same req;
    when the server wakes it runs what it had queued, and nothing may count twice."""
    frozen, survivor = server_factory(), server_factory()
    assert frozen.process is not None
    pid = frozen.process.pid
    counters = Counters()

    async def freeze_later() -> None:
        while counters.ok < 400:
            await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(5.0)
        finally:
            os.kill(pid, signal.SIGCONT)

    freezer = asyncio.create_task(freeze_later())
    try:
        ops, members = await run_workload(
            config(seed=13, redis_url=None, duration=10.0),
            [frozen.base_url, survivor.base_url],
            SECRETS,
            asyncio.Event(),
            counters,
        )
    finally:
        if not freezer.done():
            freezer.cancel()
            os.kill(pid, signal.SIGCONT)
    assert freezer.done() and not freezer.cancelled(), "the server was never frozen"
    check_answers(ops)
    check_members(ops, members)
    check_money(survivor, ops)
    assert counters.timeouts > 0 and any(op.attempts > 1 for op in ops)
