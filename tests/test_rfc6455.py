"""livegift.rfc6455, fed byte strings: frames by Autobahn testsuite category, the handshake.

No sockets and no Redis. Client frames are built masked by ``client_frame``. Every parser
case that takes the ``parse`` fixture runs three times: the bytes fed all at once, one
byte at a time, and in 7-byte chunks; each run must give the same events.

Cases per category: distinct cases, then pytest items (a case that takes ``parse`` is
three items, one per chunking):
    framing (1.x)               14    42
    pings/pongs (2.x)            8    24
    reserved bits (3.x)         25    75
    opcodes (4.x)               12    36
    fragmentation (5.x)         13    39
    UTF-8 (6.x)                 62   178
    masking (§5.3)               7    21
    close handshake (7.x)       41   117
    limits (9.x, 4 KiB)         13    31
    server frames               17    17
    opening handshake           34    34
    parser state                 5     5
    total                      251   619
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
from websockets.utils import apply_mask

from livegift import disconnect
from livegift.rfc6455 import (
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    CloseReceived,
    Event,
    Fail,
    FrameParser,
    HandshakeError,
    Message,
    Ping,
    Pong,
    accept_response,
    accept_value,
    check_partial,
    close_frame,
    close_reply,
    frame,
    parse_upgrade,
)

MASK = b"\x37\xfa\x21\x3d"
Seen = Event | tuple[str, int]  # a Fail is compared by its close code: ("fail", code)
Parse = Callable[..., list[Seen]]


def client_frame(
    payload: bytes,
    opcode: int = OP_TEXT,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
    length: int | None = None,
    wide: bool = False,
) -> bytes:
    """A client frame; ``length`` overrides the announced length, ``wide`` forces 64 bits."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if mask is not None else 0
    if wide or n >= 1 << 16:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    elif n >= 126:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | n])
    if mask is None:
        return head + payload
    return head + mask + apply_mask(payload, mask)


def text(data: str, *, fin: bool = True, wide: bool = False) -> bytes:
    return client_frame(data.encode(), OP_TEXT, fin=fin, wide=wide)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return client_frame(code.to_bytes(2, "big") + reason, OP_CLOSE)


def seen(events: list[Event]) -> list[Seen]:
    return [("fail", e.close.code) if isinstance(e, Fail) else e for e in events]


def run(data: bytes, chunk: int, max_message: int | None = None) -> list[Seen]:
    parser = FrameParser() if max_message is None else FrameParser(max_message)
    step = chunk or len(data) or 1
    events: list[Event] = []
    for i in range(0, len(data), step):
        events += parser.feed(data[i : i + step])
    return seen(events)


@pytest.fixture(params=[0, 1, 7], ids=["whole", "bytewise", "chunks7"])
def parse(request: pytest.FixtureRequest) -> Parse:
    chunk: int = request.param

    def parse(data: bytes, max_message: int | None = None) -> list[Seen]:
        return run(data, chunk, max_message)

    return parse


FAIL_1002 = ("fail", 1002)
FAIL_1007 = ("fail", 1007)
FAIL_1009 = ("fail", 1009)
TRAILER = text("after") + client_frame(b"", OP_PING)  # must never come out after a failure


# -- framing (Autobahn 1.x) --------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 128, 4096])
def test_framing_text_of_length(parse: Parse, size: int) -> None:
    assert parse(text("*" * size)) == [Message(False, "*" * size)]


@pytest.mark.parametrize("size", [0, 125, 126, 4095])
def test_framing_binary_of_length(parse: Parse, size: int) -> None:
    payload = bytes(range(256)) * 16
    assert parse(client_frame(payload[:size], OP_BINARY)) == [Message(True, payload[:size])]


def test_framing_64_bit_length_for_a_small_payload(parse: Parse) -> None:
    assert parse(text("short", wide=True)) == [Message(False, "short")]


def test_framing_several_frames_in_one_feed(parse: Parse) -> None:
    data = text("a") + client_frame(b"\x00\xff", OP_BINARY) + text("c" * 300)
    expected = [Message(False, "a"), Message(True, b"\x00\xff"), Message(False, "c" * 300)]
    assert parse(data) == expected


