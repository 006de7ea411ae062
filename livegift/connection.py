"""One WebSocket connection's life, whatever carries it: join, ops, leave.

The drivers (:mod:`livegift.api.fastws` on its own asyncio protocol, :mod:`livegift.api.ws`
under any ASGI server) only move bytes: they parse the handshake into a
:class:`~livegift.api.handshake.Join`, hand in each client message, and offer a
:class:`~livegift.hub.Sink` that writes and closes. Everything else happens here, once:

- **admission** (PROTOCOL §8): before the driver accepts the handshake, :meth:`admit`
  takes the connection's place among its user's (past the cap: HTTP 429
  ``too_many_connections``); the connection gives it back once, when it ends;
- **join**: the room is looked up (unknown or ended: 4404; data store down: 1013), the
  session is made and the hub adds the member (welcome, resume, live events);
- **ops**: each answered by an ack, acks in arrival order. Consecutive gifts overlap (up
  to ``OVERLAP`` in flight, so that one client's gifts are not held to one round trip
  each); any other op waits for the ops before it and runs alone. A client that floods
  is paused by the driver while ops wait, and one that keeps sending garbage is closed
  with 1008;
- **leave**: the member leaves its room when the socket goes, for whatever reason;
- **token expiry** (PROTOCOL §8): the token's ``exp`` holds on the open socket. A ``refresh``
  op moves it; at ``exp`` the process's sweep (:mod:`livegift.expiry`) closes the socket
  4401 ``token_expired``, and an op that arrives after ``exp`` is not run but closes it.

Every error ends in the close its exception names (:mod:`livegift.errors`), and a client
too slow to read is cut with 4008 so that it never holds its room back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from livegift import disconnect
from livegift.errors import LiveGiftError, NotFound, TokenExpired
from livegift.hub import Member, Sink
from livegift.metrics import CONNECTIONS, SLOW_CLOSES
from livegift.protocol import GiftOp, Op
from livegift.session import Session

if TYPE_CHECKING:
    from livegift.admission import Slot
    from livegift.api.handshake import Join
    from livegift.services import Services

log = logging.getLogger("livegift.connection")

# Ops waiting beyond this many: the driver stops reading until they are done, so a flood
# waits in the kernel's buffers, not in ours.
MAX_QUEUED_OPS = 32
# Gift ops of one connection in flight at once. Their debits and landings keep arrival
# order (they join the same or a later batch of the same partition, livegift.pipeline).
OVERLAP = 16

JOINING, OPEN, CLOSED = range(3)


async def run_or_close(sink: Sink, step: Awaitable[None], what: str) -> None:
    """Run one opening step; a failure closes the sink with the close its error names."""
    try:
        await step
    except LiveGiftError as exc:
        sink.close(exc.close, exc.message[:100])
    except Exception:
        log.exception(what)
        sink.close(disconnect.SERVER_ERROR)


def close_too_slow(sink: Sink) -> None:
    """The client's unsent data passed the bound: count it and close 4008."""
    if not sink.closed:
        SLOW_CLOSES.inc()
        sink.close(disconnect.TOO_SLOW)


