"""The chaos run's money workload: gifts over WebSockets, purchases, payouts and settles.

``run_workload`` drives a bounded mixed workload against several ``livegift serve``
processes sharing one data store, and returns what it sent and heard as the history
(``history.Op`` / ``history.Member``) the checker judges. It must keep telling the truth
while faults are injected, so the rules that matter are these:

- An op is ``ok`` or ``refused`` only on a definite answer. ``unavailable``/``internal``,
  5xx, timeouts, dropped or closed sockets are not answers: the op is resent with the
  SAME key (gift ``req``, receipt, ``Idempotency-Key``, payout id) until one comes or the
  run ends, and then stays ``unknown``. An op never written to the wire is left out.
- A viewer records every durable seq it receives, live or replayed, across reconnects,
  and comes back with ``since`` = the last seq it saw, so the checker can find gaps and
  duplicates. Its first entitled seq is its first ``welcome``'s seq + 1.

Cost: one task per socket session (reader) plus one writer per session, a handful of
fixed tasks, and one task per HTTP op (purchases and payouts are a small share of the mix).
Gifts are written by the session's writer; acks and events are handled inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
import secrets as pysecrets
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from loadtest.chaos.history import Member, Op
from loadtest.lgsetup import Secrets, receipt, user_token

# Error codes that are not an answer: the op may or may not have happened.
NOT_ANSWERS = frozenset({"unavailable", "internal"})
# Events without a durable seq (ack and welcome carry a seq but are handled first).
NOT_DURABLE = frozenset(
    {"resumed", "leaderboard", "viewers", "goal", "battle_score", "offline", "stream_started"}
)
# Closes after which a viewer does not come back (stream ended, forbidden, no such room).
FINAL_CLOSES = frozenset({4403, 4404})
SUBPROTOCOL = Subprotocol("livegift.json")
CLI_ERROR = re.compile(r"livegift payout: ([a-z_]+):")


class WorkloadError(RuntimeError):
    """The workload could not be set up (no server answered, or a setup call was refused)."""


@dataclass(slots=True)
class WorkloadConfig:
    """What to run. Rates are new ops per second over all kinds; settles come on top."""

    run_id: str = field(default_factory=lambda: pysecrets.token_hex(3))
    creators: int = 4  # one live room each
    viewers_per_room: int = 6  # sockets per room, each its own user (a Member)
    gifters_per_room: int = 4  # of those viewers, how many send gifts
    rate: float = 200.0  # new ops per second
    gift_weight: float = 0.94
    purchase_weight: float = 0.04
    payout_weight: float = 0.02
    replay_fraction: float = 0.25  # purchases sent a second time with the same receipt
    settle_fraction: float = 0.5  # ok payouts settled by the operator CLI (needs redis_url)
    duration: float = 30.0  # seconds of sending (stop may end it earlier)
    max_ops: int = 0  # budget of new ops (0: no budget)
    seed: int = 1
    in_flight: int = 8  # gifts in flight per socket (the server overlaps up to 16)
    gifts: tuple[str, ...] = ("rose", "finger_heart", "perfume", "donut", "hand_hearts")
    max_count: int = 3
    big_gift_fraction: float = 0.01  # a gift of >= 1,000 coins (an automatic shoutout)
    setup_coins_factor: float = 1.3  # setup funding: expected spend x this
    max_setup_purchases: int = 40  # per gifter
    payout_min: int = 1000
    payout_max: int = 3000
    op_timeout: float = 5.0  # no answer within this: resend (HTTP) or reconnect (socket)
    drain_seconds: float = 10.0  # after sending stops: wait this long for answers at most
    setup_timeout: float = 60.0
    http_concurrency: int = 64
    settle_workers: int = 2
    settle_queue_max: int = 16
    redis_url: str | None = None  # for `livegift payout ID paid|failed`; None: no settles
    settle_env: dict[str, str] = field(default_factory=dict)
    ping_interval: float = 5.0  # the client's own liveness check of each socket
    progress_interval: float = 1.0


@dataclass(slots=True)
class Counters:
    """Running totals the lead prints once a second (``line()``)."""

    sent: int = 0  # ops written for the first time
    ok: int = 0
    refused: int = 0
    retries: int = 0  # resends of an op after no answer
    reconnects: int = 0  # re-joins after the first join
    connect_failures: int = 0
    timeouts: int = 0  # sockets dropped because an op went unanswered
    events: int = 0  # durable events received
    skipped: int = 0  # ops not issued: every gifter was at its in-flight limit
    behind: int = 0  # ops not issued: this process could not keep up with the rate
    open_sockets: int = 0
    in_flight: int = 0  # gifts sent and not yet answered (refreshed by the watchdog)
    last_error: str = ""  # the latest unexpected socket error, for the operator

    @property
    def acked(self) -> int:
        return self.ok + self.refused

    def line(self) -> str:
        return (
            f"sent {self.sent} acked {self.acked} (ok {self.ok} refused {self.refused}) "
            f"in-flight {self.in_flight} retries {self.retries} reconnects {self.reconnects} "
            f"timeouts {self.timeouts} events {self.events} sockets {self.open_sockets} "
            f"skipped {self.skipped} behind {self.behind}"
        )


@dataclass(slots=True)
class _Catalog:
    gifts: list[tuple[str, int]]  # (id, coins) used for ordinary gifts
    big: tuple[str, int] | None  # a gift of >= 1,000 coins, if the catalog has one
    packages: list[tuple[str, int, int]]  # (id, coins, price), largest first


class _Viewer:
    """One viewer user on one room: its socket sessions, its gifts in flight, its Member."""

    def __init__(self, run: _Run, user: str, room: str, creator: str, gifter: bool) -> None:
        self.run = run
        self.user = user
        self.room = room
        self.creator = creator
        self.gifter = gifter
        self.token = run.token(user)
        self.member = Member(
            member=user, room=room, first_seq=0, seen=[], incomplete=[], reconnects=0
        )
        self.pending: dict[str, Op] = {}  # req -> op, in send order
        self.sent_at: dict[str, float] = {}  # req -> monotonic time of its latest send
        self.outbox: list[Op] = []
        self.wake = asyncio.Event()
        self.joined = asyncio.Event()  # the first welcome arrived
        self.ws: ClientConnection | None = None
        self.ready = False  # welcomed on the current socket
        self.last = -1  # the last durable seq seen (-1 before the first welcome)
        self.ended = False  # stream_ended seen, or a final close
        self.reconnect_now = False  # a non-answer ack: drop this socket and come back
        self.non_answers = 0  # sessions in a row ended by a non-answer ack (for backoff)
        self.sessions = 0

    # -- sending --------------------------------------------------------------------

    def can_take(self) -> bool:
        return self.ready and not self.ended and len(self.pending) < self.run.cfg.in_flight

    def submit(self, op: Op) -> None:
        self.pending[op.key] = op
        if self.ready:
            self.outbox.append(op)
            self.wake.set()

    async def _writer(self, ws: ClientConnection) -> None:
        """Write queued gifts; resends after a reconnect reuse the op's req."""
        counters = self.run.counters
        while True:
            if not self.outbox:
                self.wake.clear()
                await self.wake.wait()
                continue
            batch, self.outbox = self.outbox, []
            for op in batch:
                if op.key not in self.pending:
                    continue
                a = op.args
                msg = orjson.dumps(
                    {"op": "gift", "req": op.key, "gift": a["gift"], "count": a["count"]}
                )
                if op.attempts == 0:
                    op.first_sent = time.time()
                    counters.sent += 1
                else:
                    counters.retries += 1
                op.attempts += 1
                self.sent_at[op.key] = time.monotonic()
                await ws.send(msg, text=True)

    # -- receiving ------------------------------------------------------------------

    def _handle(self, ws: ClientConnection, data: bytes) -> None:
        body = orjson.loads(data)
        for ev in body if isinstance(body, list) else (body,):
            kind = ev.get("type")
            if kind == "ack":
                self._ack(ev)
            elif kind == "welcome":
                self._welcome(ws, ev)
            elif kind == "resumed":
                if ev.get("complete") is False:
                    self.member.incomplete.append((int(ev["from"]), int(ev["to"])))
            elif kind not in NOT_DURABLE and "seq" in ev:
                seq = int(ev["seq"])
                self.member.seen.append(seq)
                self.run.counters.events += 1
                if seq > self.last:
                    self.last = seq
                if kind == "stream_ended":
                    self.ended = True

    def _welcome(self, ws: ClientConnection, ev: dict[str, Any]) -> None:
        if self.last < 0:
            self.last = int(ev["seq"])
            self.member.first_seq = self.last + 1
        elif self.sessions:
            self.member.reconnects += 1
            self.run.counters.reconnects += 1
        self.sessions += 1
        self.ws = ws
        self.ready = True
        self.sent_at.clear()  # the old socket's send times must not time out this one
        self.outbox = list(self.pending.values())
        self.wake.set()
        self.joined.set()

    def _ack(self, ev: dict[str, Any]) -> None:
        op = self.pending.get(ev.get("req", ""))
        if op is None:
            return  # the answer to an earlier send of an op already answered
        if ev.get("ok"):
            self.run.answered(op, "ok", "", {"seq": ev.get("seq"), "balance": ev.get("balance")})
        else:
            code = str((ev.get("error") or {}).get("code", ""))
            if code in NOT_ANSWERS or not code:
                self.reconnect_now = True
                return
            self.run.answered(op, "refused", code, {})
        self.non_answers = 0
        del self.pending[op.key]
        self.sent_at.pop(op.key, None)

    # -- the connection loop --------------------------------------------------------

    def _url(self, base: str) -> str:
        url = f"ws{base[4:]}" if base.startswith("http") else base
        url = f"{url.rstrip('/')}/ws/{self.room}?token={self.token}"
        return url if self.last < 0 else f"{url}&since={self.last}"

    async def run_forever(self) -> None:
        """Join, and after any failure rejoin (another server, ``since``) until the end."""
        run = self.run
        index = run.rng.randrange(len(run.servers))
        failures = 0
        while not self.ended and not run.abandon.is_set():
            base = run.servers[index % len(run.servers)]
            try:
                async with connect(
                    self._url(base),
                    subprotocols=[SUBPROTOCOL],
                    open_timeout=run.cfg.op_timeout,
                    ping_interval=run.cfg.ping_interval,
                    ping_timeout=2 * run.cfg.ping_interval,
                    close_timeout=1,
                    compression=None,
                    proxy=None,
                    max_size=1 << 23,
                    max_queue=64,
                ) as ws:
                    run.counters.open_sockets += 1
                    try:
                        await self._session(ws)
                        # A partition that answers `unavailable` at once must not turn
                        # every gifter into a reconnect loop: back off until answers come.
                        failures = self.non_answers = self.non_answers + 1
                    finally:
                        run.counters.open_sockets -= 1
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code in FINAL_CLOSES or (code == 1000 and self.ended):
                    self.ended = True
                elif code == 4401:
                    self.token = run.token(self.user)
                if not self.ready:
                    run.counters.connect_failures += 1
                    failures += 1
                else:
                    failures = 0
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (400, 404):
                    self.ended = True
                elif status == 401:
                    self.token = run.token(self.user)
                run.counters.connect_failures += 1
                failures += 1
            except (OSError, TimeoutError, InvalidHandshake, ValueError):
                run.counters.connect_failures += 1
                failures += 1
            except Exception as exc:  # a viewer must never die quietly mid-run
                run.counters.last_error = f"{type(exc).__name__}: {exc}"
                run.counters.connect_failures += 1
                failures += 1
            finally:
                self.ws = None
                self.ready = False
                self.outbox = []
            index += 1
            if not self.ended:
                await run.backoff(failures)
        self.joined.set()  # a viewer that gave up must not hold the start back

    async def _session(self, ws: ClientConnection) -> None:
        self.reconnect_now = False
        first = await asyncio.wait_for(ws.recv(decode=False), self.run.cfg.op_timeout)
        self._handle(ws, first)
        if not self.ready:
            raise ValueError("the first frame was not a welcome")
        writer = asyncio.create_task(self._writer(ws))
        try:
            while not self.reconnect_now:
                self._handle(ws, await ws.recv(decode=False))
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await writer

    def abort_if_stuck(self, now: float, timeout: float) -> bool:
        """Drop the socket when the oldest gift in flight went unanswered for ``timeout``."""
        if not self.ready or not self.pending or self.ws is None:
            return False
        oldest = self.sent_at.get(next(iter(self.pending)))
        if oldest is None or now - oldest < timeout:
            return False
        self.ws.transport.abort()
        return True