def test_framing_incomplete_frame_gives_nothing_yet(parse: Parse) -> None:
    assert parse(text("complete") + text("partial")[:-1]) == [Message(False, "complete")]


# -- pings and pongs (Autobahn 2.x) ------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "opcode", "event"),
    [
        (b"", OP_PING, Ping(b"")),
        (b"Hello, world!", OP_PING, Ping(b"Hello, world!")),
        (bytes(range(125)), OP_PING, Ping(bytes(range(125)))),
        (b"", OP_PONG, Pong(b"")),
        (b"unsolicited", OP_PONG, Pong(b"unsolicited")),
    ],
    ids=["ping-empty", "ping-text", "ping-binary-125", "pong-empty", "pong-unsolicited"],
)
def test_pings_control_frame(parse: Parse, payload: bytes, opcode: int, event: Event) -> None:
    assert parse(client_frame(payload, opcode)) == [event]


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG])
def test_pings_payload_of_126_fails(parse: Parse, opcode: int) -> None:
    assert parse(client_frame(b"x" * 126, opcode) + TRAILER) == [FAIL_1002]


def test_pings_ten_in_a_row(parse: Parse) -> None:
    data = b"".join(client_frame(str(i).encode(), OP_PING) for i in range(10))
    assert parse(data) == [Ping(str(i).encode()) for i in range(10)]


# -- reserved bits (Autobahn 3.x) --------------------------------------------------------


@pytest.mark.parametrize("rsv", range(1, 8))
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_PING], ids=["text", "binary", "ping"])
def test_reserved_bits_fail(parse: Parse, rsv: int, opcode: int) -> None:
    data = text("ok") + client_frame(b"x", opcode, rsv=rsv) + TRAILER
    assert parse(data) == [Message(False, "ok"), FAIL_1002]


@pytest.mark.parametrize("rsv", [1, 2, 4])
def test_reserved_bits_on_close_fail(parse: Parse, rsv: int) -> None:
    frame_ = client_frame((1000).to_bytes(2, "big"), OP_CLOSE, rsv=rsv)
    assert parse(frame_ + TRAILER) == [FAIL_1002]


def test_reserved_bits_on_a_continuation_fail(parse: Parse) -> None:
    data = text("a", fin=False) + client_frame(b"b", OP_CONT, rsv=1) + TRAILER
    assert parse(data) == [FAIL_1002]


# -- opcodes (Autobahn 4.x) --------------------------------------------------------------


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_opcodes_reserved_fail(parse: Parse, opcode: int) -> None:
    data = text("ok") + client_frame(b"payload", opcode) + TRAILER
    assert parse(data) == [Message(False, "ok"), FAIL_1002]


@pytest.mark.parametrize("opcode", [5, 0xD])
def test_opcodes_reserved_without_payload_fail(parse: Parse, opcode: int) -> None:
    assert parse(client_frame(b"", opcode) + TRAILER) == [FAIL_1002]


# -- fragmentation (Autobahn 5.x) --------------------------------------------------------


def test_fragmentation_text_in_two(parse: Parse) -> None:
    data = text("frag", fin=False) + client_frame(b"ment", OP_CONT)
    assert parse(data) == [Message(False, "fragment")]


def test_fragmentation_binary_in_one_byte_fragments(parse: Parse) -> None:
    payload = bytes(range(40))
    frames = [client_frame(payload[:1], OP_BINARY, fin=False)]
    frames += [client_frame(payload[i : i + 1], OP_CONT, fin=False) for i in range(1, 39)]
    frames.append(client_frame(payload[39:], OP_CONT))
    assert parse(b"".join(frames)) == [Message(True, payload)]


def test_fragmentation_empty_fragments(parse: Parse) -> None:
    data = text("", fin=False) + client_frame(b"", OP_CONT, fin=False) + client_frame(b"", 0)
    assert parse(data) == [Message(False, "")]


