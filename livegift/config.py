"""One frozen settings object, read from the environment once.

Every knob has a sane development default. Secrets fall back to development values with
a warning so that ``livegift serve`` works on a fresh machine; production deployments set
``LIVEGIFT_SECRET`` and ``LIVEGIFT_PAYMENT_SECRET``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEV_SECRET = "livegift-dev-secret-change-me-0123456789"
DEV_PAYMENT_SECRET = "livegift-dev-payment-secret-change-me-0123"


class ConfigError(ValueError):
    """An environment variable holds a value that cannot be used."""


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str | None = None
    secret: str = DEV_SECRET
    payment_secret: str = DEV_PAYMENT_SECRET
    data_dir: Path = field(default_factory=lambda: Path(".livegift"))
    dev_mode: bool = True
    # Fan-out: events for a room are gathered for this many ms, then written in one frame.
    batch_ms: int = 10
    # Large rooms widen their window up to this, so frames carry more events per write.
    max_batch_ms: int = 100
    # A socket whose unsent bytes pass this bound is closed with 4008.
    send_buffer_limit: int = 1 << 20
    # Kernel send buffer per WebSocket (SO_SNDBUF); fixed so that a stalled reader is
    # noticed after a bounded number of bytes, not after the kernel's autotuned megabytes.
    socket_sndbuf: int = 256 * 1024
    redis_max_connections: int = 64
    # Gift rules.
    gift_rate: int = 10
    gift_burst: int = 20
    daily_spend_cap: int = 0
    auto_shoutout_coins: int = 1000
    auto_shoutout_template: str = "Huge thanks to {name} for the {gift}!"
    combo_window_ms: int = 5000
    # Room history kept for resume: at least this many events or this many seconds.
    history_len: int = 1000
    history_seconds: int = 600
    # Payouts.
    commission_bps: int = 5000
    payout_min_diamonds: int = 1000
    payout_daily_cap_cents: int = 100_000
    # Garbage frames tolerated per connection before closing with 1008.
    max_bad_frames: int = 20
    # "fast": livegift.api.fastws under uvicorn; "asgi": the portable ASGI endpoint.
    ws: str = "fast"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        secret = env.get("LIVEGIFT_SECRET") or ""
        payment_secret = env.get("LIVEGIFT_PAYMENT_SECRET") or ""
        if not secret or not payment_secret:
            warnings.warn(
                "LIVEGIFT_SECRET / LIVEGIFT_PAYMENT_SECRET unset: using development secrets",
                RuntimeWarning,
                stacklevel=2,
            )
        settings = cls(
            redis_url=env.get("REDIS_URL") or None,
            secret=secret or DEV_SECRET,
            payment_secret=payment_secret or DEV_PAYMENT_SECRET,
            data_dir=Path(env.get("LIVEGIFT_DATA_DIR") or ".livegift"),
            dev_mode=_bool(env, "LIVEGIFT_DEV", True),
            batch_ms=_int(env, "LIVEGIFT_BATCH_MS", 10),
            max_batch_ms=_int(env, "LIVEGIFT_MAX_BATCH_MS", 100),
            send_buffer_limit=_int(env, "LIVEGIFT_SEND_BUFFER", 1 << 20, minimum=4096),
            socket_sndbuf=_int(env, "LIVEGIFT_SOCKET_SNDBUF", 256 * 1024),
            ws=env.get("LIVEGIFT_WS", "fast"),
            redis_max_connections=_int(env, "LIVEGIFT_REDIS_CONNECTIONS", 64, minimum=2),
            gift_rate=_int(env, "LIVEGIFT_GIFT_RATE", 10, minimum=1),
            gift_burst=_int(env, "LIVEGIFT_GIFT_BURST", 20, minimum=1),
            daily_spend_cap=_int(env, "LIVEGIFT_DAILY_SPEND_CAP", 0),
            auto_shoutout_coins=_int(env, "LIVEGIFT_AUTO_SHOUTOUT_COINS", 1000),
            auto_shoutout_template=env.get(
                "LIVEGIFT_AUTO_SHOUTOUT_TEMPLATE", "Huge thanks to {name} for the {gift}!"
            ),
            history_len=_int(env, "LIVEGIFT_HISTORY_LEN", 1000, minimum=1),
            history_seconds=_int(env, "LIVEGIFT_HISTORY_SECONDS", 600, minimum=1),
            commission_bps=_int(env, "LIVEGIFT_COMMISSION_BPS", 5000),
            payout_min_diamonds=_int(env, "LIVEGIFT_PAYOUT_MIN", 1000, minimum=1),
            payout_daily_cap_cents=_int(env, "LIVEGIFT_PAYOUT_DAILY_CAP", 100_000),
        )
        if settings.commission_bps > 10_000:
            raise ConfigError("LIVEGIFT_COMMISSION_BPS must be <= 10000")
        return settings

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)
