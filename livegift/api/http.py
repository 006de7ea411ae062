"""HTTP routes (PROTOCOL §3). Handlers parse, call the ledger, and shape JSON; no rules."""

from __future__ import annotations

from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis import exceptions as redis_errors
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from livegift import auth, keys, overlays, payouts, store
from livegift.auth import User
from livegift.errors import (
    BadRequest,
    Forbidden,
    LiveGiftError,
    NotAdult,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
)
from livegift.metrics import RECHARGES
from livegift.services import Services


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def current_user(request: Request) -> User:
    token = auth.bearer_token(request.headers.get("authorization", ""))
    return auth.verify_token(services_of(request).settings.secret, token)


def adult_user(request: Request, doing: str) -> User:
    user = current_user(request)
    if not user.is_adult():
        raise NotAdult(f"you must be 18 or older to {doing}")
    return user


def room_param(request: Request) -> str:
    """The ``{room}`` of the path: a room id (keys.ROOM_ID), else no such stream."""
    room: str = request.path_params["room"]
    if not keys.is_room(room):
        raise NotFound(f"no stream {room[:64]!r}")
    return room


async def json_body(request: Request) -> dict[str, Any]:
    # The app's BodyLimit (livegift.api.guard) stops reading past the limit; this is the
    # same check for a body that reached here some other way.
    raw = await request.body()
    if not raw:
        return {}
    if len(raw) > services_of(request).settings.max_body:
        raise PayloadTooLarge()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


async def healthz(request: Request) -> Response:
    try:
        await store.ping(services_of(request).redis)
    except (redis_errors.RedisError, redis_errors.RedisClusterException, OSError):
        return JSONResponse(
            {"status": "unavailable", **Unavailable("the data store is unreachable").body()},
            status_code=503,
        )
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def gifts(request: Request) -> Response:
    catalog = services_of(request).catalog
    return JSONResponse({"gifts": [g.to_dict() for g in catalog.gifts.values()]})


async def packages(request: Request) -> Response:
    region = request.query_params.get("region", "US")
    return JSONResponse(services_of(request).catalog.price_list(region).to_dict())


async def recharge(request: Request) -> Response:
    user = adult_user(request, "buy coins")
    services = services_of(request)
    body = await json_body(request)
    try:
        receipt = auth.verify_receipt(
            services.settings.payment_secret,
            services.catalog,
            body.get("receipt"),
            user,
            dev_mode=services.settings.dev_mode,
        )
        result = await services.ledger.recharge(receipt)
    except LiveGiftError as exc:
        RECHARGES.labels(exc.code).inc()
        raise
    RECHARGES.labels("replay" if result.replayed else "ok").inc()
    txn = result.transaction
    return JSONResponse(
        {
            "transaction": {
                "id": txn["id"],
                "txn": txn["txn"],
                "coins": txn["coins"],
                "amount": txn["amount"],
                "currency": txn["currency"],
                "package": txn["package"],
                "region": txn["region"],
                **({"sandbox": True} if txn.get("sandbox") else {}),
            },
            "balance": {"coins": result.coins, "diamonds": result.diamonds},
            "replayed": result.replayed,
        }
    )


async def dev_receipt(request: Request) -> Response:
    """Development only: a signed sandbox receipt for the caller, for the viewer page."""
    services = services_of(request)
    if not services.settings.dev_mode:
        raise NotFound("sandbox receipts are only available in development mode")
    user = current_user(request)
    body = await json_body(request)
    package, region = body.get("package", "p330"), body.get("region", "US")
    if not isinstance(package, str) or not isinstance(region, str):
        raise BadRequest("package and region must be strings")
    receipt = auth.mint_receipt(
        services.settings.payment_secret,
        services.catalog,
        user.id,
        package,
        region=region,
        sandbox=True,
    )
    return JSONResponse({"receipt": receipt})