def test_fragmentation_pings_between_fragments(parse: Parse) -> None:
    data = (
        text("one ", fin=False)
        + client_frame(b"p1", OP_PING)
        + client_frame(b"two ", OP_CONT, fin=False)
        + client_frame(b"p2", OP_PONG)
        + client_frame(b"three", OP_CONT)
    )
    assert parse(data) == [Ping(b"p1"), Pong(b"p2"), Message(False, "one two three")]


def test_fragmentation_close_between_fragments(parse: Parse) -> None:
    data = text("half", fin=False) + close_payload(1000) + client_frame(b"rest", OP_CONT)
    assert parse(data) == [CloseReceived(1000, "")]


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmentation_of_a_control_frame_fails(parse: Parse, opcode: int) -> None:
    data = client_frame(b"ab", opcode, fin=False) + client_frame(b"cd", OP_CONT) + TRAILER
    assert parse(data) == [FAIL_1002]


@pytest.mark.parametrize("fin", [True, False], ids=["fin", "not-fin"])
def test_fragmentation_continuation_without_a_message_fails(parse: Parse, fin: bool) -> None:
    assert parse(client_frame(b"x", OP_CONT, fin=fin) + TRAILER) == [FAIL_1002]


def test_fragmentation_continuation_after_the_message_ended_fails(parse: Parse) -> None:
    data = text("a", fin=False) + client_frame(b"b", OP_CONT) + client_frame(b"c", OP_CONT)
    assert parse(data + TRAILER) == [Message(False, "ab"), FAIL_1002]


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_fragmentation_new_message_while_one_is_open_fails(parse: Parse, opcode: int) -> None:
    data = text("a", fin=False) + client_frame(b"b", opcode) + TRAILER
    assert parse(data) == [FAIL_1002]


# -- UTF-8 (Autobahn 6.x) ----------------------------------------------------------------

VALID_UTF8 = [
    "",
    "Hello-µ@ßöäüàá-UTF-8!!",
    "κόσμε",
    "\u007f\u0080\u07ff\u0800\ufffd\uffff\U00010000\U0010ffff",
    "\ufffe\ufeff",  # noncharacters and a BOM are valid UTF-8
    "😀 emoji 🎁",
]
INVALID_UTF8 = {
    "lone-continuation-80": b"\x80",
    "lone-continuation-bf": b"ab\xbf",
    "truncated-2-byte": b"\xc2",
    "truncated-3-byte": b"\xe0\xa0",
    "truncated-4-byte": b"\xf0\x9f\x98",
    "byte-fe": b"\xfe",
    "byte-ff": b"\xff",
    "start-byte-f5": b"\xf5\x80\x80\x80",
    "above-10ffff": b"\xf4\x90\x80\x80",
    "kosme-then-bad": "κόσμε".encode() + b"\xed\xa0\x80edited",
    "start-then-ascii": b"\xce ",
}
OVERLONG = {
    "slash-2": b"\xc0\xaf",
    "slash-3": b"\xe0\x80\xaf",
    "slash-4": b"\xf0\x80\x80\xaf",
    "max-2": b"\xc1\xbf",
    "max-3": b"\xe0\x9f\xbf",
    "max-4": b"\xf0\x8f\xbf\xbf",
    "nul-2": b"\xc0\x80",
}
SURROGATES = {
    "d800": b"\xed\xa0\x80",
    "dbff": b"\xed\xaf\xbf",
    "dc00": b"\xed\xb0\x80",
    "dfff": b"\xed\xbf\xbf",
    "pair-d800-dc00": b"\xed\xa0\x80\xed\xb0\x80",
}
BAD = {**INVALID_UTF8, **{f"overlong-{k}": v for k, v in OVERLONG.items()}}
BAD |= {f"surrogate-{k}": v for k, v in SURROGATES.items()}


@pytest.mark.parametrize("value", VALID_UTF8)
def test_utf8_valid_text(parse: Parse, value: str) -> None:
    assert parse(text(value)) == [Message(False, value)]


