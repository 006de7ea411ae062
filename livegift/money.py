"""Money arithmetic as plain functions: integers only, no I/O."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PayoutSplit:
    gross: int
    commission: int
    net: int


def payout_split(diamonds: int, commission_bps: int) -> PayoutSplit:
    """1 diamond = 1 US cent gross; net = floor(gross × (10000 − bps) / 10000)."""
    if diamonds < 0 or not 0 <= commission_bps <= 10_000:
        raise ValueError("diamonds must be >= 0 and commission_bps within 0..10000")
    gross = diamonds
    net = gross * (10_000 - commission_bps) // 10_000
    return PayoutSplit(gross, gross - net, net)