class _Run:
    """The state of one workload run: ops, viewers, and the drivers around them."""

    def __init__(
        self,
        cfg: WorkloadConfig,
        servers: list[str],
        secrets: Secrets,
        stop: asyncio.Event,
        counters: Counters,
        on_progress: Callable[[Counters], None] | None,
    ) -> None:
        if not servers:
            raise WorkloadError("no servers to drive")
        self.cfg = cfg
        self.servers = [s.rstrip("/") for s in servers]
        self.secrets = secrets
        self.stop = stop
        self.counters = counters
        self.on_progress = on_progress
        self.rng = random.Random(cfg.seed)
        self.abandon = asyncio.Event()  # the run is over: no more retries
        self.ops: list[Op] = []
        self.serial = 0
        self.viewers: list[_Viewer] = []
        self.gifters: list[_Viewer] = []
        self.rr = 0
        self.rooms: list[tuple[str, str]] = []  # (room, creator)
        self.creators: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.http_tasks: set[asyncio.Task[None]] = set()  # HTTP ops not yet answered
        self.settles: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.settling = 0
        self.catalog = _Catalog([], None, [])
        self.http = _Http(cfg.http_concurrency, cfg.op_timeout)

    # -- shared helpers -------------------------------------------------------------

    def token(self, user: str) -> str:
        return user_token(self.secrets, user, user, adult=True)

    def new_op(self, prefix: str, kind: str, user: str, key: str, args: dict[str, Any]) -> Op:
        self.serial += 1
        op = Op(id=f"{prefix}{self.serial}", kind=kind, user=user, key=key, args=args)
        self.ops.append(op)
        return op

    def answered(self, op: Op, outcome: str, code: str, result: dict[str, Any]) -> None:
        op.outcome, op.code, op.result = outcome, code, result
        op.last_answer = time.time()
        if outcome == "ok":
            self.counters.ok += 1
        else:
            self.counters.refused += 1

    async def backoff(self, failures: int) -> None:
        """Wait before a retry: short at first, up to a second, with jitter; ends early
        when the run is abandoned."""
        delay = min(1.0, 0.05 * (2 ** min(failures, 5))) * (0.5 + self.rng.random())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.abandon.wait(), delay)

    def spawn(self, coro: Coroutine[Any, Any, None], http: bool = False) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if http:
            self.http_tasks.add(task)
            task.add_done_callback(self.http_tasks.discard)

    # -- HTTP ops -------------------------------------------------------------------

    async def _request(
        self, attempt: int, method: str, path: str, token: str, body: Any, headers: dict[str, str]
    ) -> tuple[int, Any]:
        """One HTTP attempt on the next server in turn: (status, JSON body or None)."""
        base = self.servers[attempt % len(self.servers)]
        data = None if body is None else orjson.dumps(body)
        status, raw = await self.http.request(
            base, method, path, {"authorization": f"Bearer {token}", **headers}, data
        )
        try:
            return status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return status, None

    async def http_op(
        self,
        op: Op,
        path: str,
        token: str,
        body: Any,
        ok: Callable[[Any], dict[str, Any]],
        headers: dict[str, str] | None = None,
    ) -> None:
        """Send ``op`` until a definite answer or the end of the run, same body and key."""
        start = self.rng.randrange(len(self.servers))
        failures = 0
        while not self.abandon.is_set():
            if op.attempts == 0:
                op.first_sent = time.time()
                self.counters.sent += 1
            else:
                self.counters.retries += 1
            op.attempts += 1
            try:
                status, reply = await self._request(
                    start + op.attempts - 1, "POST", path, token, body, headers or {}
                )
            except HTTP_ERRORS:
                status, reply = 0, None
            code = _error_code(reply)
            if 200 <= status < 300 and isinstance(reply, dict):
                try:
                    result = ok(reply)
                except (KeyError, TypeError):
                    result = None
                if result is not None:
                    self.answered(op, "ok", "", result)
                    return
            elif 400 <= status < 500 and status != 408 and code and code not in NOT_ANSWERS:
                self.answered(op, "refused", code, {})
                return
            failures += 1
            await self.backoff(failures)

    async def setup_call(self, method: str, path: str, token: str, body: Any = None) -> Any:
        """A setup request, retried across servers until it succeeds; refusals raise."""
        deadline = time.monotonic() + self.cfg.setup_timeout
        attempt = self.rng.randrange(len(self.servers))
        last = "no answer"
        while time.monotonic() < deadline:
            if self.stop.is_set():
                raise WorkloadError("stopped during setup")
            try:
                status, reply = await self._request(attempt, method, path, token, body, {})
            except HTTP_ERRORS as exc:
                status, reply, last = 0, None, f"{type(exc).__name__}: {exc}"
            code = _error_code(reply)
            if 200 <= status < 300:
                return reply
            if 400 <= status < 500 and status != 408 and code and code not in NOT_ANSWERS:
                raise WorkloadError(f"{method} {path}: HTTP {status} {code}")
            if status:
                last = f"HTTP {status} {code}"
            attempt += 1
            await asyncio.sleep(min(1.0, 0.05 * attempt))
        raise WorkloadError(f"{method} {path}: no server answered ({last})")

    # -- kinds of op ----------------------------------------------------------------

    def purchase(self, user: str, package: tuple[str, int, int], replay: bool) -> None:
        """A purchase; a replay sends the same receipt again, perhaps while the first is
        still in flight, and must answer the same transaction without crediting twice."""
        pkg, coins, price = package
        self.serial += 1
        txn = f"{self.cfg.run_id}-t{self.serial}"
        signed = receipt(self.secrets, user, txn, pkg, price)
        token = self.token(user)
        sends = 2 if replay else 1
        for n in range(sends):
            op = self.new_op("p", "purchase", user, txn, {"package": pkg, "coins": coins})
            delay = self.rng.uniform(0.0, 0.3) if n else 0.0
            self.spawn(self._purchase(op, token, signed, delay), http=True)

    async def _purchase(self, op: Op, token: str, signed: str, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        await self.http_op(
            op,
            "/api/wallet/recharge",
            token,
            {"receipt": signed},
            lambda r: {
                "transaction_id": r["transaction"]["id"],
                "coins": int(r["transaction"]["coins"]),
            },
        )

    def payout(self, creator: str) -> None:
        diamonds = self.rng.randint(self.cfg.payout_min, self.cfg.payout_max)
        self.serial += 1
        key = f"{self.cfg.run_id}-po{self.serial}"
        op = self.new_op("o", "payout", creator, key, {"diamonds": diamonds})
        self.spawn(self._payout(op), http=True)

    async def _payout(self, op: Op) -> None:
        await self.http_op(
            op,
            "/api/payouts",
            self.token(op.user),
            {"diamonds": op.args["diamonds"]},
            lambda r: {"payout": str(r["payout"]["id"]), "gross": int(r["payout"]["gross"])},
            headers={"Idempotency-Key": op.key},
        )
        settle = (
            op.outcome == "ok"
            and self.cfg.redis_url
            and self.rng.random() < self.cfg.settle_fraction
            and self.settles.qsize() < self.cfg.settle_queue_max
        )
        if settle:
            self.settles.put_nowait((op.user, str(op.result["payout"])))

    async def settle_worker(self) -> None:
        """Settle queued payouts with the operator CLI, one at a time per worker."""
        while True:
            creator, payout = await self.settles.get()
            self.settling += 1
            try:
                outcome = "paid" if self.rng.random() < 0.5 else "failed"
                op = self.new_op(
                    "s", "settle", creator, payout, {"payout": payout, "outcome": outcome}
                )
                await self._settle(op)
            finally:
                self.settling -= 1

    async def _settle(self, op: Op) -> None:
        env = {**os.environ, **self.cfg.settle_env, "REDIS_URL": str(self.cfg.redis_url)}
        failures = 0
        while not self.abandon.is_set():
            if op.attempts == 0:
                op.first_sent = time.time()
                self.counters.sent += 1
            else:
                self.counters.retries += 1
            op.attempts += 1
            rc, err = await _run_cli(
                [sys.executable, "-m", "livegift", "payout", op.key, op.args["outcome"]],
                env,
                timeout=max(10.0, 4 * self.cfg.op_timeout),
            )
            if rc == 0:
                self.answered(op, "ok", "", {})
                return
            match = CLI_ERROR.search(err) if rc == 1 else None
            if match and match.group(1) not in NOT_ANSWERS:
                self.answered(op, "refused", match.group(1), {})
                return
            failures += 1
            await self.backoff(failures)

    def gift(self) -> bool:
        viewer = self._pick_gifter()
        if viewer is None:
            return False
        gift_id, coins = self.catalog.gifts[self.rng.randrange(len(self.catalog.gifts))]
        count = self.rng.randint(1, self.cfg.max_count)
        if self.catalog.big and self.rng.random() < self.cfg.big_gift_fraction:
            (gift_id, coins), count = self.catalog.big, 1
        self.serial += 1
        req = f"{self.cfg.run_id}-g{self.serial}"
        args = {
            "room": viewer.room,
            "creator": viewer.creator,
            "gift": gift_id,
            "count": count,
            "coins": coins * count,
        }
        viewer.submit(self.new_op("g", "gift", viewer.user, req, args))
        return True

    def _pick_gifter(self) -> _Viewer | None:
        gifters = self.gifters
        for _ in range(len(gifters)):
            viewer = gifters[self.rr % len(gifters)]
            self.rr += 1
            if viewer.can_take():
                return viewer
        return None

    # -- phases ---------------------------------------------------------------------

    async def setup(self) -> None:
        """Read the catalog, start one stream per creator, fund the gifters, join rooms."""
        cfg = self.cfg
        anyone = self.token(f"{cfg.run_id}x")
        gifts = (await self.setup_call("GET", "/api/gifts", anyone))["gifts"]
        by_id = {str(g["id"]): int(g["coins"]) for g in gifts}
        chosen = [(g, by_id[g]) for g in cfg.gifts if g in by_id]
        if not chosen:
            cheapest = min(by_id.items(), key=lambda item: item[1])
            chosen = [cheapest]
        big = sorted((c, g) for g, c in by_id.items() if c >= 1000)
        self.catalog.gifts = chosen
        self.catalog.big = (big[0][1], big[0][0]) if big else None
        packages = (await self.setup_call("GET", "/api/coins/packages?region=US", anyone))[
            "packages"
        ]
        self.catalog.packages = sorted(
            ((str(p["id"]), int(p["coins"]), int(p["price"])) for p in packages),
            key=lambda p: -p[1],
        )

        for i in range(cfg.creators):
            creator = f"{cfg.run_id}c{i}"
            reply = await self.setup_call(
                "POST", "/api/streams", self.token(creator), {"title": f"chaos {cfg.run_id} {i}"}
            )
            self.rooms.append((str(reply["room"]), creator))
            self.creators.append(creator)

        for r, (room, creator) in enumerate(self.rooms):
            for j in range(cfg.viewers_per_room):
                viewer = _Viewer(
                    self, f"{cfg.run_id}r{r}v{j}", room, creator, j < cfg.gifters_per_room
                )
                self.viewers.append(viewer)
                if viewer.gifter:
                    self.gifters.append(viewer)
        self.rng.shuffle(self.gifters)

        await self._fund()
        for viewer in self.viewers:
            self.spawn(viewer.run_forever())
        waiting = [asyncio.create_task(v.joined.wait()) for v in self.viewers]
        _, late = await asyncio.wait(waiting, timeout=cfg.setup_timeout)
        for task in late:
            task.cancel()
        if late:
            raise WorkloadError(f"{len(late)} of {len(self.viewers)} viewers could not join")

    async def _fund(self) -> None:
        """Give each gifter enough coins for its expected share of the gifts; the
        purchases are ops of the history like any other."""
        cfg = self.cfg
        if not self.gifters:
            return
        gift_ops = cfg.rate * cfg.duration * cfg.gift_weight
        if cfg.max_ops:
            gift_ops = min(gift_ops, cfg.max_ops * cfg.gift_weight)
        small = sum(c for _, c in self.catalog.gifts) / len(self.catalog.gifts)
        avg = small * (1 + cfg.max_count) / 2
        if self.catalog.big:
            avg = avg * (1 - cfg.big_gift_fraction) + self.catalog.big[1] * cfg.big_gift_fraction
        need = gift_ops / len(self.gifters) * avg * cfg.setup_coins_factor
        package = self.catalog.packages[0]
        n = min(cfg.max_setup_purchases, max(1, math.ceil(need / package[1])))
        for viewer in self.gifters:
            for _ in range(n):
                self.purchase(viewer.user, package, replay=False)
        await self._wait_idle(time.monotonic() + cfg.setup_timeout)
        funded = [op for op in self.ops if op.kind == "purchase"]
        if funded and all(op.outcome == "refused" for op in funded):
            raise WorkloadError(f"every setup purchase was refused: {funded[0].code}")

    async def drive(self) -> None:
        """Issue new ops at ``rate`` until stop, the duration, or the budget."""
        cfg = self.cfg
        weights = (cfg.gift_weight, cfg.purchase_weight, cfg.payout_weight)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        end = t0 + cfg.duration
        issued = 0
        burst = max(1, int(cfg.rate * 0.2))
        while not self.stop.is_set():
            now = loop.time()
            if now >= end or (cfg.max_ops and issued >= cfg.max_ops):
                break
            due = min(int((now - t0) * cfg.rate) - issued, burst)
            if cfg.max_ops:
                due = min(due, cfg.max_ops - issued)
            gifts_blocked = False
            for _ in range(max(0, due)):
                issued += 1
                kind = self.rng.choices((0, 1, 2), weights)[0]
                if kind == 0:
                    if gifts_blocked or not self.gift():
                        gifts_blocked = True
                        self.counters.skipped += 1
                elif kind == 1 and self.gifters:
                    user = self.gifters[self.rng.randrange(len(self.gifters))].user
                    package = self.catalog.packages[self.rng.randrange(len(self.catalog.packages))]
                    self.purchase(user, package, self.rng.random() < cfg.replay_fraction)
                elif kind == 2 and self.creators:
                    self.payout(self.creators[self.rng.randrange(len(self.creators))])
            # A stall (a busy loop, a slow machine) is not made up with a burst larger than
            # 200 ms worth: the ops it cost are counted as behind, so a shortfall shows.
            lag = int((loop.time() - t0) * cfg.rate) - burst - issued
            if lag > 0:
                self.counters.behind += lag
                issued += lag
            await asyncio.sleep(0.005)

    def _busy(self) -> bool:
        return (
            bool(self.http_tasks)
            or any(v.pending for v in self.viewers if not v.ended)
            or not self.settles.empty()
            or self.settling > 0
        )

    async def _wait_idle(self, deadline: float) -> None:
        while time.monotonic() < deadline and self._busy():
            await asyncio.sleep(0.05)

    async def drain(self) -> None:
        """Wait (bounded) for outstanding answers, then for each member to have seen its
        room's last acknowledged seq, so a truncated tail is not mistaken for a gap."""
        deadline = time.monotonic() + self.cfg.drain_seconds
        await self._wait_idle(deadline)
        top: dict[str, int] = {}
        for op in self.ops:
            if op.kind == "gift" and op.outcome == "ok":
                seq = op.result.get("seq")
                if isinstance(seq, int):
                    room = op.args["room"]
                    top[room] = max(top.get(room, 0), seq)
        while time.monotonic() < deadline and any(
            not v.ended and v.last < top.get(v.room, 0) for v in self.viewers
        ):
            await asyncio.sleep(0.05)

    async def watchdog(self) -> None:
        """Drop sockets with an unanswered gift, and report progress."""
        next_report = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for viewer in self.gifters:
                if viewer.abort_if_stuck(now, self.cfg.op_timeout):
                    self.counters.timeouts += 1
            if now >= next_report:
                next_report = now + self.cfg.progress_interval
                self.counters.in_flight = sum(len(v.pending) for v in self.gifters)
                if self.on_progress is not None:
                    self.on_progress(self.counters)

    async def close(self) -> None:
        """End every retry and close every socket, all at once: a cancelled session
        closes its socket on the way out (at most ``close_timeout``, 1 s), and a socket
        whose server does not answer the close is then dropped."""
        self.abandon.set()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for viewer in self.viewers:
            if viewer.ws is not None:
                viewer.ws.transport.abort()
        self.http.close()

    def history(self) -> tuple[list[Op], list[Member]]:
        """Ops that reached the wire at least once, and every viewer's Member."""
        return [op for op in self.ops if op.attempts > 0], [v.member for v in self.viewers]


async def run_workload(
    cfg: WorkloadConfig,
    servers: list[str],
    secrets: Secrets,
    stop: asyncio.Event,
    counters: Counters | None = None,
    on_progress: Callable[[Counters], None] | None = None,
) -> tuple[list[Op], list[Member]]:
    """Run the workload against ``servers`` (base URLs such as ``http://127.0.0.1:8000``).

    Sending stops when ``stop`` is set, after ``cfg.duration`` seconds, or at
    ``cfg.max_ops``; then answers are awaited for up to ``cfg.drain_seconds``, sockets are
    closed, and the history is returned. Pass ``counters`` to read progress while it runs
    (or ``on_progress``, called every ``cfg.progress_interval`` seconds). Raises
    :class:`WorkloadError` when setup cannot finish (after ``cfg.setup_timeout``).
    """
    run = _Run(cfg, servers, secrets, stop, counters or Counters(), on_progress)
    run.spawn(run.watchdog())
    for _ in range(cfg.settle_workers if cfg.redis_url else 0):
        run.spawn(run.settle_worker())
    try:
        await run.setup()
        await run.drive()
        await run.drain()
    finally:
        await run.close()
    return run.history()


class _Http:
    """A small HTTP/1.1 client: keep-alive connections per server, bytes in and out.

    httpx spends about a millisecond of CPU per request in its pool bookkeeping (and a
    failed ``import sniffio`` per call), which at a few hundred requests a second starves
    the sockets this process must keep reading. uvicorn answers with Content-Length;
    chunked bodies and ``connection: close`` are handled too.
    """

    KEEP_IDLE = 2.0  # uvicorn drops idle connections after 5 s: never reuse one near that

    def __init__(self, limit: int, timeout: float) -> None:
        self.sem = asyncio.Semaphore(limit)
        self.timeout = timeout
        self.idle: dict[str, list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]]] = {}

    async def request(
        self, base: str, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, bytes]:
        """One request: (status, body). Raises one of ``HTTP_ERRORS`` when no answer came."""
        parts = urlsplit(base)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        async with self.sem:
            conn = self._take(base)
            try:
                async with asyncio.timeout(self.timeout):
                    if conn is None:
                        conn = await asyncio.open_connection(host, port)
                    reader, writer = conn
                    head = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}"]
                    head += [f"{k}: {v}" for k, v in headers.items()]
                    if body is not None:
                        head += ["content-type: application/json", f"content-length: {len(body)}"]
                    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
                    await writer.drain()
                    status, reply, keep = await _read_response(reader)
            except BaseException:
                if conn is not None:
                    conn[1].transport.abort()
                raise
            if keep:
                self.idle.setdefault(base, []).append((time.monotonic(), *conn))
            else:
                conn[1].transport.abort()
            return status, reply

    def _take(self, base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        idle = self.idle.get(base)
        now = time.monotonic()
        while idle:
            since, reader, writer = idle.pop()
            if now - since < self.KEEP_IDLE and not reader.at_eof():
                return reader, writer
            writer.transport.abort()
        return None

    def close(self) -> None:
        for idle in self.idle.values():
            for _, _, writer in idle:
                writer.transport.abort()
        self.idle.clear()


class HttpError(Exception):
    """A reply that is not HTTP/1.1 as expected."""


HTTP_ERRORS = (OSError, TimeoutError, EOFError, HttpError, ValueError, asyncio.LimitOverrunError)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Read one response: (status, body, keep the connection)."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
        raise HttpError(f"bad status line {lines[0]!r}")
    status = int(status_line[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip().lower()
    keep = headers.get("connection") != "close"
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunks.append((await reader.readexactly(size + 2))[:-2])
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then a blank line
            pass
        body = b"".join(chunks)
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:
        body, keep = await reader.read(), False
    return status, body, keep


def _error_code(reply: Any) -> str:
    """The PROTOCOL error code of an error body, or ''."""
    if isinstance(reply, dict):
        error = reply.get("error")
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            return str(error["code"])
    return ""


async def _run_cli(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run a command: (exit code, stderr); -1 when it did not finish in time."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return -1, ""
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    return int(proc.returncode or 0), err.decode(errors="replace")