@pytest.mark.parametrize("value", VALID_UTF8[1:])
def test_utf8_valid_split_into_one_byte_fragments(parse: Parse, value: str) -> None:
    raw = value.encode()
    frames = [client_frame(raw[:1], OP_TEXT, fin=False)]
    frames += [
        client_frame(raw[i : i + 1], OP_CONT, fin=i == len(raw) - 1) for i in range(1, len(raw))
    ]
    assert parse(b"".join(frames)) == [Message(False, value)]


@pytest.mark.parametrize("raw", BAD.values(), ids=BAD.keys())
def test_utf8_invalid_text_fails(parse: Parse, raw: bytes) -> None:
    assert parse(client_frame(raw) + TRAILER) == [FAIL_1007]


@pytest.mark.parametrize("raw", BAD.values(), ids=BAD.keys())
def test_utf8_invalid_split_across_fragments_fails(parse: Parse, raw: bytes) -> None:
    cut = (len(raw) + 1) // 2
    data = client_frame(raw[:cut], fin=False) + client_frame(raw[cut:], OP_CONT)
    assert parse(data + TRAILER) == [FAIL_1007]


@pytest.mark.parametrize("raw", [b"\xff", b"\xc0\xaf", b"\xf4\x90", b"ok\x80"])
def test_utf8_fragmented_text_fails_before_the_last_fragment(raw: bytes) -> None:
    parser = FrameParser()
    assert seen(parser.feed(client_frame(raw, fin=False))) == [FAIL_1007]
    assert parser.feed(client_frame(b"rest", OP_CONT)) == []


def test_utf8_not_checked_in_binary_messages(parse: Parse) -> None:
    assert parse(client_frame(b"\xff\xed\xa0\x80", OP_BINARY)) == [
        Message(True, b"\xff\xed\xa0\x80")
    ]


# -- masking (RFC 6455 §5.3) -------------------------------------------------------------


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_PING, OP_CLOSE])
def test_masking_unmasked_frame_fails(parse: Parse, opcode: int) -> None:
    assert parse(client_frame(b"\x03\xe8", opcode, mask=None) + TRAILER) == [FAIL_1002]


