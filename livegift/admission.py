"""Who may hold a connection here, and how often they may try a gift (this process only).

No I/O. :class:`Admission` counts each user's open WebSocket connections in this server
process (PROTOCOL §8: at most ``LIVEGIFT_MAX_CONNECTIONS_PER_USER``, across rooms); a
connection holds a :class:`Slot` from its handshake to its end, released exactly once.
Each user's entry also carries the in-process gift-attempt :class:`Bucket`, shared by all
of that user's sockets, so that failed gifts are limited before they cost a Redis call
(the gift script keeps its own bucket for successes, across processes). An entry outlives
its last connection until its bucket has refilled, so reconnecting does not refill it;
idle entries are swept as new users arrive. The bucket math is the pure function
:func:`take`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from livegift.errors import TooManyConnections

# Idle entries are swept once there are this many entries (then twice as many as remain).
SWEEP_MIN = 1024


def take(tokens: float, last: float, now: float, rate: float, burst: float) -> tuple[float, bool]:
    """A token bucket refilled at ``rate`` per second up to ``burst``, ``last`` being when
    it held ``tokens``: (tokens now, True) after taking one, or (tokens now, False)."""
    tokens = min(burst, tokens + max(0.0, now - last) * rate)
    if tokens < 1:
        return tokens, False
    return tokens - 1, True


class Bucket:
    """One user's gift attempts: ``rate`` per second, bursts of ``burst``."""

    __slots__ = ("burst", "clock", "last", "rate", "tokens")

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.last = float(burst), clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens, taken = take(self.tokens, self.last, now, self.rate, self.burst)
        self.last = now
        return taken

    def full(self) -> bool:
        """Refilled to its burst: forgetting it would change nothing."""
        return self.tokens + (self.clock() - self.last) * self.rate >= self.burst


class _User:
    __slots__ = ("bucket", "open")

    def __init__(self, bucket: Bucket) -> None:
        self.open = 0
        self.bucket = bucket


class Slot:
    """One admitted connection; ``release`` gives its place back (only the first call)."""

    __slots__ = ("_admission", "bucket", "user")

    def __init__(self, admission: Admission | None, user: str, bucket: Bucket) -> None:
        self._admission = admission
        self.user = user
        self.bucket = bucket

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self.user)


class Admission:
    def __init__(self, per_user: int, gift_rate: float, gift_burst: float) -> None:
        self.per_user = per_user
        self.gift_rate = gift_rate
        self.gift_burst = gift_burst
        self._users: dict[str, _User] = {}
        self._sweep_at = SWEEP_MIN

    def enter(self, user: str) -> Slot:
        """A slot for one more connection of ``user``, or TooManyConnections."""
        entry = self._users.get(user)
        if entry is None:
            if len(self._users) >= self._sweep_at:
                self._sweep()
            entry = self._users[user] = _User(Bucket(self.gift_rate, self.gift_burst))
        elif entry.open >= self.per_user:
            raise TooManyConnections(f"at most {self.per_user} open connections per user")
        entry.open += 1
        return Slot(self, user, entry.bucket)

    def open(self, user: str) -> int:
        """How many connections ``user`` holds here."""
        entry = self._users.get(user)
        return entry.open if entry is not None else 0

    def __len__(self) -> int:
        """Users with an entry here (a connection, or a bucket still refilling)."""
        return len(self._users)

    def _release(self, user: str) -> None:
        entry = self._users.get(user)
        if entry is None:
            return
        entry.open -= 1
        if entry.open <= 0 and entry.bucket.full():
            del self._users[user]

    def _sweep(self) -> None:
        """Forget users with no connection whose bucket has refilled (amortised O(1))."""
        for user in [u for u, e in self._users.items() if e.open <= 0 and e.bucket.full()]:
            del self._users[user]
        self._sweep_at = max(SWEEP_MIN, 2 * len(self._users))


def unlimited_slot(user: str, gift_rate: float, gift_burst: float) -> Slot:
    """A slot counted nowhere (a session made outside a connection, as tests do)."""
    return Slot(None, user, Bucket(gift_rate, gift_burst))
