"""Every WebSocket close the server sends, by name, grouped by what the client should do.

Like centrifuge's ``disconnect.go``: a client reads the code and knows whether coming back
can help. Code numbers appear here and nowhere else in the server; everything else names a
:class:`Close`.

Reconnect (with ``since``, after a backoff):
    NORMAL_RESTART   1001  going away: this process is restarting
    TRY_AGAIN_LATER  1013  draining, or the data store is down
    SERVER_ERROR     1011  an unexpected failure on our side
    TOO_SLOW         4008  the client did not read; its unsent data passed the bound

Do not reconnect (fix something first):
    NORMAL           1000  the stream ended, or the client closed
    PROTOCOL_ERROR   1002  broke RFC 6455 (bad framing, bad close code, unmasked frame)
    BAD_DATA         1007  a text frame or close reason that is not UTF-8
    POLICY           1008  kept sending garbage
    TOO_BIG          1009  a frame over the 4 KiB limit
    UNAUTHORIZED     4401  bad or expired token
    FORBIDDEN        4403  not allowed here
    NOT_FOUND        4404  unknown or ended room
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    name: str
    reason: str
    reconnect: bool


NORMAL: Final = Close(1000, "normal", "stream ended", False)
NORMAL_RESTART: Final = Close(1001, "going_away", "server restarting", True)
PROTOCOL_ERROR: Final = Close(1002, "protocol_error", "protocol error", False)
BAD_DATA: Final = Close(1007, "bad_data", "invalid UTF-8", False)
POLICY: Final = Close(1008, "policy", "too many invalid frames", False)
TOO_BIG: Final = Close(1009, "too_big", "frame too big", False)
SERVER_ERROR: Final = Close(1011, "server_error", "server error", True)
TRY_AGAIN_LATER: Final = Close(1013, "try_again_later", "try again later", True)
TOO_SLOW: Final = Close(4008, "too_slow", "too slow: resume with since", True)
UNAUTHORIZED: Final = Close(4401, "unauthorized", "a valid token is required", False)
FORBIDDEN: Final = Close(4403, "forbidden", "forbidden", False)
NOT_FOUND: Final = Close(4404, "not_found", "unknown or ended room", False)

ALL: Final = (
    NORMAL,
    NORMAL_RESTART,
    PROTOCOL_ERROR,
    BAD_DATA,
    POLICY,
    TOO_BIG,
    SERVER_ERROR,
    TRY_AGAIN_LATER,
    TOO_SLOW,
    UNAUTHORIZED,
    FORBIDDEN,
    NOT_FOUND,
)
BY_CODE: Final = {close.code: close for close in ALL}

# A peer closing with TOO_SLOW gets this long to take the close frame before the TCP
# connection is cut: it is not reading, so it may never drain it.
SLOW_CLOSE_GRACE: Final = 2.0
# Any other close waits this long for the peer's closing handshake.
CLOSE_TIMEOUT: Final = 5.0


def may_send(code: int) -> bool:
    """Whether RFC 6455 §7.4 lets an endpoint put this code in a Close frame."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or (
        3000 <= code <= 4999
    )


def valid_received(code: int) -> bool:
    """Whether a Close frame from the peer may carry this code (RFC 6455 §7.4, Autobahn 7.9).

    Any other code (0-999, 1004-1006, 1015, 1016-2999, 5000 and up) is a protocol error.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999