@pytest.mark.parametrize(
    "mask",
    [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", os.urandom(4)],
    ids=["zero", "ones", "random"],
)
def test_masking_any_mask_is_removed(parse: Parse, mask: bytes) -> None:
    payload = os.urandom(1001)
    assert parse(client_frame(payload, OP_BINARY, mask=mask)) == [Message(True, payload)]


# -- close handshake (Autobahn 7.x) ------------------------------------------------------

VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
VALID_CODES += [3000, 3999, 4000, 4999]
INVALID_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


def test_close_empty(parse: Parse) -> None:
    assert parse(client_frame(b"", OP_CLOSE) + TRAILER) == [CloseReceived(None, "")]


def test_close_one_byte_payload_fails(parse: Parse) -> None:
    assert parse(client_frame(b"\x03", OP_CLOSE) + TRAILER) == [FAIL_1002]


@pytest.mark.parametrize("code", VALID_CODES)
def test_close_valid_code(parse: Parse, code: int) -> None:
    assert parse(close_payload(code) + TRAILER) == [CloseReceived(code, "")]


@pytest.mark.parametrize("code", INVALID_CODES)
def test_close_invalid_code_fails(parse: Parse, code: int) -> None:
    assert parse(close_payload(code) + TRAILER) == [FAIL_1002]


@pytest.mark.parametrize("reason", ["bye", "κόσμε 😀", "x" * 123])
def test_close_reason(parse: Parse, reason: str) -> None:
    assert parse(close_payload(1000, reason.encode())) == [CloseReceived(1000, reason)]


@pytest.mark.parametrize("reason", [b"\xff", b"\xed\xa0\x80", b"ok\xc0\xaf"])
def test_close_reason_not_utf8_fails(parse: Parse, reason: bytes) -> None:
    assert parse(close_payload(1000, reason) + TRAILER) == [FAIL_1007]


def test_close_payload_over_125_fails(parse: Parse) -> None:
    assert parse(close_payload(1000, b"x" * 124)) == [FAIL_1002]


def test_close_ends_the_stream(parse: Parse) -> None:
    data = text("before") + close_payload(1001, b"going") + close_payload(1000) + TRAILER
    assert parse(data) == [Message(False, "before"), CloseReceived(1001, "going")]


@pytest.mark.parametrize(("code", "reply"), [(None, 1000), (1001, 1001), (4404, 4404)])
def test_close_reply_echoes_the_code(code: int | None, reply: int) -> None:
    assert close_reply(CloseReceived(code, "why")) == b"\x88\x02" + reply.to_bytes(2, "big")


# -- limits (Autobahn 9.x, with our 4 KiB message limit) ---------------------------------


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_limits_exactly_4096_is_fine(parse: Parse, opcode: int) -> None:
    events = parse(client_frame(b"z" * 4096, opcode))
    assert len(events) == 1 and isinstance(events[0], Message) and len(events[0].data) == 4096


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_limits_4097_fails(parse: Parse, opcode: int) -> None:
    assert parse(client_frame(b"z" * 4097, opcode) + TRAILER) == [FAIL_1009]


def test_limits_fragments_adding_up_to_4096_are_fine(parse: Parse) -> None:
    data = text("a" * 4000, fin=False) + client_frame(b"b" * 96, OP_CONT)
    assert parse(data) == [Message(False, "a" * 4000 + "b" * 96)]


def test_limits_fragments_over_4096_fail(parse: Parse) -> None:
    data = text("a" * 4000, fin=False) + client_frame(b"b" * 60, OP_CONT, fin=False)
    assert parse(data + client_frame(b"c" * 37, OP_CONT) + TRAILER) == [FAIL_1009]


def test_limits_control_frames_do_not_count_towards_a_message(parse: Parse) -> None:
    data = text("a" * 4090, fin=False) + client_frame(b"p" * 125, OP_PING)
    assert parse(data + client_frame(b"b" * 6, OP_CONT)) == [
        Ping(b"p" * 125),
        Message(False, "a" * 4090 + "b" * 6),
    ]


def test_limits_custom_max_message(parse: Parse) -> None:
    assert parse(text("x" * 10) + text("x" * 11), max_message=10) == [
        Message(False, "x" * 10),
        FAIL_1009,
    ]


def test_limits_length_with_the_top_bit_set_fails(parse: Parse) -> None:
    assert parse(client_frame(b"", OP_BINARY, length=1 << 63)) == [FAIL_1002]


@pytest.mark.parametrize(
    ("header", "length"), [(4, 4097), (10, 1 << 32), (4, 65535)], ids=["16-bit", "64-bit", "65535"]
)
def test_limits_detected_from_the_header_alone(header: int, length: int) -> None:
    parser = FrameParser()
    data = client_frame(b"", OP_TEXT, length=length)[:header]
    assert seen(parser.feed(data[:-1])) == []
    assert seen(parser.feed(data[-1:])) == [FAIL_1009]


def test_limits_continuation_over_the_limit_detected_from_its_header() -> None:
    parser = FrameParser()
    assert parser.feed(text("a" * 4000, fin=False)) == []
    assert seen(parser.feed(client_frame(b"b" * 97, OP_CONT)[:2])) == [FAIL_1009]


# -- server frames -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_server_frames_length_encodings(size: int, header: bytes) -> None:
    assert frame(b"x" * size, OP_TEXT) == header + b"x" * size


def test_server_frames_control_over_125_refused() -> None:
    with pytest.raises(ValueError):
        frame(b"x" * 126, OP_PING)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 2999, 5000])
def test_server_frames_close_code_that_may_not_be_sent(code: int) -> None:
    with pytest.raises(ValueError):
        close_frame(code)


def test_server_frames_close_reason_cut_on_a_character_boundary() -> None:
    out = close_frame(1000, "é" * 100)  # 200 bytes; 123 would split a character
    assert out[:2] == b"\x88\x7c" and out[4:].decode() == "é" * 61


def test_server_frames_close_with_every_catalogue_code() -> None:
    for close in disconnect.ALL:
        out = close_frame(close.code, close.reason)
        assert out[2:4] == close.code.to_bytes(2, "big") and out[4:] == close.reason.encode()


