"""``livegift serve`` and ``livegift redis``: the server process and its data store."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import sys
from typing import TYPE_CHECKING, Any

from livegift.config import DEV_PAYMENT_SECRET, DEV_SECRET, Settings, public_host_problems
from livegift.config import quiet_settings as _settings
from livegift.protocol import MAX_FRAME

if TYPE_CHECKING:
    from livegift.embedded import EmbeddedRedis


def add_parsers(sub: Any) -> None:
    s = sub.add_parser(
        "serve", help="run the server (starts its own Redis when REDIS_URL is unset)"
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--demo", action="store_true", help="seed a live demo room and print page URLs")
    s.add_argument("--no-bots", action="store_true", help="with --demo: no simulated gifters")
    s.add_argument("--batch-ms", type=int, default=None, help="fan-out batch window in ms")
    s.add_argument("--access-log", action="store_true")
    s.set_defaults(func=cmd_serve)

    rd = sub.add_parser("redis", help="run the Redis-compatible server in the foreground")
    rd.add_argument("--port", type=int, default=6399)
    rd.set_defaults(func=cmd_redis)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from livegift.embedded import EmbeddedError, EmbeddedRedis

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    checked = _exposure_checked(_settings(), args)
    if checked is None:
        return 2
    settings = checked
    embedded: EmbeddedRedis | None = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.data_dir)
        try:
            settings = _start_embedded(settings, embedded)
        except EmbeddedError as exc:
            print(f"livegift: {exc}", file=sys.stderr)
            return 2
    if args.batch_ms is not None:
        os.environ["LIVEGIFT_BATCH_MS"] = str(args.batch_ms)
        settings = settings.with_(batch_ms=args.batch_ms)
    common = _uvicorn_options(settings, args)
    try:
        if args.workers > 1:
            if args.demo:
                asyncio.run(_seed_and_print(settings, args, bots=False))
            uvicorn.run("livegift.api.app:create_app", factory=True, workers=args.workers, **common)
        else:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(_serve_one(settings, args, common))
    except KeyboardInterrupt:
        pass
    finally:
        if embedded is not None and embedded.owned:
            print("livegift: stopping the data store")
            embedded.stop()
    return 0


def _exposure_checked(settings: Settings, args: argparse.Namespace) -> Settings | None:
    """The settings (``--demo`` turns development mode on), or None when ``serve`` must
    refuse to start: off the loopback interface, without both secrets or in development
    mode (PROTOCOL §8), before anything is started."""
    if args.demo:
        os.environ["LIVEGIFT_DEV"] = "1"  # uvicorn's worker processes read the environment
        settings = settings.with_(dev_mode=True)
    problems = public_host_problems(settings, args.host)
    if problems:
        print(
            f"livegift: refusing to serve on {args.host!r}, which other machines can reach:\n"
            + "\n".join(f"  - {problem}" for problem in problems),
            file=sys.stderr,
        )
        return None
    if settings.secret == DEV_SECRET or settings.payment_secret == DEV_PAYMENT_SECRET:
        print(
            "livegift: LIVEGIFT_SECRET / LIVEGIFT_PAYMENT_SECRET are unset, so development "
            "secrets sign tokens and receipts. Set both for anything but local testing.",
            file=sys.stderr,
        )
    return settings


def _start_embedded(settings: Settings, embedded: EmbeddedRedis) -> Settings:
    """Start (or reuse) the embedded data store; the settings and environment point at it."""
    from livegift.embedded import PASSWORD_FILE

    url = embedded.start()
    how = f"started {embedded.binary}" if embedded.owned else "reusing the server"
    where = f"{embedded.public_url}, password in {settings.data_dir / PASSWORD_FILE}"
    print(f"livegift: data store {where} ({how}, data in {settings.data_dir.resolve()})")
    os.environ["REDIS_URL"] = url
    return settings.with_(redis_url=url)


def _uvicorn_options(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "host": args.host,
        "port": args.port,
        "ws": "livegift.api.fastws:FastWebSocket" if settings.ws == "fast" else "websockets-sansio",
        "ws_max_size": MAX_FRAME,
        "ws_per_message_deflate": False,
        "ws_ping_interval": settings.ping_interval,
        "ws_ping_timeout": settings.ping_interval,
        "http": "livegift.api.guard:GuardedHttp",  # httptools with a bounded head
        "loop": "uvloop",
        "lifespan": "on",
        "access_log": args.access_log,
        "log_level": "warning",
        "backlog": 8192,
        "timeout_graceful_shutdown": 5,
    }


def _loop_factory() -> Any:
    """uvloop when installed (uvicorn's own loop setting only applies to uvicorn.run)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _prog() -> str:
    """How the user can run this command again from their shell."""
    if shutil.which("livegift") == sys.argv[0]:
        return "livegift"
    if sys.argv[0].endswith("livegift"):
        return os.path.relpath(sys.argv[0])
    return f"{sys.executable} -m livegift"


async def _seed_and_print(settings: Settings, args: argparse.Namespace, bots: bool) -> Any:
    from livegift.demo import CREATOR, seed
    from livegift.overlays import overlay_url

    info = await seed(settings)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    prog = _prog()
    base = f"http://{host}:{args.port}"
    print(
        "\n"
        "  livegift demo is live in room '"
        + info.room
        + "'"
        + (" with simulated gifters" if bots else "")
        + "\n\n"
        f"  Creator studio : {base}/studio/{info.room}?token={info.creator_token}\n"
        f"  Stream overlay : {overlay_url(base, CREATOR.id, info.overlay_key)}&goal=50000\n"
        f"  Viewer page    : {base}/watch/{info.room}?token={info.viewer_token}\n\n"
        f"  Watch in a terminal : {prog} watch {info.room} --url {base} --token {info.viewer_token}\n"
        f"  Send a gift         : {prog} gift {info.room} rose --count 5 --url {base} --token {info.viewer_token}\n"
        f"  Under-18 viewer token (can watch, cannot gift): {info.minor_token}\n"
        f"  Check the books     : {prog} reconcile   (Ctrl-C stops the server)\n",
        flush=True,
    )
    return info


async def _serve_one(settings: Settings, args: argparse.Namespace, common: dict[str, Any]) -> None:
    import uvicorn

    from livegift.api.app import create_app

    config = uvicorn.Config(create_app(settings), **common)
    server = uvicorn.Server(config)
    stop = asyncio.Event()
    side: list[asyncio.Task[Any]] = []

    async def after_start() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        if args.demo:
            from livegift.demo import simulate_gifters

            info = await _seed_and_print(settings, args, bots=not args.no_bots)
            if not args.no_bots:
                host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
                base_ws = f"ws://{host}:{args.port}"
                side.append(
                    asyncio.create_task(simulate_gifters(settings, base_ws, info.room, stop))
                )

    starter = asyncio.create_task(after_start())
    try:
        await server.serve()
    finally:
        stop.set()
        starter.cancel()
        for task in side:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def cmd_redis(args: argparse.Namespace) -> int:
    """Run livegift's Redis-compatible server in the foreground (the Procfile's redis).

    The same server, config, password and private folder as ``serve`` would use; ``serve``
    and the other commands find it through ``LIVEGIFT_DATA_DIR``."""
    from livegift.embedded import EmbeddedError, EmbeddedRedis

    settings = _settings()
    embedded = EmbeddedRedis(settings.data_dir)
    folder = settings.data_dir.resolve()
    print(f"livegift redis: 127.0.0.1:{args.port}, data in {folder}", flush=True)
    try:
        embedded.exec_foreground(args.port)
    except EmbeddedError as exc:
        print(f"livegift redis: {exc}", file=sys.stderr)
    return 2
