"""The Lua scripts: their source, their registration, and where store errors become ours.

Each atomic operation is one ``livegift/lua/<name>.lua``, run with ``_prelude.lua`` in
front of it. Scripts answer domain failures with an error reply whose first word is a
PROTOCOL code; :func:`store_errors` turns those, and any other failure to reach the data
store, into the :mod:`livegift.errors` tree, here and nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib import resources
from typing import Any

from redis import exceptions as redis_errors
from redis.commands.core import AsyncScript

from livegift.errors import LiveGiftError, Unavailable, from_code
from livegift.keys import PARTITIONS

PRELUDE = "_prelude"


_FUNCTION = re.compile(r"^local function (\w+)\(", re.MULTILINE)


def _prelude_functions(prelude: str) -> list[tuple[str, str]]:
    """The prelude's functions in order: (name, its text with the comment above it)."""
    starts = [m.start() for m in _FUNCTION.finditer(prelude)]
    # A function's text begins after the previous function's end: with its comments.
    ends = [prelude.rfind("\nend\n", 0, s) + 5 for s in starts[1:]] + [len(prelude)]
    begins = [0, *ends[:-1]]
    return [(m.group(1), prelude[b:e]) for m, b, e in
            zip(_FUNCTION.finditer(prelude), begins, ends, strict=True)]  # fmt: skip


@cache
def script_source(name: str) -> str:
    """The text Redis runs for ``name``: the prelude's functions the script uses (each
    call defines them all afresh, so unused ones would cost every call), then the script."""
    lua = resources.files("livegift").joinpath("lua")
    prelude = lua.joinpath(f"{PRELUDE}.lua").read_text("utf-8")
    body = lua.joinpath(f"{name}.lua").read_text("utf-8")
    functions = _prelude_functions(prelude)
    needed: set[str] = set()
    text = body
    while True:  # what the script calls, and what those call
        more = {f for f, _ in functions if f not in needed and re.search(rf"\b{f}\(", text)}
        if not more:
            break
        needed |= more
        text = "".join(src for f, src in functions if f in more)
    used = "".join(src for f, src in functions if f in needed)
    return f"local PARTITIONS = {PARTITIONS}\n{used}\n{body}"


def script_names() -> list[str]:
    """Every script's name (the prelude is not a script of its own)."""
    lua = resources.files("livegift").joinpath("lua")
    return sorted(
        entry.name[:-4]
        for entry in lua.iterdir()
        if entry.name.endswith(".lua") and not entry.name.startswith("_")
    )


# Failures of a cluster that is down, failing over or resharding: nothing the caller did
# wrong, and a retry with the same req/txn/Idempotency-Key is safe (the scripts are
# idempotent). MovedError/AskError reach us only when redis-py's own redirects ran out
# or a hand-sent batch (livegift.pipeline) met them. RedisClusterException and its
# SlotNotCoveredError are not RedisErrors at all.
CLUSTER_FAILURES: tuple[type[Exception], ...] = (
    redis_errors.ClusterError,  # ClusterDownError, MasterDownError, "TTL exhausted"
    redis_errors.TryAgainError,
    redis_errors.AskError,  # and MovedError
    redis_errors.RedisClusterException,  # and SlotNotCoveredError
    # A promoted replica has no scripts (they are not replicated) until they are loaded.
    redis_errors.NoScriptError,
)
# Everything store_errors() turns into one of ours.
STORE_FAILURES: tuple[type[Exception], ...] = (
    redis_errors.RedisError,
    redis_errors.RedisClusterException,
)


class NotReplicated(redis_errors.RedisError):
    """The write ran, but no replica confirmed it within the WAIT timeout: the caller is
    answered ``unavailable`` and a retry with the same req gives the true outcome."""


def _store_error(exc: Exception) -> LiveGiftError:
    """A script's error reply or a failure to reach the store, as an exception of the tree."""
    if isinstance(exc, NotReplicated):
        return Unavailable("no replica of the data store confirmed the write in time")
    if isinstance(exc, redis_errors.OutOfMemoryError):
        # At maxmemory (noeviction) Redis refuses writes; a script fails at its first
        # write, having changed nothing. Reads still work (redis.conf, docs/money.md).
        return Unavailable("the data store is full: writes are refused until memory is freed")
    if isinstance(exc, CLUSTER_FAILURES):
        return Unavailable(f"data store cluster unavailable: {exc.__class__.__name__}")
    if isinstance(exc, redis_errors.ResponseError):
        text = str(exc)
        code, _, message = text.partition(" ")
        err = from_code(code, message or None)
        if type(err) is not LiveGiftError:
            return err
        return LiveGiftError(f"data store error: {text}")
    return Unavailable(f"data store unavailable: {exc.__class__.__name__}")


@contextmanager
def store_errors() -> Iterator[None]:
    """Raise what the data store answers inside the block as :class:`LiveGiftError`."""
    try:
        yield
    except STORE_FAILURES as exc:
        raise _store_error(exc) from None


class Scripts:
    """The scripts registered on one client; each reloads itself after NOSCRIPT."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._registered: dict[str, AsyncScript] = {}

    def __getitem__(self, name: str) -> AsyncScript:
        script = self._registered.get(name)
        if script is None:
            script = self.redis.register_script(script_source(name))
            self._registered[name] = script
        return script

    async def load(self) -> None:
        """Load every script up front, so the first calls don't meet NOSCRIPT."""
        for name in script_names():
            await self.redis.script_load(script_source(name))

    async def call(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        """Run one script; its error replies raise as :class:`LiveGiftError`."""
        with store_errors():
            return await self[name](keys=keys_, args=args)
