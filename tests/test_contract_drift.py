"""The browser client, the server and the protocol doc name the same facts.

The pages' client (livegift/web/client.js) keeps its own copies of two server facts: which
event types are durable, and a human text for every error code. docs/protocol.md lists the
error codes too. These tests fail when one of them drifts from the Python source of truth
(livegift.events.DURABLE, livegift.errors.BY_CODE). Pure Python: no browser, no server.

client.js marks each table with comment lines the parser below looks for:

    // contract:NAME begin
    var NAME = {
      key: value,
      ...
    };
    // contract:NAME end
"""

from __future__ import annotations

import pathlib
import re

import pytest

from livegift.errors import BY_CODE
from livegift.events import DURABLE

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLIENT_JS = ROOT / "livegift" / "web" / "client.js"
PROTOCOL_MD = ROOT / "docs" / "protocol.md"

# Codes that client.js makes itself and the server never sends.
CLIENT_ONLY_CODES = frozenset({"network", "timeout", "connection_lost", "dev_receipts_disabled"})

# One entry a line inside a contract block: `name: true,` or `name: "text",`; comment and
# blank lines are allowed.
_ENTRY = re.compile(r'^\s*([a-z][a-z0-9_]*): (true|"(?:[^"\\]|\\.)*"),?\s*$')
_SKIP = re.compile(r"^\s*(//.*)?$")


class ContractBlockError(AssertionError):
    pass


def js_table(source: str, name: str) -> dict[str, str]:
    """The entries (key -> value text) of the `// contract:NAME begin/end` block."""
    block = re.search(
        rf"^[ \t]*// contract:{name} begin[^\n]*\n(.*?)^[ \t]*// contract:{name} end\b",
        source,
        re.M | re.S,
    )
    if block is None:
        raise ContractBlockError(f"no '// contract:{name} begin' ... 'end' block in client.js")
    lines = block.group(1).splitlines()
    if (
        len(lines) < 2
        or not re.fullmatch(rf"\s*var {name} = \{{\s*", lines[0])
        or not re.fullmatch(r"\s*\};\s*", lines[-1])
    ):
        raise ContractBlockError(
            f"the {name} block must be exactly 'var {name} = {{', its entries, '}};'"
        )
    table: dict[str, str] = {}
    for line in lines[1:-1]:
        if _SKIP.match(line):
            continue
        entry = _ENTRY.match(line)
        if entry is None:
            raise ContractBlockError(f"{name}: cannot read {line.strip()!r} (one entry a line)")
        key, value = entry.groups()
        if key in table:
            raise ContractBlockError(f"{name}: {key!r} appears twice")
        table[key] = value
    if not table:
        raise ContractBlockError(f"the {name} block is empty")
    return table