class Flow(Protocol):
    """Read flow control offered by a driver that can pause its socket."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Connection:
    __slots__ = (
        "_flow",
        "_ops",
        "_task",
        "_wake",
        "expires",
        "join",
        "member",
        "services",
        "session",
        "sink",
        "slot",
        "state",
    )

    def __init__(
        self,
        services: Services,
        join: Join,
        sink: Sink,
        flow: Flow | None = None,
        slot: Slot | None = None,
    ) -> None:
        self.services = services
        self.join = join
        self.sink = sink
        # This connection's place among its user's (from admit), released in closed().
        self.slot = slot
        self.state = JOINING
        self.session: Session | None = None
        self.member: Member | None = None
        self._flow = flow
        self._ops: deque[bytes | str] | None = None  # made when a client first sends
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None  # set while _run_ops waits for ops or acks
        # The token's exp (epoch seconds), watched by services.deadlines; 0 once closed.
        self.expires = join.expires
        CONNECTIONS.inc()

    # -- join ----------------------------------------------------------------------------

    @staticmethod
    def admit(services: Services, join: Join) -> Slot:
        """A place for one more connection of the join's user in this process, taken
        before the handshake is accepted: TooManyConnections (HTTP 429) past
        LIVEGIFT_MAX_CONNECTIONS_PER_USER (PROTOCOL §8). The Connection made with it
        gives it back when it ends; a driver that makes none calls ``slot.release()``."""
        return services.admission.enter(join.user.id)

    def start(self) -> None:
        """Join, then run the ops that arrive, on one task (for drivers that call receive)."""
        self._task = asyncio.get_running_loop().create_task(self._open_and_run())

    async def _open_and_run(self) -> None:
        try:
            if await self.open():
                await self._run_ops()
        finally:
            self._task = None

    async def open(self) -> bool:
        """Join the room; True once the member is in. On failure the socket is closed."""
        self.services.deadlines.add(self)
        try:
            await run_or_close(self.sink, self._join(), "join failed")
        finally:
            # Whatever happened (an error, or a cancellation that was not ours), a socket
            # that did not make it into its room is closed rather than left hanging.
            if self.state == JOINING:
                self.sink.close(disconnect.SERVER_ERROR, "could not join the room")
        return self.state == OPEN

    async def _join(self) -> None:
        join, services = self.join, self.services
        try:
            info = await services.streams.room(join.room) if join.room else None
        except NotFound:
            info = None
        if info is None or info.get("live") != "1":
            raise NotFound("unknown or ended room")
        attempts = self.slot.bucket if self.slot is not None else None  # the user's bucket
        self.session = Session(
            join.user, join.room, join.codec, services, info["creator"], join.expires, attempts
        )
        self.member = Member(join.user.id, self.sink)
        await services.streams.remember_name(join.user)
        await services.hub.join(join.room, self.member, join.welcome(info), join.since)
        if self.state == JOINING and not self.sink.closed:
            self.state = OPEN

    # -- ops -----------------------------------------------------------------------------

    def receive(self, data: bytes | str) -> None:
        """A client message arrived; its ack follows those of the ops before it."""
        if self.state == CLOSED:
            return
        if self._ops is None:
            self._ops = deque()
        self._ops.append(data)
        if len(self._ops) >= MAX_QUEUED_OPS and self._flow is not None:
            self._flow.pause_reading()
        if self._task is None and self.state == OPEN:
            self._task = asyncio.get_running_loop().create_task(self._run_ops())
        elif self._wake is not None:
            self._wake.set()

    async def _run_ops(self) -> None:
        """Run the queued ops: gifts overlap, acks go out in arrival order."""
        running: deque[asyncio.Task[dict[str, Any]]] = deque()
        wake = self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            while self.state == OPEN:
                while running and running[0].done():
                    self._answer(running.popleft().result())
                if self.state != OPEN:
                    break
                if self._ops and len(running) < OVERLAP:
                    op = self._next_op()
                    if op is None:
                        break
                    if isinstance(op, GiftOp):
                        task = loop.create_task(self._session().run(op))
                        task.add_done_callback(lambda _: wake.set())
                        running.append(task)
                        continue
                    # Anything else runs alone, after the ops before it.
                    while running:
                        self._answer(await running.popleft())
                    if self.state == OPEN:
                        self._answer(op if isinstance(op, dict) else await self._session().run(op))
                    continue
                if not self._ops and self._flow is not None:
                    self._flow.resume_reading()
                if not running and not self._ops:
                    break
                wake.clear()
                await wake.wait()
        finally:
            for task in running:
                task.cancel()
            self._wake = None
            self._task = None

    def _session(self) -> Session:
        assert self.session is not None
        return self.session

    def _next_op(self) -> Op | dict[str, Any] | None:
        """The next queued frame, decoded (or its error ack); None when the token's exp
        passed first (the socket is then closed: the op is never run)."""
        assert self._ops is not None
        data = self._ops.popleft()
        if self.expires and time.time() >= self.expires:
            self.expire()
            return None
        return self._session().decode(data)

    def _answer(self, ack: dict[str, Any]) -> None:
        """Write one ack, unless the socket is closing."""
        session = self.session
        if session is None or self.state != OPEN or self.sink.closed:
            return
        if session.expires != self.expires:
            self._refreshed(session.expires)
        self.sink.write(self.sink.wire.encode(ack))
        if session.too_many_bad_frames:
            self.sink.close(disconnect.POLICY)

    async def op(self, data: bytes | str) -> None:
        """Run one client message and write its ack (drivers without flow control call
        this directly, one message at a time)."""
        session = self.session
        if session is None or self.state != OPEN or self.sink.closed:
            return
        if self.expires and time.time() >= self.expires:
            self.expire()  # the sweep may not have come round yet: never run it
            return
        self._answer(await session.handle(data))

    # -- token expiry --------------------------------------------------------------------

    def _refreshed(self, expires: int) -> None:
        """A refresh op swapped in a token with another exp."""
        self.services.deadlines.dropped()
        self.expires = expires
        self.services.deadlines.add(self)

    def expire(self) -> None:
        """The token reached its exp without a refresh: close 4401 ``token_expired``."""
        self.expires = 0
        self._ops = None  # what is still queued was sent too late to run
        self.sink.close(TokenExpired.close, TokenExpired.code)

    # -- leave ---------------------------------------------------------------------------

    def too_slow(self) -> None:
        """The driver saw the client's unsent data pass the bound."""
        close_too_slow(self.sink)

    def closed(self) -> None:
        """The socket is gone: leave the room and drop waiting ops. Safe to call twice."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        CONNECTIONS.dec()
        if self.slot is not None:
            self.slot.release()
        if self.expires:
            self.expires = 0
            self.services.deadlines.dropped()
        if self.member is not None:
            self.services.hub.leave(self.join.room, self.member)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._ops = None
