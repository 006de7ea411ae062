"""The ``livegift`` command: serve, token, receipt, reconcile, payouts, watch, gift.

``watch`` and ``gift`` print what the server sends only through
:func:`livegift.terminal.safe`: user text must not drive the terminal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from livegift import auth, disconnect, serve
from livegift.catalog import default_catalog
from livegift.config import ConfigError, Settings, quiet_settings
from livegift.terminal import safe

DEFAULT_URL = "http://127.0.0.1:8000"


_settings = quiet_settings


# -- tokens and receipts ---------------------------------------------------------------


def cmd_token(args: argparse.Namespace) -> int:
    settings = _settings()
    roles = ["admin"] if args.admin else None
    try:
        token = auth.mint_token(
            settings.secret,
            args.user,
            name=args.name,
            birthdate=args.birthdate,
            ttl=args.ttl,
            roles=roles,
        )
    except ValueError as exc:
        print(f"livegift token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def cmd_receipt(args: argparse.Namespace) -> int:
    settings = _settings()
    try:
        receipt = auth.mint_receipt(
            settings.payment_secret,
            default_catalog(),
            args.user,
            args.package,
            region=args.region,
            txn=args.txn,
        )
    except Exception as exc:
        print(f"livegift receipt: {exc}", file=sys.stderr)
        return 2
    print(receipt)
    if not settings.dev_mode:
        print(
            "livegift receipt: a sandbox receipt: only a server in development mode "
            "(LIVEGIFT_DEV=1 or serve --demo) credits it",
            file=sys.stderr,
        )
    return 0


# -- operator commands on the data store -----------------------------------------------


@contextlib.contextmanager
def _data_store(settings: Settings) -> Any:
    """REDIS_URL, else the embedded server's data (started for the command if needed),
    reached with the password kept in its data folder. A cluster node's URL gives a
    cluster client (livegift.store)."""
    from livegift.embedded import EmbeddedError, EmbeddedRedis

    embedded = None
    url = settings.redis_url
    if not url:
        embedded = EmbeddedRedis(settings.data_dir)
        if not settings.data_dir.exists():
            raise SystemExit(
                f"livegift: no data store: REDIS_URL is unset and {settings.data_dir} has no data"
            )
        try:
            url = embedded.start()
        except EmbeddedError as exc:
            raise SystemExit(f"livegift: {exc}") from None
    from livegift.store import connect_sync

    try:
        client = connect_sync(url)
    except Exception:
        if embedded is not None:
            embedded.stop()
        raise
    try:
        yield client, url
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()


def cmd_reconcile(args: argparse.Namespace) -> int:
    from livegift.reconcile import reconcile

    settings = _settings()
    with _data_store(settings) as (client, _url):
        report = reconcile(client, progress=None if args.quiet else sys.stderr)
    if args.json:
        print(json.dumps({**report.__dict__, "ok": report.ok}, indent=2))
    else:
        print(report.render())
    return 0 if report.ok else 1


def cmd_payout(args: argparse.Namespace) -> int:
    from livegift.errors import LiveGiftError
    from livegift.ledger import Ledger
    from livegift.store import connect, replicas

    settings = _settings()

    async def settle(url: str) -> dict[str, Any]:
        client = await connect(url, 4)
        try:
            waits = await replicas(client, settings.wait_replicas)
            ledger = Ledger(client, settings, default_catalog(), replicas=waits)
            return await ledger.settle_payout(args.payout, args.outcome)
        finally:
            await client.aclose()

    with _data_store(settings) as (_client, url):
        try:
            payout = asyncio.run(settle(url))
        except LiveGiftError as exc:
            print(f"livegift payout: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
    print(json.dumps(payout, indent=2))
    return 0


# -- terminal clients ------------------------------------------------------------------


def _ws_url(base: str, room: str, token: str, since: int | None = None) -> str:
    base = base.rstrip("/")
    if base.startswith("http"):
        base = "ws" + base[4:]
    url = f"{base}/ws/{room}?token={token}"
    return url if since is None else f"{url}&since={since}"


def cmd_watch(args: argparse.Namespace) -> int:
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    url = _ws_url(args.url, args.room, args.token, args.since)
    try:
        with connect(url, subprotocols=["livegift.json"]) as ws:  # type: ignore[list-item]
            for frame in ws:
                data = json.loads(frame)
                for event in data if isinstance(data, list) else [data]:
                    line = _describe(event) if not args.raw else json.dumps(event)
                    print(safe(line), flush=True)
    except InvalidStatus as exc:
        body = safe(exc.response.body.decode(errors="replace"))
        print(f"livegift watch: refused: HTTP {exc.response.status_code} {body}", file=sys.stderr)
        return 1
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else 1006
        reason = exc.rcvd.reason if exc.rcvd else ""
        print(f"livegift watch: closed {code} {safe(reason)}", file=sys.stderr)
        return 0 if code == disconnect.NORMAL.code else 1
    except OSError as exc:
        print(f"livegift watch: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _describe(event: dict[str, Any]) -> str:
    kind = event.get("type")
    if kind == "gift":
        return (
            f"#{event['seq']} {event['from']['name']} sent {event['count']}x "
            f"{event['gift']['name']} ({event['coins']} coins) combo x{event['combo']}"
        )
    if kind == "shoutout":
        auto = " (auto)" if event.get("auto") else ""
        return f"#{event['seq']} shout-out to {event['to']['name']}{auto}: {event['text']}"
    if kind == "welcome":
        return (
            f"joined {event['room']} as {event['you']['name']}; creator "
            f"{event['creator']['name']}, {event['viewers']} watching, seq {event['seq']}"
        )
    if kind == "viewers":
        return f"{event['count']} watching"
    if kind == "leaderboard":
        top = ", ".join(f"{t['user']['name']} {t['coins']}" for t in event["top"][:3])
        return f"top gifters: {top}"
    if kind == "stream_ended":
        return f"#{event['seq']} the stream has ended"
    return json.dumps(event)


def cmd_gift(args: argparse.Namespace) -> int:
    import secrets

    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    req = args.req or f"cli-{secrets.token_hex(6)}"
    url = _ws_url(args.url, args.room, args.token)
    try:
        with connect(url, subprotocols=["livegift.json"]) as ws:  # type: ignore[list-item]
            ws.send(json.dumps({"op": "gift", "req": req, "gift": args.gift, "count": args.count}))
            for _ in range(10_000):
                data = json.loads(ws.recv(timeout=10))
                for event in data if isinstance(data, list) else [data]:
                    if event.get("type") == "ack" and event.get("req") == req:
                        print(safe(json.dumps(event)))
                        return 0 if event["ok"] else 1
    except InvalidStatus as exc:
        print(f"livegift gift: refused: HTTP {exc.response.status_code}", file=sys.stderr)
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else 1006
        reason = safe(exc.rcvd.reason) if exc.rcvd else ""
        print(f"livegift gift: closed {code} {reason}", file=sys.stderr)
    except (OSError, TimeoutError) as exc:
        print(f"livegift gift: {exc}", file=sys.stderr)
    return 1


# -- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livegift", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    serve.add_parsers(sub)
    _money_parsers(sub)
    _room_parsers(sub)
    return p


def _money_parsers(sub: Any) -> None:
    t = sub.add_parser("token", help="print a signed user token (development and tests)")
    t.add_argument("user")
    t.add_argument("--name")
    t.add_argument("--birthdate", help="YYYY-MM-DD; omit for a user who is not an adult")
    t.add_argument("--ttl", type=int, default=86400, help="seconds (default 86400)")
    t.add_argument("--admin", action="store_true")
    t.set_defaults(func=cmd_token)

    r = sub.add_parser("receipt", help="print a signed sandbox receipt at the list price")
    r.add_argument("user")
    r.add_argument("package", help="package id, e.g. p330")
    r.add_argument("--region", default="US")
    r.add_argument("--txn")
    r.set_defaults(func=cmd_receipt)

    c = sub.add_parser("reconcile", help="check the money invariants; exit 1 when they fail")
    c.add_argument("--json", action="store_true")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_reconcile)

    po = sub.add_parser("payout", help="operator: settle a pending payout")
    po.add_argument("payout", help="payout id (po_...)")
    po.add_argument("outcome", choices=["paid", "failed"])
    po.set_defaults(func=cmd_payout)


def _room_parsers(sub: Any) -> None:
    for name, helptext in (
        ("watch", "print a room's events as they arrive"),
        ("gift", "send one gift and print the ack"),
    ):
        w = sub.add_parser(name, help=helptext)
        w.add_argument("room")
        if name == "gift":
            w.add_argument("gift", help="gift id, e.g. rose")
            w.add_argument("--count", type=int, default=1)
            w.add_argument("--req", help="request id (default: random)")
        else:
            w.add_argument("--since", type=int, help="resume after this seq")
            w.add_argument("--raw", action="store_true", help="print JSON events")
        w.add_argument("--token", required=True)
        w.add_argument("--url", default=os.environ.get("LIVEGIFT_URL", DEFAULT_URL))
        w.set_defaults(func=cmd_watch if name == "watch" else cmd_gift)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"livegift: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
