"""The pure parts of the hardening limits: buckets, admission, the join's bounded parsing,
room ids, replay chunks. No server, no Redis (tests/test_security_transport.py runs the
attacks against a real one)."""

from __future__ import annotations

import time

import pytest

from livegift import keys
from livegift.admission import Admission, Bucket, take
from livegift.api.guard import _within
from livegift.api.handshake import MAX_PARAM, MAX_PARAMS, MAX_QUERY, MAX_SEQ, Join, check_join
from livegift.auth import mint_token
from livegift.config import Settings
from livegift.errors import BadRequest, TooManyConnections, Unauthorized
from livegift.replay import chunks
from tests.conftest import PAYMENT_SECRET, SECRET

SETTINGS = Settings(secret=SECRET, payment_secret=PAYMENT_SECRET)


# -- the token bucket ------------------------------------------------------------------


def test_take_spends_a_full_burst_then_refuses() -> None:
    tokens, now = 3.0, 100.0
    taken = []
    for _ in range(5):
        tokens, ok = take(tokens, now, now, rate=10, burst=3)
        taken.append(ok)
    assert taken == [True, True, True, False, False]


def test_take_refills_at_the_rate_up_to_the_burst() -> None:
    # Times in powers of two, so that the float arithmetic is exact.
    assert take(0.0, 100.0, 100.0625, rate=8, burst=3) == (0.5, False)
    assert take(0.0, 100.0, 100.125, rate=8, burst=3) == (0.0, True)
    assert take(0.0, 100.0, 1000.0, rate=8, burst=3) == (2.0, True)  # idle: capped at burst
    assert take(1.0, 100.0, 99.0, rate=8, burst=3) == (0.0, True)  # a clock going back


def test_bucket_counts_attempts_on_its_clock() -> None:
    now = [0.0]
    bucket = Bucket(rate=2, burst=4, clock=lambda: now[0])
    assert [bucket.take() for _ in range(6)] == [True] * 4 + [False] * 2
    now[0] = 0.5  # one token back
    assert [bucket.take(), bucket.take()] == [True, False]
    assert not bucket.full()
    now[0] = 10.0
    assert bucket.full()


# -- connections per user --------------------------------------------------------------


def test_admission_caps_each_user_and_releases_exactly_once() -> None:
    admission = Admission(per_user=16, gift_rate=10, gift_burst=20)
    slots = [admission.enter("ann") for _ in range(16)]
    with pytest.raises(TooManyConnections) as refused:
        admission.enter("ann")
    assert refused.value.status == 429 and refused.value.code == "too_many_connections"
    assert admission.enter("bob").user == "bob"  # another user is not affected
    slots[0].release()
    slots[0].release()  # a second release gives back nothing more
    assert admission.open("ann") == 15
    again = admission.enter("ann")
    with pytest.raises(TooManyConnections):
        admission.enter("ann")
    for slot in [again, *slots[1:]]:
        slot.release()
    assert admission.open("ann") == 0


def test_a_users_sockets_share_one_gift_bucket_that_outlives_a_reconnect() -> None:
    admission = Admission(per_user=16, gift_rate=1, gift_burst=2)
    a, b = admission.enter("ann"), admission.enter("ann")
    assert a.bucket is b.bucket
    assert [a.bucket.take(), b.bucket.take(), a.bucket.take()] == [True, True, False]
    a.release()
    b.release()
    # Reconnecting at once does not refill it: the entry stays until the bucket is full.
    assert not admission.enter("ann").bucket.take()


def test_idle_entries_are_swept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("livegift.admission.SWEEP_MIN", 4)
    admission = Admission(per_user=2, gift_rate=1000, gift_burst=1)
    admission._sweep_at = 4
    for n in range(4):
        slot = admission.enter(f"u{n}")
        slot.bucket.take()  # empty, so the entry outlives the connection
        slot.release()
    assert len(admission) == 4
    time.sleep(0.01)  # every bucket refills (1000/s)
    admission.enter("new")
    assert len(admission) == 1