def protocol_error_codes(markdown: str) -> dict[str, int]:
    """The codes (-> HTTP status) in docs/protocol.md's "## Error codes" section.

    The section is a prose list: "`bad_request` 400, `unauthorized` 401, ...".
    """
    section = re.search(r"^## Error codes[ \t]*\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    if section is None:
        raise ContractBlockError("docs/protocol.md has no '## Error codes' section")
    pairs = re.findall(r"`([a-z][a-z0-9_]*)`\s+(\d{3})\b", section.group(1))
    if not pairs:
        raise ContractBlockError("docs/protocol.md '## Error codes' lists no `code` status")
    codes: dict[str, int] = {}
    for code, status in pairs:
        if code in codes:
            raise ContractBlockError(f"docs/protocol.md lists {code!r} twice")
        codes[code] = int(status)
    return codes


# ---------------------------------------------------------------- the checks


def check_durable(js: str) -> None:
    keys = set(js_table(js, "DURABLE"))
    assert keys == set(DURABLE), (
        f"client.js DURABLE {sorted(keys)} != livegift.events.DURABLE {sorted(DURABLE)}"
    )


def check_error_text(js: str) -> None:
    codes = set(js_table(js, "ERROR_TEXT"))
    server = set(BY_CODE)
    missing = server - codes
    assert not missing, f"client.js ERROR_TEXT has no text for {sorted(missing)}"
    extra = codes - server - CLIENT_ONLY_CODES
    assert not extra, (
        f"client.js ERROR_TEXT has {sorted(extra)}: neither a code of livegift.errors.BY_CODE"
        " nor in CLIENT_ONLY_CODES (a code the server stopped sending?)"
    )
    stale = CLIENT_ONLY_CODES - codes
    assert not stale, f"CLIENT_ONLY_CODES {sorted(stale)} are not in client.js any more"


def check_protocol_doc(markdown: str) -> None:
    codes = set(protocol_error_codes(markdown))
    assert codes == set(BY_CODE), (
        f"docs/protocol.md error codes drift from livegift.errors.BY_CODE: "
        f"missing {sorted(set(BY_CODE) - codes)}, extra {sorted(codes - set(BY_CODE))}"
    )


def check_protocol_doc_statuses(markdown: str) -> None:
    documented = protocol_error_codes(markdown)
    wrong = {
        code: (status, BY_CODE[code].status)
        for code, status in documented.items()
        if code in BY_CODE and BY_CODE[code].status != status
    }
    assert not wrong, f"docs/protocol.md status != the exception's (doc, code): {wrong}"


@pytest.fixture(scope="module")
def client_js() -> str:
    return CLIENT_JS.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def protocol_md() -> str:
    return PROTOCOL_MD.read_text(encoding="utf-8")


def test_client_durable_types_are_the_servers(client_js: str) -> None:
    check_durable(client_js)


def test_client_has_a_text_for_every_error_code(client_js: str) -> None:
    check_error_text(client_js)
    # Every server code has a real sentence, not an empty string.
    texts = js_table(client_js, "ERROR_TEXT")
    assert all(re.fullmatch(r'"[^"]{10,}"', texts[code]) for code in BY_CODE), texts


def test_protocol_doc_lists_exactly_the_error_codes(protocol_md: str) -> None:
    check_protocol_doc(protocol_md)


def test_protocol_doc_statuses_are_the_exceptions(protocol_md: str) -> None:
    check_protocol_doc_statuses(protocol_md)


# ---------------------------------------------------------------- each check can fail


def _edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"test setup: {old!r} is not in the file once"
    return text.replace(old, new)


def test_the_checks_fail_on_drift(client_js: str, protocol_md: str) -> None:
    # DURABLE: a type missing, an extra type, a broken block.
    with pytest.raises(AssertionError, match="DURABLE"):
        check_durable(_edit(client_js, "    shoutout: true,\n", ""))
    with pytest.raises(AssertionError, match="DURABLE"):
        check_durable(
            _edit(client_js, "    gift: true,\n", "    gift: true,\n    viewers: true,\n")
        )
    with pytest.raises(ContractBlockError):
        check_durable(_edit(client_js, "// contract:DURABLE end", "// the end"))
    with pytest.raises(ContractBlockError):
        check_durable(_edit(client_js, "    gift: true,\n", "    gift: true, ack: true,\n"))

    # ERROR_TEXT: a server code without a text, an unknown extra code.
    line = next(x for x in client_js.splitlines() if x.strip().startswith("payout_limit:"))
    with pytest.raises(AssertionError, match="no text for \\['payout_limit'\\]"):
        check_error_text(_edit(client_js, line + "\n", ""))
    with pytest.raises(AssertionError, match="gone_away"):
        check_error_text(_edit(client_js, line + "\n", line + '\n    gone_away: "Bye.",\n'))
    line = next(x for x in client_js.splitlines() if x.strip().startswith("network:"))
    with pytest.raises(AssertionError, match="CLIENT_ONLY_CODES"):
        check_error_text(_edit(client_js, line + "\n", ""))

    # docs/protocol.md: a code missing, an extra code, a wrong status.
    with pytest.raises(AssertionError, match="missing \\['payout_limit'\\]"):
        check_protocol_doc(_edit(protocol_md, "`payout_limit` 409, ", ""))
    with pytest.raises(AssertionError, match="extra \\['teapot'\\]"):
        check_protocol_doc(_edit(protocol_md, "`internal` 500", "`internal` 500, `teapot` 418"))
    with pytest.raises(AssertionError, match="payout_limit"):
        check_protocol_doc_statuses(_edit(protocol_md, "`payout_limit` 409", "`payout_limit` 400"))
