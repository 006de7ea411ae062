"""The room sequencer: seqs in, deliveries out, with no network and no event loop."""

from __future__ import annotations

import random

import pytest

from livegift.sequencer import Sequencer, Step


def started(head: int = 0) -> Sequencer[str]:
    seq: Sequencer[str] = Sequencer()
    seq.begin(head)
    return seq


def seqs(step: Step[str]) -> list[int]:
    return [n for n, _ in step.deliver]


def test_in_order_events_go_out_at_once_and_duplicates_are_dropped() -> None:
    seq = started()
    for n in (1, 2, 3):
        step = seq.feed(n, f"e{n}")
        assert step.deliver == [(n, f"e{n}")] and not step.fill and not step.dropped
    for n in (3, 1):
        assert seq.feed(n, "again") == Step(dropped=1)
    assert seq.last == 3 and not seq.filling


def test_events_before_begin_wait_and_only_those_after_the_head_go_out() -> None:
    seq: Sequencer[str] = Sequencer()
    for n in (4, 5, 6):
        assert seq.feed(n, f"e{n}") == Step()
    step = seq.begin(4)
    assert seqs(step) == [5, 6] and step.dropped == 1 and not step.fill
    assert seq.started and seq.last == 6


def test_an_early_event_after_a_gap_starts_a_fill_at_begin() -> None:
    seq: Sequencer[str] = Sequencer()
    seq.feed(9, "e9")
    step = seq.begin(7)
    assert step.deliver == [] and step.fill and seq.filling
    assert seq.gap() == (7, 8)
    assert seqs(seq.filled([(8, "e8")])) == [8, 9]
    assert not seq.filling


def test_out_of_order_events_wait_for_the_fill_and_go_out_in_order() -> None:
    seq = started()
    seq.feed(1, "e1")
    step = seq.feed(3, "e3")
    assert step.deliver == [] and step.fill and seq.filling
    # Later events wait too, even the one that closes the gap: the fill releases them.
    for n in (4, 2, 4):
        step = seq.feed(n, f"e{n}")
        assert step.deliver == [] and not step.fill
    assert step.dropped == 1  # the second 4
    assert seq.gap() == (1, 3)
    step = seq.filled([(2, "e2"), (3, "e3")])
    assert step.deliver == [(2, "e2"), (3, "e3"), (4, "e4")]
    assert step.dropped == 2 and step.lost == []
    assert not seq.filling and seq.last == 4
    assert seqs(seq.feed(5, "e5")) == [5]


def test_history_that_lost_the_gap_reports_it_and_moves_on() -> None:
    seq = started(1)
    assert seq.feed(5, "e5").fill
    assert seq.gap() == (1, 4)
    step = seq.filled([])
    assert step.lost == [(2, 4)] and seqs(step) == [5]
    assert not seq.filling and seq.last == 5


def test_history_that_lost_only_the_oldest_part() -> None:
    seq = started(1)
    seq.feed(5, "e5")
    assert seq.gap() == (1, 4)
    step = seq.filled([(3, "e3"), (4, "e4")])
    assert step.lost == [(2, 2)] and seqs(step) == [3, 4, 5]


def test_events_arriving_during_a_fill_beyond_its_range_start_another_round() -> None:
    seq = started(5)
    seq.feed(10, "e10")
    assert seq.gap() == (5, 9)
    seq.feed(12, "e12")  # published while the history read was under way; 11 is late
    step = seq.filled([(n, f"e{n}") for n in range(6, 10)])
    assert seqs(step) == [6, 7, 8, 9, 10] and step.lost == []
    assert seq.filling  # 11 was never asked for: not lost, just not read yet
    assert seq.gap() == (10, 11)
    step = seq.filled([(11, "e11")])
    assert seqs(step) == [11, 12] and not seq.filling


def test_only_the_range_that_was_read_counts_as_lost() -> None:
    seq = started(5)
    seq.feed(10, "e10")
    assert seq.gap() == (5, 9)
    seq.feed(13, "e13")
    step = seq.filled([])
    assert step.lost == [(6, 9)] and seqs(step) == [10]
    assert seq.gap() == (10, 12)
    step = seq.filled([(11, "e11")])
    assert step.lost == [(12, 12)] and seqs(step) == [11, 13]
    assert not seq.filling and seq.last == 13


