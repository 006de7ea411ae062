"""The close-code catalogue: one place for every close, in step with the docs."""

from __future__ import annotations

import re

import pytest

from livegift import disconnect, errors
from tests.conftest import ROOT


def test_codes_are_unique_and_sendable() -> None:
    assert len(disconnect.BY_CODE) == len(disconnect.ALL)
    assert len({close.name for close in disconnect.ALL}) == len(disconnect.ALL)
    for close in disconnect.ALL:
        assert disconnect.may_send(close.code), close


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_codes_that_may_never_be_sent(code: int) -> None:
    assert not disconnect.may_send(code)


def test_docs_table_matches_the_catalogue() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    rows = re.findall(r"^\| (\d{4}) \| `(\w+)` \| [^|]+ \| (yes|no)[^|]* \|$", text, re.M)
    documented = {int(code): (name, answer == "yes") for code, name, answer in rows}
    catalogue = {c.code: (c.name, c.reconnect) for c in disconnect.ALL}
    assert documented == catalogue


def test_every_error_names_a_close_from_the_catalogue() -> None:
    for code, cls in errors.BY_CODE.items():
        assert cls.close in disconnect.ALL, code
    assert errors.Unavailable.close is disconnect.TRY_AGAIN_LATER
    assert errors.Unauthorized.close is disconnect.UNAUTHORIZED
    assert errors.NotFound.close is disconnect.NOT_FOUND
    assert errors.LiveGiftError.close is disconnect.SERVER_ERROR


def test_error_body_is_the_protocol_shape() -> None:
    exc = errors.InsufficientFunds()
    assert exc.body() == {"error": {"code": "insufficient_funds", "message": "not enough coins"}}
