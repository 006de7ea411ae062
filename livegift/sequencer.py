"""One room's event order: seqs in, deliveries out. No asyncio, no Redis.

The Lua scripts number a room's durable events 1, 2, 3, ..., keep them in the room's
history and publish them. Pub/sub may hand this process an event before the room's
subscription is confirmed, twice (pub/sub and a history read overlap), after a later one,
or not at all (while it reconnects). For one room, a :class:`Sequencer` decides:

- what goes out now: each event once, in seq order (:attr:`Step.deliver`);
- what is a duplicate, dropped (:attr:`Step.dropped`);
- what waits in the stash behind a gap, and which history range fills the gap;
- when history no longer holds part of that range: the loss is reported and skipped.

The hub does the I/O around it::

    step = seq.feed(n, event)               # every event from pub/sub
    deliver(step)
    if step.fill:                           # a gap opened: in a task of its own
        while seq.filling:
            head = await latest_seq() if after a reconnect else 0
            span = seq.gap(head)
            rows = await history(*span) if span else []     # retried on errors
            deliver(seq.filled(rows))

While a fill runs, :meth:`feed` delivers nothing (later events wait in the stash), so the
events a fill releases are always the next ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class Step(Generic[T]):
    """What one call decided."""

    # Events to deliver now, as (seq, event), in seq order.
    deliver: list[tuple[int, T]] = field(default_factory=list)
    # Duplicates dropped: already delivered, before the room's head, or already stashed.
    dropped: int = 0
    # A gap opened: the caller must start filling it (see the module docstring).
    fill: bool = False
    # Seq ranges (first, last) that history no longer holds: skipped, never delivered.
    lost: list[tuple[int, int]] = field(default_factory=list)


class Sequencer(Generic[T]):
    """Seq order, de-duplication, the stash of early events and gap detection for one room.

    ``T`` is whatever the caller keeps with a seq (the hub: the event's type and bytes).
    """

    __slots__ = ("_early", "_stash", "_upto", "filling", "last", "started")

    def __init__(self) -> None:
        # The last seq delivered (or skipped as lost); everything up to it is done.
        self.last = 0
        # False until begin(): events are kept aside until the room's head is known.
        self.started = False
        # A fill is under way; until it ends, later events wait in the stash.
        self.filling = False
        self._early: list[tuple[int, T]] = []
        self._stash: dict[int, T] = {}
        # The top of the range handed out by the last gap() (what the fill read).
        self._upto = 0

    def begin(self, head: int) -> Step[T]:
        """The room's subscription is confirmed and its latest seq is ``head``.

        Members are welcomed at ``head``, so only later events go out; events that came
        before this call are fed now.
        """
        self.last = head
        self.started = True
        early, self._early = self._early, []
        step: Step[T] = Step()
        for seq, event in early:
            self._feed(seq, event, step)
        return step

    def feed(self, seq: int, event: T) -> Step[T]:
        """One event from pub/sub."""
        step: Step[T] = Step()
        if self.started:
            self._feed(seq, event, step)
        else:
            self._early.append((seq, event))
        return step

    def _feed(self, seq: int, event: T, step: Step[T]) -> None:
        if seq <= self.last or seq in self._stash:
            step.dropped += 1
        elif seq == self.last + 1 and not self.filling:
            self.last = seq
            step.deliver.append((seq, event))
        else:
            self._stash[seq] = event
            if not self.filling:
                self.filling = step.fill = True

    def reconnect(self) -> bool:
        """Pub/sub came back: whatever was published meanwhile must come from history.

        True when the caller must start a fill, asking for the room's latest seq first.
        """
        if not self.started or self.filling:
            return False
        self.filling = True
        return True

    def gap(self, head: int = 0) -> tuple[int, int] | None:
        """The history range ``(after, upto]`` the fill reads next, or None for no read.

        ``head`` is the room's latest seq when the caller asked for it (after a reconnect).
        """
        upto = max(max(self._stash) - 1 if self._stash else self.last, head)
        if upto <= self.last:
            self._upto = 0
            return None
        self._upto = upto
        return self.last, upto

    def filled(self, history: Iterable[tuple[int, T]]) -> Step[T]:
        """What history held for the last :meth:`gap` (in seq order); releases the stash.

        Seqs in that range that history no longer holds are reported in :attr:`Step.lost`
        and skipped. The fill is over (:attr:`filling` is False) once the stash is empty;
        otherwise the caller reads the next :meth:`gap`.
        """
        step: Step[T] = Step()
        for seq, event in history:
            if seq <= self.last or seq in self._stash:
                step.dropped += 1
            else:
                self._stash[seq] = event
        upto, self._upto = self._upto, 0
        for nxt in sorted(self._stash):
            if nxt > self.last + 1:
                if self.last + 1 > upto:
                    break  # not read yet: the next gap() asks for it
                step.lost.append((self.last + 1, min(nxt - 1, upto)))
                self.last = min(nxt - 1, upto)
                if nxt > self.last + 1:
                    break
            self.last = nxt
            step.deliver.append((nxt, self._stash.pop(nxt)))
        self.filling = bool(self._stash)
        return step

    def cancel_fill(self) -> None:
        """The fill stopped before it was over; the next gap starts a new one."""
        self.filling = False