def test_a_reconnect_reads_up_to_the_rooms_head() -> None:
    seq: Sequencer[str] = Sequencer()
    assert not seq.reconnect()  # not started: the head is read when it starts anyway
    seq.begin(3)
    assert seq.reconnect() and seq.filling
    assert not seq.reconnect()  # one fill at a time
    assert seqs(seq.feed(8, "e8")) == []  # arrived after the reconnect: waits
    assert seq.gap(head=7) == (3, 7)
    step = seq.filled([(n, f"e{n}") for n in range(4, 8)])
    assert seqs(step) == [4, 5, 6, 7, 8] and not seq.filling


def test_a_reconnect_with_nothing_missed_reads_nothing() -> None:
    seq = started(3)
    assert seq.reconnect()
    assert seq.gap(head=3) is None
    assert seq.filled([]) == Step()
    assert not seq.filling
    assert seqs(seq.feed(4, "e4")) == [4]


def test_a_cancelled_fill_starts_again_on_the_next_gap() -> None:
    seq = started()
    assert seq.feed(2, "e2").fill
    seq.cancel_fill()
    step = seq.feed(3, "e3")
    assert step.fill and step.deliver == []
    assert seq.gap() == (0, 2)
    assert seqs(seq.filled([(1, "e1")])) == [1, 2, 3]


def test_history_rows_already_delivered_are_dropped() -> None:
    seq = started()
    seq.feed(1, "e1")
    seq.feed(3, "e3")
    assert seq.gap() == (1, 2)
    step = seq.filled([(1, "e1"), (2, "e2")])
    assert seqs(step) == [2, 3] and step.dropped == 1


@pytest.mark.parametrize("seed", range(40))
def test_shuffled_duplicated_and_missing_seqs_go_out_once_in_order(seed: int) -> None:
    """Pub/sub reorders, repeats and loses events; history lost the oldest ones."""
    rng = random.Random(seed)
    head, last = rng.randint(0, 5), 60
    kept_from = rng.randint(head + 1, head + 20)  # history holds kept_from..last
    arriving = [n for n in range(1, last + 1) if rng.random() > 0.2]
    arriving += rng.sample(arriving, len(arriving) // 4)
    rng.shuffle(arriving)
    # Each event comes at most a few places late, as out of one pub/sub stream.
    arriving.sort(key=lambda n: n + rng.uniform(-3, 3))
    seq: Sequencer[str] = Sequencer()
    early = rng.randint(0, 5)
    delivered: list[int] = []
    lost: list[int] = []

    def take(step: Step[str]) -> None:
        assert all(item == f"e{n}" for n, item in step.deliver)
        delivered.extend(n for n, _ in step.deliver)
        for first, end in step.lost:
            lost.extend(range(first, end + 1))

    def fill() -> None:
        while seq.filling:
            span = seq.gap()
            rows = [] if span is None else range(max(span[0] + 1, kept_from), span[1] + 1)
            take(seq.filled((n, f"e{n}") for n in rows))
            if rng.random() < 0.3 and arriving:  # pub/sub keeps going during the read
                take(seq.feed(arriving[0], f"e{arriving.pop(0)}"))

    for n in arriving[:early]:
        take(seq.feed(n, f"e{n}"))
    arriving = arriving[early:]
    filling = seq.begin(head)
    take(filling)
    if filling.fill:
        fill()
    while arriving:
        n = arriving.pop(0)
        step = seq.feed(n, f"e{n}")
        take(step)
        if step.fill:
            fill()
    assert delivered == sorted(set(delivered)), "in order, once"
    assert not set(delivered) & set(lost)
    top = delivered[-1] if delivered else head
    assert sorted(delivered + lost) == list(range(head + 1, top + 1)), "nothing skipped silently"
    assert all(n < kept_from for n in lost), "only what history no longer held is lost"
