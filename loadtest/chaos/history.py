"""The history of a chaos run: what the workload sent and heard, as the checker reads it.

This module is the contract between the workload (which writes it) and the checker
(which proves from it and a data-store snapshot that nothing acknowledged was lost or
doubled). It is JSON lines so a run of a million ops can be streamed to disk and read
back without holding two copies, and so a failed run can be inspected with ``jq``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

KINDS = ("gift", "purchase", "payout", "settle")
OUTCOMES = ("ok", "refused", "unknown")


@dataclass(slots=True)
class Op:
    """One money operation as the client saw it, across all its retries (same key)."""

    id: str
    kind: str
    user: str
    key: str
    args: dict[str, Any]
    attempts: int = 0
    outcome: str = "unknown"
    code: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    first_sent: float = 0.0
    last_answer: float = 0.0


@dataclass(slots=True)
class Member:
    """One viewer's view of one room over the whole run, across reconnects."""

    member: str
    room: str
    first_seq: int
    seen: list[int]
    incomplete: list[tuple[int, int]]
    reconnects: int


def write_history(path: Path, ops: Iterable[Op], members: Iterable[Member]) -> None:
    """Write ops then members as JSON lines tagged ``{"t": "op"}`` / ``{"t": "member"}``."""
    # orjson writes a dataclass itself, fields in order, far faster than asdict(): the tag
    # goes in front of its first field.
    with path.open("wb") as out:
        for op in ops:
            out.write(b'{"t":"op",' + orjson.dumps(op)[1:] + b"\n")
        for member in members:
            out.write(b'{"t":"member",' + orjson.dumps(member)[1:] + b"\n")


def read_history(path: Path) -> tuple[list[Op], list[Member]]:
    """Read a history back; ``incomplete`` ranges come back as tuples, as they were written.

    Raises ValueError naming the line on a malformed record, so a truncated file (a run
    killed mid-write) is reported plainly instead of as a KeyError deep in the checker.
    """
    ops: list[Op] = []
    members: list[Member] = []
    collecting = gc.isenabled()
    gc.disable()  # a million records and no cycle: the collector would only slow this down
    try:
        _read(path, ops, members)
    finally:
        if collecting:
            gc.enable()
    return ops, members


def _read(path: Path, ops: list[Op], members: list[Member]) -> None:
    with path.open("rb") as src:
        for number, raw in enumerate(src, 1):
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
                tag = record.pop("t")
                if tag == "op":
                    ops.append(Op(**record))
                elif tag == "member":
                    record["incomplete"] = [(int(a), int(b)) for a, b in record["incomplete"]]
                    members.append(Member(**record))
                else:
                    raise ValueError(f"unknown record type {tag!r}")
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: bad history record: {exc}") from exc
