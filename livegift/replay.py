"""Resume: a member's missed history, read in pages and written in chunks it can take.

``?since=0`` on a busy room asks for the whole history (tens of thousands of events, megabytes).
It is read from Redis a page at a time (``ZRANGEBYSCORE ... LIMIT``), cut into chunks
of at most a quarter of the send bound, and each chunk is written only once the sink's
unsent bytes are at most half the bound: a resumer holds at most one page here and less
than the bound in its buffers, so the rule for live events (past the bound: 4008) never
fires on a replay that is being read. A resumer whose unsent bytes stay over half the
bound for :data:`STALL` seconds does not read: it is closed 4008, like a live member
that does not read, and comes back with ``since``.

The hub (:meth:`livegift.hub.Hub.join`) keeps the member's live events in its backlog
meanwhile and owns the seam (``resumed``, then live); see :mod:`livegift.rooms`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from livegift import disconnect
from livegift.metrics import SLOW_CLOSES

if TYPE_CHECKING:
    from livegift.broker import Broker
    from livegift.hub import Sink
    from livegift.rooms import Item

# Events per history read.
PAGE: Final = 500
# Seconds a resumer's unsent bytes may stay over half the bound before it is cut (4008).
STALL: Final = 5.0
# How often a waiting replay looks at the sink's unsent bytes.
POLL: Final = 0.01

Read = Callable[[str, Iterable[bytes]], "list[tuple[int, Item]]"]


async def replay(
    broker: Broker, room_id: str, sink: Sink, since: int, head: int, bound: int, read: Read
) -> int:
    """Write the events after ``since`` up to ``head`` that history still holds, in
    order; ``read`` checks and parses them. Returns the first seq written (0: none).
    Stops early when the sink closes (too slow, or gone)."""
    first, after = 0, since
    while after < head and not sink.closed:
        page = await broker.history_page(room_id, after, head, PAGE)
        if not page:
            break
        items = read(room_id, [data for _, data in page])
        if items and not first:
            first = items[0][0]
        for chunk in chunks([data for _, (_, data) in items], bound // 4):
            if not await drained(sink, bound // 2):
                return first
            sink.write(sink.wire.events(chunk))
        after = page[-1][0]
        if len(page) < PAGE:
            break
    return first


def chunks(events: list[bytes], size: int) -> list[list[bytes]]:
    """Consecutive runs of events of at most ``size`` bytes each (an event larger than
    that is a run of its own)."""
    out: list[list[bytes]] = []
    run: list[bytes] = []
    used = 0
    for event in events:
        if run and used + len(event) > size:
            out.append(run)
            run, used = [], 0
        run.append(event)
        used += len(event)
    if run:
        out.append(run)
    return out


async def drained(sink: Sink, low: int) -> bool:
    """True once the sink's unsent bytes are at most ``low``. False when it closed, or
    stayed over ``low`` for STALL seconds: then it is closed here, too slow (4008)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STALL
    while not sink.closed and sink.buffered() > low:
        if loop.time() >= deadline:
            SLOW_CLOSES.inc()
            sink.close(disconnect.TOO_SLOW)
            return False
        await asyncio.sleep(POLL)
    return not sink.closed
