"""One connection's state and ops: who is connected, to which room, and what they ask.

No sockets here: the connection hands in each client message and writes back the ack
this returns. An op is added in two places: its parser in ``protocol.OPS`` and its method
in :data:`HANDLERS`. Each op maps failures to a PROTOCOL code through the exception tree.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from livegift.admission import Bucket
from livegift.auth import User, verify_session
from livegift.errors import (
    BadRequest,
    Forbidden,
    LiveGiftError,
    RateLimited,
    StreamNotLive,
    Unauthorized,
)
from livegift.metrics import BAD_FRAMES, GIFTS, GIFTS_OK, GIFTS_REPLAYED
from livegift.protocol import (
    Codec,
    GiftOp,
    Op,
    RefreshOp,
    ShoutoutOp,
    ack_error,
    ack_ok,
    parse_op,
    read_req,
)

if TYPE_CHECKING:
    from livegift.services import Services

log = logging.getLogger("livegift.session")


class Session:
    __slots__ = (
        "attempts",
        "bad_frames",
        "codec",
        "creator",
        "expires",
        "room",
        "services",
        "user",
    )

    def __init__(
        self,
        user: User,
        room: str,
        codec: Codec,
        services: Services,
        creator: str | None = None,
        expires: int = 0,
        attempts: Bucket | None = None,
    ) -> None:
        self.user = user
        # Gift attempts, limited here before any reaches Redis (shared by the user's
        # sockets in this process: livegift.admission).
        s = services.settings
        self.attempts = attempts or Bucket(s.gift_rate, s.gift_burst)
        # The token's exp (epoch seconds; 0: none): a refresh op moves it.
        self.expires = expires
        self.room = room
        self.creator = creator
        self.codec = codec
        self.services = services
        self.bad_frames = 0

    @property
    def too_many_bad_frames(self) -> bool:
        return self.bad_frames >= self.services.settings.max_bad_frames

    async def handle(self, data: bytes | str) -> dict[str, Any]:
        """The ack for one client frame. Never raises for anything the client sent."""
        op = self.decode(data)
        return op if isinstance(op, dict) else await self.run(op)

    def decode(self, data: bytes | str) -> Op | dict[str, Any]:
        """One client frame's op, or the error ack that answers it (a bad frame counts
        towards ``too_many_bad_frames``)."""
        req: str | None = None
        try:
            try:
                message = self.codec.decode(data)
            except BadRequest:
                raise
            except Exception:
                raise BadRequest("frame is not valid " + self.codec.name) from None
            req = read_req(message)
            return parse_op(message)
        except LiveGiftError as exc:
            if isinstance(exc, BadRequest):
                self.bad_frames += 1
                BAD_FRAMES.inc()
            return ack_error(req, exc.code, exc.message)

    async def run(self, op: Op) -> dict[str, Any]:
        """The ack for one decoded op. Never raises for anything the client sent."""
        try:
            return await HANDLERS[type(op)](self, op)
        except LiveGiftError as exc:
            if isinstance(exc, BadRequest):
                self.bad_frames += 1
                BAD_FRAMES.inc()
            return ack_error(op.req, exc.code, exc.message)
        except Exception:
            log.exception("op failed")
            return ack_error(op.req, "internal", "internal server error")

    async def _gift(self, op: GiftOp) -> dict[str, Any]:
        try:
            gift = self.services.catalog.gift(op.gift)
            if not self.attempts.take():  # every attempt that would reach the script
                raise RateLimited()
            if self.services.hub.has_ended(self.room):
                raise StreamNotLive()
            outcome = await self.services.ledger.gift(
                self.user,
                self.room,
                op.req,
                gift,
                op.count,
                adult=self.user.is_adult(),
                creator=self.creator,
            )
        except LiveGiftError as exc:
            GIFTS.labels(exc.code).inc()
            raise
        (GIFTS_REPLAYED if outcome.replay else GIFTS_OK).inc()
        return ack_ok(op.req, balance=outcome.balance, seq=outcome.seq, combo=outcome.combo)

    async def _shoutout(self, op: ShoutoutOp) -> dict[str, Any]:
        creator = self.creator or await self.services.streams.room_creator(self.room)
        if creator != self.user.id:
            raise Forbidden("only the stream's creator can give shout-outs")
        seq = await self.services.streams.shoutout(self.user, self.room, op.to, op.text)
        return ack_ok(op.req, seq=seq)

    async def _refresh(self, op: RefreshOp) -> dict[str, Any]:
        """A new token of the same user: its claims (name, birthdate) from now on, and its
        exp. Anything else is ``unauthorized`` and the session keeps its token."""
        user, expires = verify_session(self.services.settings.secret, op.token)
        if user.id != self.user.id:
            raise Unauthorized("the new token is for another user")
        if user.name != self.user.name:
            await self.services.streams.remember_name(user)
        self.user, self.expires = user, expires
        return ack_ok(op.req, exp=expires)


# Every op of protocol.OPS, by its type, with the method that runs it.
HANDLERS: dict[type[Any], Callable[[Session, Any], Awaitable[dict[str, Any]]]] = {
    GiftOp: Session._gift,
    ShoutoutOp: Session._shoutout,
    RefreshOp: Session._refresh,
}
