"""When the tokens of open sockets expire: one deadline heap per process (PROTOCOL §8).

A token's ``exp`` holds on an open socket too. Rather than a timer per connection (a
``loop.call_at`` handle costs about 600 bytes under uvloop, a heap entry here about 140),
every connection with a token puts ``(exp, n, connection)`` on one heap, and the process's
sweep (:meth:`livegift.services.Services._sweep`, once a second) takes what is due.

Entries are never searched for: a connection that closes or refreshes its token changes
its ``expires``, and an entry whose ``exp`` no longer equals it is stale and skipped when
it comes up. Once stale entries outnumber live ones the heap is rebuilt without them, so
churn cannot grow it without bound. No asyncio here: the caller passes the time.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol

# Below this many stale entries the heap is not worth rebuilding.
COMPACT_AFTER = 1024


class Expiring(Protocol):
    """A connection as the heap sees it: its token's exp (0: closed, nothing to expire)."""

    expires: int

    def expire(self) -> None:
        """The token reached its exp: close the socket."""


class Deadlines:
    __slots__ = ("_count", "_heap", "_stale")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Expiring]] = []
        self._count = itertools.count()
        self._stale = 0

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, item: Expiring) -> None:
        """Watch ``item.expires`` (a refresh adds the item again with its new exp)."""
        if item.expires:
            heapq.heappush(self._heap, (item.expires, next(self._count), item))

    def dropped(self) -> None:
        """An added item closed or moved its exp: its entry is stale."""
        self._stale += 1
        if self._stale >= COMPACT_AFTER and 2 * self._stale >= len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2].expires == entry[0]]
            heapq.heapify(self._heap)
            self._stale = 0

    def due(self, now: float) -> list[Expiring]:
        """The items whose exp is at or before ``now`` (epoch seconds), each once."""
        heap, out = self._heap, []
        while heap and heap[0][0] <= now:
            exp, _, item = heapq.heappop(heap)
            if item.expires == exp:
                out.append(item)
            elif self._stale:
                self._stale -= 1
        return out