def test_server_frames_close_reason_with_lone_surrogate_is_replaced() -> None:
    assert close_frame(1000, "a\udc80b")[4:] == b"a?b"


# -- opening handshake (RFC 6455 §4.2) ---------------------------------------------------

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
GOOD = {
    "Host": "example.com",
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": KEY,
    "Sec-WebSocket-Version": "13",
}


def request(
    headers: dict[str, str] | None = None, line: str = "GET /ws/room1?token=t HTTP/1.1"
) -> bytes:
    fields = GOOD if headers is None else headers
    return (line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n").encode()


def refused(data: bytes) -> int:
    with pytest.raises(HandshakeError) as info:
        parse_upgrade(data)
    return info.value.status


def test_handshake_good_upgrade() -> None:
    up = parse_upgrade(request() + b"\x81\x80trailing")
    assert (up.method, up.target, up.key) == (b"GET", b"/ws/room1?token=t", KEY.encode())
    assert (up.path, up.query) == (b"/ws/room1", b"token=t")
    assert up.headers[0] == (b"host", b"example.com") and len(up.headers) == 5


def test_handshake_header_names_are_case_insensitive() -> None:
    headers = {k.upper(): v for k, v in GOOD.items()} | {"connection": "keep-alive, UPGRADE"}
    headers["UPGRADE"] = "WebSocket"
    up = parse_upgrade(request(headers))
    assert up.key == KEY.encode() and (b"sec-websocket-version", b"13") in up.headers


def test_handshake_accept_value_of_the_rfc_sample_key() -> None:
    assert accept_value(KEY.encode()) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # §1.3
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in accept_response(
        KEY.encode()
    )


def test_handshake_accept_response() -> None:
    out = accept_response(KEY.encode(), "livegift.msgpack")
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and out.endswith(b"\r\n\r\n")
    assert b"\r\nSec-WebSocket-Protocol: livegift.msgpack\r\n" in out
    assert b"Sec-WebSocket-Protocol" not in accept_response(KEY.encode())
    with pytest.raises(ValueError):
        accept_response(KEY.encode(), "evil\r\nX-Injected: 1")


@pytest.mark.parametrize(
    "key",
    [
        "",
        "not base64!",
        "dGhlIHNhbXBsZSBub25j",
        "dGhlIHNhbXBsZSBub25jZSE=",
        "dGhlIHNhbXBsZSBub25jZQ",
        "dGhlIHNhbXBsZSBub25jZQ==x",
    ],
    ids=["empty", "not-base64", "15-bytes", "17-bytes", "no-padding", "trailing-garbage"],
)
def test_handshake_bad_key_is_400(key: str) -> None:
    assert refused(request(GOOD | {"Sec-WebSocket-Key": key})) == 400


def test_handshake_missing_or_repeated_key_is_400() -> None:
    assert refused(request({k: v for k, v in GOOD.items() if k != "Sec-WebSocket-Key"})) == 400
    assert (
        refused(request().replace(b"\r\n\r\n", f"\r\nsec-websocket-key: {KEY}\r\n\r\n".encode()))
        == 400
    )


@pytest.mark.parametrize(
    "change",
    [{"Sec-WebSocket-Version": "8"}, {"Upgrade": "h2c"}, {"Connection": "keep-alive"}],
    ids=["version-8", "upgrade-h2c", "connection-without-upgrade"],
)
def test_handshake_not_a_websocket_13_upgrade_is_426(change: dict[str, str]) -> None:
    assert refused(request(GOOD | change)) == 426


@pytest.mark.parametrize("name", ["Sec-WebSocket-Version", "Upgrade", "Connection"])
def test_handshake_missing_header_is_426(name: str) -> None:
    assert refused(request({k: v for k, v in GOOD.items() if k != name})) == 426


def test_handshake_post_is_426() -> None:
    assert refused(request(line="POST /ws/room1 HTTP/1.1")) == 426


@pytest.mark.parametrize(
    "line",
    [
        "GET /ws/room1 HTTP/1.0",
        "GET /ws/room1",
        "GET  /ws/room1 HTTP/1.1",
        "GET ws HTTP/1.1",
        "GET /a b HTTP/1.1",
        "",
    ],
    ids=["http-1.0", "no-version", "double-space", "not-origin-form", "space-in-target", "empty"],
)
def test_handshake_malformed_request_line_is_400(line: str) -> None:
    assert refused(request(line=line)) == 400


@pytest.mark.parametrize(
    "header",
    [b"No-Colon", b"Bad Name: x", b"Name : x", b" folded: x", b"X-Bad: a\rb", b": empty"],
    ids=["no-colon", "space-in-name", "space-before-colon", "obs-fold", "bare-cr", "empty-name"],
)
def test_handshake_malformed_header_is_400(header: bytes) -> None:
    assert refused(request().replace(b"Host:", header + b"\r\nHost:")) == 400


def test_handshake_incomplete_head_is_400() -> None:
    assert refused(request()[:-2]) == 400


def test_handshake_request_line_limit_on_a_partial_buffer() -> None:
    start = b"GET /" + b"a" * (MAX_REQUEST_LINE - 15) + b" HTTP/1.1\r"  # CRLF 1 byte too far
    check_partial(start[: MAX_REQUEST_LINE - 1])
    with pytest.raises(HandshakeError) as info:
        check_partial(start[:MAX_REQUEST_LINE])
    assert info.value.status == 414
    check_partial(b"GET /" + b"a" * (MAX_REQUEST_LINE - 17) + b" HTTP/1.1\r\n")  # at the limit


def test_handshake_header_limit_on_a_partial_buffer() -> None:
    head = request()[:-2] + b"X-Pad: " + b"p" * (MAX_HEADERS - len(request()) - 9) + b"\r\n"
    assert len(head) == MAX_HEADERS - 2
    check_partial(head)  # the blank line would still fit
    parse_upgrade(head + b"\r\n")
    with pytest.raises(HandshakeError) as info:
        check_partial(head[:-2] + b"pp\r\n")  # the blank line cannot end within the limit now
    assert info.value.status == 431


def test_handshake_parse_applies_the_limits_too() -> None:
    assert refused(request(line="GET /" + "a" * MAX_REQUEST_LINE + " HTTP/1.1")) == 414
    assert refused(request(GOOD | {"X-Pad": "p" * MAX_HEADERS})) == 431


# -- parser state ------------------------------------------------------------------------


def test_parser_state_is_slotted_and_holds_no_buffer_when_idle() -> None:
    parser = FrameParser()
    assert not hasattr(parser, "__dict__")
    parser.feed(text("hello") + text("frag", fin=False) + client_frame(b"ment", OP_CONT))
    assert (parser._buf, parser._frag, parser._decoder) == (None, None, None)


def test_parser_state_partial_frame_is_buffered_until_complete() -> None:
    parser = FrameParser()
    data = text("x" * 200)
    assert parser.feed(data[:100]) == [] and parser._buf is not None
    assert parser.feed(data[100:]) == [Message(False, "x" * 200)] and parser._buf is None


def test_parser_state_finished_after_a_failure_or_a_close() -> None:
    for first in (client_frame(b"\xff"), close_payload(1000)):
        parser = FrameParser()
        parser.feed(first[:-1])
        assert not parser.finished
        assert len(parser.feed(first[-1:] + text("more"))) == 1 and parser.finished
        assert parser.feed(text("ignored")) == [] and parser._buf is None


def test_parser_state_empty_feed() -> None:
    assert FrameParser().feed(b"") == []


def test_parser_state_random_chunking_gives_the_same_events() -> None:
    data = (
        text("hello")
        + client_frame(os.urandom(3000), OP_BINARY)
        + text("κό", fin=False)
        + client_frame(b"p", OP_PING)
        + client_frame("σμε".encode(), OP_CONT)
        + close_payload(1000, b"done")
    )
    whole = run(data, 0)
    assert len(whole) == 5
    rng = random.Random(6455)
    for _ in range(20):
        parser, events, i = FrameParser(), [], 0
        while i < len(data):
            step = rng.randint(1, 200)
            events += parser.feed(data[i : i + step])
            i += step
        assert seen(events) == whole