async def wallet(request: Request) -> Response:
    user = current_user(request)
    coins, diamonds = await services_of(request).ledger.wallet(user.id)
    return JSONResponse({"user": user.id, "coins": coins, "diamonds": diamonds})


async def transactions(request: Request) -> Response:
    user = current_user(request)
    params = request.query_params
    try:
        limit = int(params.get("limit", "50"))
        cursor = int(params["cursor"]) if "cursor" in params else None
    except ValueError:
        raise BadRequest("limit and cursor must be integers") from None
    if not 1 <= limit <= 200:
        raise BadRequest("limit must be from 1 to 200")
    entries, next_cursor = await services_of(request).ledger.transactions(user.id, limit, cursor)
    return JSONResponse({"transactions": entries, "next_cursor": next_cursor})


async def create_stream(request: Request) -> Response:
    user = adult_user(request, "go live")
    body = await json_body(request)
    title = body.get("title", f"{user.name}'s stream")
    if not isinstance(title, str) or len(title) > 200:
        raise BadRequest("title must be a string of at most 200 characters")
    room, created = await services_of(request).streams.start_stream(user, title)
    return JSONResponse(
        {"room": room, "creator": user.public(), "live": True, "title": title},
        status_code=201 if created else 200,
    )


async def end_stream(request: Request) -> Response:
    user = current_user(request)
    room = room_param(request)
    await services_of(request).streams.end_stream(user, room)
    return JSONResponse({"room": room, "live": False})


async def get_stream(request: Request) -> Response:
    room = room_param(request)
    services = services_of(request)
    info = await services.streams.room(room)
    top = await services.liveliness.top(room)
    return JSONResponse(
        {
            "room": room,
            "title": info.get("title", ""),
            "creator": {"id": info["creator"], "name": info.get("creator_name", info["creator"])},
            "live": info.get("live") == "1",
            "viewers": await services.liveliness.viewers(room),
            "coins_received": int(info.get("coins", 0)),
            "diamonds": int(info.get("coins", 0)),
            "gifts": int(info.get("gifts", 0)),
            "seq": int(info.get("seq", 0)),
            "top_gifters": top,
        }
    )


async def overlay_key(request: Request) -> Response:
    """PROTOCOL §8: a new overlay key for the caller's own stream overlay; the old one
    stops working, and overlays open with it are closed 4401."""
    user = current_user(request)
    key = await overlays.rotate(services_of(request).redis, user.id)
    base = f"{request.url.scheme}://{request.url.netloc}"
    return JSONResponse(
        {"key": key, "url": overlays.overlay_url(base, user.id, key)}, status_code=201
    )


async def create_payout(request: Request) -> Response:
    user = adult_user(request, "cash out")
    body = await json_body(request)
    key = request.headers.get("idempotency-key")
    result = await payouts.create(services_of(request), user, body, key)
    return JSONResponse(result.body, status_code=result.status)


async def list_payouts(request: Request) -> Response:
    user = current_user(request)
    return JSONResponse({"payouts": await services_of(request).ledger.payouts(user.id)})


def error_response(exc: LiveGiftError) -> Response:
    headers = {"www-authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


routes = [
    Route("/healthz", healthz),
    Route("/metrics", metrics),
    Route("/api/gifts", gifts),
    Route("/api/coins/packages", packages),
    Route("/api/wallet", wallet),
    Route("/api/wallet/recharge", recharge, methods=["POST"]),
    Route("/api/wallet/transactions", transactions),
    Route("/api/dev/receipt", dev_receipt, methods=["POST"]),
    Route("/api/streams", create_stream, methods=["POST"]),
    Route("/api/streams/{room}", get_stream, methods=["GET"]),
    Route("/api/streams/{room}", end_stream, methods=["DELETE"]),
    Route("/api/overlay-key", overlay_key, methods=["POST"]),
    Route("/api/payouts", create_payout, methods=["POST"]),
    Route("/api/payouts", list_payouts, methods=["GET"]),
]

__all__ = ["Forbidden", "error_response", "routes"]
