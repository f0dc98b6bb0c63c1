"""When the worker lends its socket to its wire thread (workerpool/lending.py), with plain
values and a fake clock; the moving itself is tested in test_wire.py."""

from __future__ import annotations

from workerpool.lending import KEEP_LENT, RELEND_AFTER, SHORT_LEND, Lending


def test_lent_only_when_the_request_was_held_ahead():
    lending = Lending()
    # Found without a wait, but it came after the last call ended: one at a time.
    assert lending.starting(ahead=False, lent=False, late=False, now=0.0) is None
    assert lending.starting(ahead=True, lent=False, late=False, now=0.0) is True
    assert lending.starting(ahead=True, lent=True, late=False, now=0.0) is None  # stays lent
    assert lending.starting(ahead=False, lent=True, late=False, now=0.0) is None


def _lent_for(lending: Lending, starts: int, now: float = 0.0) -> None:
    assert lending.starting(ahead=True, lent=False, late=False, now=now) is True
    for _ in range(starts - 1):
        assert lending.starting(ahead=True, lent=True, late=False, now=now) is None


def test_one_pause_keeps_it_lent_and_a_second_wait_takes_it_back():
    lending = Lending()
    _lent_for(lending, SHORT_LEND)
    assert lending.waiting(lent=True, now=0.0) == KEEP_LENT  # a pause between bursts
    assert lending.starting(ahead=False, lent=True, late=False, now=0.0) is None
    assert lending.waiting(lent=True, now=0.0) == 0.0  # waited again: one at a time
    assert lending.starting(ahead=False, lent=False, late=False, now=0.0) is None
    assert lending.waiting(lent=False, now=0.0) == 0.0
    assert lending.starting(ahead=True, lent=False, late=False, now=0.0) is True  # again
    assert lending.waiting(lent=True, now=0.0) == KEEP_LENT  # its first pause is kept again


def test_a_lending_that_runs_out_of_work_early_is_not_tried_again_for_a_while():
    lending = Lending()
    _lent_for(lending, SHORT_LEND - 1, now=5.0)  # the thread kept the next one back
    assert lending.waiting(lent=True, now=5.0) == KEEP_LENT
    assert lending.waiting(lent=True, now=5.0) == 0.0
    assert lending.starting(ahead=True, lent=False, late=False, now=5.5) is None
    assert lending.starting(ahead=True, lent=False, late=False, now=5.0 + RELEND_AFTER) is True


def test_a_late_thread_takes_it_back_and_it_is_lent_again_a_while_later():
    lending = Lending()
    assert lending.starting(ahead=True, lent=False, late=False, now=10.0) is True
    assert lending.starting(ahead=True, lent=True, late=True, now=10.5) is False  # GIL held
    assert lending.starting(ahead=True, lent=False, late=False, now=10.6) is None
    assert lending.starting(ahead=True, lent=False, late=False,
                            now=10.5 + RELEND_AFTER - 0.01) is None
    assert lending.starting(ahead=True, lent=False, late=False,
                            now=10.5 + RELEND_AFTER) is True
