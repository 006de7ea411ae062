"""One frozen settings object, read from the environment once.

Each setting is written once: its default, its environment variable and its lower bound
sit together on the field, and :meth:`Settings.from_env` reads every field that names a
variable. Secrets fall back to development values with a warning so that ``livegift
serve`` works on a fresh machine on the loopback interface; anywhere else ``serve``
refuses to start without ``LIVEGIFT_SECRET`` and ``LIVEGIFT_PAYMENT_SECRET``
(:func:`public_host_problems`). Development mode is off unless asked for.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DEV_SECRET = "livegift-dev-secret-change-me-0123456789"
DEV_PAYMENT_SECRET = "livegift-dev-payment-secret-change-me-0123"


class ConfigError(ValueError):
    """An environment variable holds a value that cannot be used."""


def env(
    name: str, default: Any, *, minimum: int = 0, maximum: int | None = None, path: bool = False
) -> Any:
    """A field read from the environment variable ``name`` (a Path when ``path``)."""
    kind = Path if path else str if default is None else type(default)
    meta = {"env": name, "kind": kind, "min": minimum, "max": maximum}
    if path:
        return dataclasses.field(default_factory=lambda: Path(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _parse(field: dataclasses.Field[Any], raw: str) -> Any:
    name, kind = field.metadata["env"], field.metadata["kind"]
    if kind is bool:
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if issubclass(kind, Path):
        return Path(raw)
    if kind is not int:
        return raw
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    low, high = field.metadata["min"], field.metadata["max"]
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{name} must be <= {high}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str | None = env("REDIS_URL", None)
    secret: str = env("LIVEGIFT_SECRET", DEV_SECRET)
    payment_secret: str = env("LIVEGIFT_PAYMENT_SECRET", DEV_PAYMENT_SECRET)
    data_dir: Path = env("LIVEGIFT_DATA_DIR", ".livegift", path=True)
    # Development mode (PROTOCOL §8): sandbox conveniences such as POST /api/dev/receipt,
    # and sandbox receipts credit coins (marked as sandbox in the ledger). Off unless asked.
    dev_mode: bool = env("LIVEGIFT_DEV", False)
    # Fan-out: events for a room are gathered for this many ms, then written in one frame,
    # whatever the room's size, as long as the event loop keeps up.
    batch_ms: int = env("LIVEGIFT_BATCH_MS", 10)
    # While the loop lags (livegift.hub.Pace), windows widen up to this, the rooms whose
    # writes cost most the most, so each write carries more events.
    max_batch_ms: int = env("LIVEGIFT_MAX_BATCH_MS", 100)
    # A socket whose unsent bytes pass this bound is closed with 4008.
    send_buffer_limit: int = env("LIVEGIFT_SEND_BUFFER", 1 << 20, minimum=4096)
    # Kernel send buffer per WebSocket (SO_SNDBUF); fixed so that a stalled reader is
    # noticed after a bounded number of bytes, not after the kernel's autotuned megabytes.
    socket_sndbuf: int = env("LIVEGIFT_SOCKET_SNDBUF", 256 * 1024)
    # Seconds between pings to an idle WebSocket; one silent for two intervals is dropped.
    ping_interval: int = env("LIVEGIFT_PING_INTERVAL", 20, minimum=1)
    redis_max_connections: int = env("LIVEGIFT_REDIS_CONNECTIONS", 64, minimum=2)
    # Durability (PROTOCOL §7): replicas that must confirm each purchase, gift and payout
    # before it is answered; -1: as many as the store has (1 when every master has a
    # replica, else 0). A write no replica confirms within wait_timeout_ms is answered
    # `unavailable` (a retry with the same req gives its true outcome).
    wait_replicas: int = env("LIVEGIFT_WAIT_REPLICAS", -1, minimum=-1)
    wait_timeout_ms: int = env("LIVEGIFT_WAIT_TIMEOUT_MS", 1000, minimum=1)
    # Seconds between two sweeps of the gift outboxes (transfers a crash left between
    # their two steps; livegift.ledger.Ledger.sweep), and how old a transfer must be.
    sweep_interval: int = env("LIVEGIFT_SWEEP_INTERVAL", 5, minimum=1)
    sweep_age_ms: int = env("LIVEGIFT_SWEEP_AGE_MS", 3000, minimum=1)
    # Limits (livegift.api.guard, livegift.admission). Open connections of one user in
    # this process (PROTOCOL §8), and of everyone (HTTP and WebSocket): past them, 429 / 503.
    max_connections_per_user: int = env("LIVEGIFT_MAX_CONNECTIONS_PER_USER", 16, minimum=1)
    max_connections: int = env("LIVEGIFT_MAX_CONNECTIONS", 50_000, minimum=1)
    # Seconds a client gets to send a whole request (head and body) once it connects or
    # starts one; a silent or half-sent request is closed (408).
    handshake_timeout: int = env("LIVEGIFT_HANDSHAKE_TIMEOUT", 10, minimum=1)
    # Bytes of an HTTP request body; a longer one is refused with 413 before it is read.
    max_body: int = env("LIVEGIFT_MAX_BODY", 65536, minimum=1024)
    # Gift rules.
    gift_rate: int = env("LIVEGIFT_GIFT_RATE", 10, minimum=1)
    gift_burst: int = env("LIVEGIFT_GIFT_BURST", 20, minimum=1)
    daily_spend_cap: int = env("LIVEGIFT_DAILY_SPEND_CAP", 0)
    auto_shoutout_coins: int = env("LIVEGIFT_AUTO_SHOUTOUT_COINS", 1000)
    auto_shoutout_template: str = env(
        "LIVEGIFT_AUTO_SHOUTOUT_TEMPLATE", "Huge thanks to {name} for the {gift}!"
    )
    combo_window_ms: int = 5000
    # Room history kept for resume: at least this many events or this many seconds.
    history_len: int = env("LIVEGIFT_HISTORY_LEN", 1000, minimum=1)
    history_seconds: int = env("LIVEGIFT_HISTORY_SECONDS", 600, minimum=1)
    # Seconds an ended stream's room (its hash and top gifters) is kept for GET
    # /api/streams/{room}; its history goes after history_seconds (docs/protocol.md).
    ended_room_ttl: int = env("LIVEGIFT_ENDED_ROOM_TTL", 86400, minimum=1)
    # Payouts.
    commission_bps: int = env("LIVEGIFT_COMMISSION_BPS", 5000, maximum=10_000)
    payout_min_diamonds: int = env("LIVEGIFT_PAYOUT_MIN", 1000, minimum=1)
    payout_daily_cap_cents: int = env("LIVEGIFT_PAYOUT_DAILY_CAP", 100_000)
    # Garbage frames tolerated per connection before closing with 1008.
    max_bad_frames: int = 20
    # "fast": livegift.api.fastws under uvicorn; "asgi": the portable ASGI endpoint.
    ws: str = env("LIVEGIFT_WS", "fast")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        if not environ.get("LIVEGIFT_SECRET") or not environ.get("LIVEGIFT_PAYMENT_SECRET"):
            warnings.warn(
                "LIVEGIFT_SECRET / LIVEGIFT_PAYMENT_SECRET unset: using development secrets",
                RuntimeWarning,
                stacklevel=2,
            )
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            name = field.metadata.get("env")
            raw = environ.get(name) if name else None
            if raw:  # unset and empty both mean the default
                values[field.name] = _parse(field, raw)
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def quiet_settings() -> Settings:
    """The settings, without the development-secrets warning (commands print their own)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return Settings.from_env()


def is_loopback(host: str) -> bool:
    """Does listening on ``host`` reach this machine only? Unknown names count as public."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def public_host_problems(settings: Settings, host: str) -> list[str]:
    """Why ``livegift serve`` must not listen on ``host`` (PROTOCOL §8); empty when it may.

    Off the loopback interface, development secrets (unset, or set to the public
    development values) would let anyone forge tokens and receipts, and development mode
    signs sandbox receipts for anyone."""
    if is_loopback(host):
        return []
    problems = [
        f"{name} is unset (or the development value): anyone could forge {what} with the "
        f"development secret, which is public. Set {name} to a long random value "
        "(e.g. `openssl rand -hex 32`)."
        for name, what, value, dev in (
            ("LIVEGIFT_SECRET", "user tokens", settings.secret, DEV_SECRET),
            ("LIVEGIFT_PAYMENT_SECRET", "receipts", settings.payment_secret, DEV_PAYMENT_SECRET),
        )
        if value == dev
    ]
    if settings.dev_mode:
        problems.append(
            "development mode is on (LIVEGIFT_DEV=1 or --demo): it signs sandbox receipts "
            "for anyone. Unset LIVEGIFT_DEV and drop --demo, or listen on 127.0.0.1."
        )
    return problems
