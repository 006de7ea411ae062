"""What bounds every HTTP request before the app (or a WebSocket driver) sees it.

uvicorn's httptools protocol puts no limit on a request head: it gathers a request line
or a header of any size (a 200 MB request line was accepted) and waits for a half-sent
request forever. :class:`GuardedHttp` is that protocol with limits, and ``livegift serve``
runs it (``http=livegift.api.guard:GuardedHttp``) for plain HTTP and for WebSocket
upgrades alike, whichever WebSocket driver takes the upgraded connection:

- the head is counted as it arrives: a request line over ``rfc6455.MAX_REQUEST_LINE``
  gets 414 and a head over ``rfc6455.MAX_HEADERS`` gets 431, once that many bytes have
  come and before the parser sees them (pipelined requests: at most one read more);
- a request, head and body, must arrive within ``LIVEGIFT_HANDSHAKE_TIMEOUT`` seconds of
  the connection or of its first byte, else 408 (or a plain close when nothing came);
- past ``LIVEGIFT_MAX_CONNECTIONS`` open connections in the process, a request gets 503.

:class:`BodyLimit` (ASGI middleware) refuses a body over ``LIVEGIFT_MAX_BODY`` with 413:
at once when Content-Length says so, else as soon as the bytes read pass the limit.
Every refusal carries the PROTOCOL error body.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from livegift import rfc6455
from livegift.config import Settings
from livegift.errors import PayloadTooLarge, Unavailable, error_body

# A refused connection is kept this many seconds, or until it sent this many more bytes,
# reading and dropping its input after our answer and FIN.
LINGER = 1.0
LINGER_BYTES = 1 << 20
TIMED_OUT = error_body("bad_request", "the request did not arrive in time")
FULL = Unavailable("this server is at its connection limit, try again later").body()


def http_response(status: int, body: dict[str, Any]) -> bytes:
    """A complete HTTP/1.1 response with a JSON body, closing the connection."""
    return rfc6455.refusal(status, orjson.dumps(body))


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a refused request."""


def _settings(app_state: dict[str, Any]) -> Settings:
    services = app_state.get("services")
    return services.settings if services is not None else Settings()


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head and a request deadline."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        settings = _settings(self.app_state)
        self._timeout = float(settings.handshake_timeout)
        self._full = len(self.connections) > settings.max_connections
        self._refused = False
        self._dropped = 0  # bytes read and dropped after a refusal
        self._head: bytearray | None = bytearray()  # this request's head until it ends
        self._line = True  # still reading the request line
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # lingering after an answer: drop it, up to LINGER_BYTES
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        if self._head is not None:
            status = self._scan(data)
            if status:
                why = "request line too long" if status == 414 else "request head too large"
                self._refuse(status, error_body("bad_request", why))
                return
        super().data_received(data)

    def _scan(self, data: bytes) -> int:
        """Count a piece of the head: 0, or the status (414, 431) that refuses it."""
        head = self._head
        assert head is not None
        old = len(head)
        head += data[: rfc6455.MAX_HEADERS - old]
        if self._line:
            if head.find(b"\r\n", max(0, old - 1), rfc6455.MAX_REQUEST_LINE) >= 0:
                self._line = False
            elif len(head) >= rfc6455.MAX_REQUEST_LINE:
                return 414
        if head.find(b"\r\n\r\n", max(0, old - 3)) >= 0:
            self._head = None  # complete: the rest is body (or the next request)
        elif len(head) >= rfc6455.MAX_HEADERS:
            return 431
        return 0

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        if self._full:
            self._refuse(503, FULL)
            raise _Refused
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._head, self._line = bytearray(), True  # the next request's head
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        self._head = None
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            self._refuse(400, error_body("bad_request", msg))

    # -- refusals and the deadline -------------------------------------------------------

    def _refuse(self, status: int, body: dict[str, Any]) -> None:
        """Answer and stop parsing. Closing at once with unread input would reset the
        connection and lose the answer, so the answer is followed by our FIN and what
        still arrives is read and dropped for a bounded while (nginx's lingering close)."""
        self._refused = True
        self._disarm()
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(http_response(status, body))
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER, transport.close)
        else:
            transport.close()

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self._timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self._refused or self.transport.is_closing():
            return
        started = self._head is None or len(self._head) > 0
        if started and (self.cycle is None or not self.cycle.response_started):
            self._refuse(408, TIMED_OUT)
        else:
            self._refused = True
            self.transport.close()


class BodyLimit:
    """ASGI middleware: an HTTP request body over ``limit`` bytes gets 413, unread."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and not _within(declared, self.limit):
            await _too_large(send, self.limit)
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message: dict[str, Any] = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise PayloadTooLarge(f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def _within(content_length: bytes, limit: int) -> bool:
    """A Content-Length value that is a number of at most ``limit`` (without int() of a
    16 KiB string)."""
    return content_length.isdigit() and len(content_length) <= 19 and int(content_length) <= limit


async def _too_large(send: Any, limit: int) -> None:
    exc = PayloadTooLarge(f"request body over {limit} bytes")
    body = orjson.dumps(exc.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
