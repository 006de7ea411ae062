"""The server's UTC day, worked out once a day: the gift hot path asks for it every call.

:func:`utc_today` is the date the adult rule is checked on; :func:`today` is the same day
as YYYYMMDD, the suffix of the per-day keys (daily spend and payout caps).
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime

DAY_SECONDS = 86400

_day: tuple[int, date, str] = (-1, date.min, "")


def _current() -> tuple[int, date, str]:
    global _day
    n = int(time.time() // DAY_SECONDS)
    if _day[0] != n:
        day = datetime.fromtimestamp(n * DAY_SECONDS, UTC).date()
        _day = (n, day, day.strftime("%Y%m%d"))
    return _day


def utc_today() -> date:
    """The server's UTC date."""
    return _current()[1]


def today() -> str:
    """The server's UTC date as YYYYMMDD."""
    return _current()[2]
