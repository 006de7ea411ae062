"""The ASGI application: Starlette for HTTP and pages, a raw endpoint for /ws/{room}."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from livegift import disconnect
from livegift.api.guard import BodyLimit
from livegift.api.http import JSONResponse, error_response, routes
from livegift.api.ws import websocket_endpoint
from livegift.config import Settings
from livegift.errors import LiveGiftError, error_body
from livegift.services import Services

log = logging.getLogger("livegift")

WEB = Path(str(resources.files("livegift").joinpath("web")))
PAGES = {"studio": "studio.html", "overlay": "overlay.html", "watch": "watch.html"}
# The pages carry a token in their URL: keep it out of referrers, and run only our scripts.
# connect-src 'self' covers ws: and wss: to the page's own host and port (CSP3), which is
# all the pages connect to; no other host can receive what they send.
PAGE_HEADERS = {
    "cache-control": "no-cache",
    "referrer-policy": "no-referrer",
    "content-security-policy": (
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
}


def _page(name: str) -> Any:
    async def page(request: Request) -> Response:
        return FileResponse(WEB / PAGES[name], headers=PAGE_HEADERS)

    return page


async def index(request: Request) -> Response:
    return (
        RedirectResponse("/static/index.html")
        if (WEB / "index.html").exists()
        else (JSONResponse({"service": "livegift", "docs": "see README.md"}))
    )


async def livegift_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LiveGiftError)
    return error_response(exc)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(exc.status_code)
    body = error_body(code or "bad_request", str(exc.detail))
    return JSONResponse(body, status_code=exc.status_code)


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(LiveGiftError().body(), status_code=500)


class LiveGiftApp:
    """Routes WebSocket upgrades on /ws/ to the fast endpoint, everything else to Starlette."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.http = Starlette(
            routes=[
                *routes,
                Route("/", index),
                *[Route(f"/{name}/{{room}}", _page(name)) for name in PAGES],
                Route("/overlay/u/{user}", _page("overlay")),  # follows a creator by key
                Mount("/static", StaticFiles(directory=WEB, check_dir=False), name="static"),
            ],
            exception_handlers={
                LiveGiftError: livegift_error,
                HTTPException: http_error,
                Exception: internal_error,
            },
            lifespan=self.lifespan,
        )
        self.limited = BodyLimit(self.http, settings.max_body)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[dict[str, Any]]:
        services = await Services.start(self.settings)
        app.state.services = services
        try:
            # Lifespan state reaches uvicorn's protocols too (livegift.api.fastws).
            yield {"services": services}
        finally:
            await services.close()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            if scope["path"].startswith("/ws/"):
                await websocket_endpoint(self.http.state.services, scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": disconnect.NOT_FOUND.code})
            return
        await self.limited(scope, receive, send)


def create_app(settings: Settings | None = None) -> LiveGiftApp:
    """The app factory uvicorn calls in each worker (``--factory``)."""
    return LiveGiftApp(settings or Settings.from_env())