# -- the join: token first, bounded parsing --------------------------------------------


def join(
    query: bytes, path: str = "/ws/room1", headers: list[tuple[bytes, bytes]] | None = None
) -> Join:
    return check_join(SETTINGS, path, query, headers or [])


def token(user: str = "ann") -> bytes:
    return mint_token(SECRET, user, ttl=60).encode()


def test_the_token_is_checked_before_anything_else() -> None:
    with pytest.raises(Unauthorized):
        join(b"since=-1&token=forged")  # a bad since, but the token is looked at first
    with pytest.raises(Unauthorized):
        join(b"since=x", path="/ws/" + "x" * 10_000)
    with pytest.raises(Unauthorized):
        join(b"since=1", headers=[(b"sec-websocket-protocol", b"nope")])
    assert join(b"token=" + token()).user.id == "ann"
    bearer = [(b"authorization", b"Bearer " + token("bob"))]
    assert join(b"", headers=bearer).user.id == "bob"


def test_the_query_is_capped_before_it_is_parsed() -> None:
    with pytest.raises(BadRequest, match="query string"):
        join(b"token=" + token() + b"&a=" + b"x" * MAX_QUERY)
    with pytest.raises(BadRequest, match="query parameters"):
        join(b"token=" + token() + b"&a=1" * MAX_PARAMS)
    with pytest.raises(BadRequest, match="parameter is over"):
        join(b"token=" + token() + b"&a=" + b"x" * (MAX_PARAM + 1))
    # Percent-encoding and the first of repeated parameters, as parse_qs read them.
    encoded = token().replace(b".", b"%2E")
    assert join(b"token=" + encoded + b"&token=other").user.id == "ann"


@pytest.mark.parametrize(
    "since", [b"-1", b"x", b"1e3", b"1.0", b"18446744073709551616", b"\xd9\xa3", b"9" * 2000]
)
def test_since_must_be_a_bounded_non_negative_integer(since: bytes) -> None:
    with pytest.raises(BadRequest, match="since"):
        join(b"token=" + token() + b"&since=" + since)


def test_since_bounds() -> None:
    assert join(b"token=" + token() + b"&since=0").since == 0
    assert join(b"token=" + token() + b"&since=" + str(MAX_SEQ).encode()).since == MAX_SEQ
    with pytest.raises(BadRequest):
        join(b"token=" + token() + b"&since=" + str(MAX_SEQ + 1).encode())
    assert join(b"token=" + token()).since is None


@pytest.mark.parametrize(
    ("room", "ok"),
    [("Qk3xV2aPabc", True), ("demo", True), ("a.b-c_d", True), ("x" * 64, True),
     ("x:hist", False), ("x" * 65, False), ("", False), ("a/b", False), ("a\n", False),
     ("é", False)],
)  # fmt: skip
def test_one_room_id_pattern(room: str, ok: bool) -> None:
    assert keys.is_room(room) is ok
    assert join(b"token=" + token(), path=f"/ws/{room}").room == (room if ok else "")


# -- request bodies and replay chunks --------------------------------------------------


def test_content_length_within_the_limit() -> None:
    assert _within(b"0", 10) and _within(b"10", 10)
    assert not _within(b"11", 10)
    assert not _within(b"-1", 10) and not _within(b"1e3", 10) and not _within(b"", 10)
    assert not _within(b"9" * 5000, 10)  # no int() of a huge string


def test_replay_chunks_hold_at_most_their_size() -> None:
    events = [b"a" * 10, b"b" * 10, b"c" * 25, b"d" * 5, b"e" * 5]
    assert chunks(events, 20) == [[b"a" * 10, b"b" * 10], [b"c" * 25], [b"d" * 5, b"e" * 5]]
    assert chunks([], 20) == []
    assert [e for run in chunks(events, 1) for e in run] == events
