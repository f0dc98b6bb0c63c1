"""Dispatch policies on constructed loads, and the worker state machine."""

from __future__ import annotations

import pytest

from ipc.errors import IllegalTransition
from ipc.lifecycle import WorkerState
from router.health import Conn, Slot
from router.policy import LeastLoaded, RoundRobin, make_policy


def conns(loads, capacity=4):
    out = []
    for i, load in enumerate(loads):
        c = Conn(f"s/{i}#1".encode(), Slot(f"s/{i}", "s"), 1, 100 + i, capacity, frozenset())
        c.in_flight = {n: None for n in range(load)}
        out.append(c)
    return out


def test_least_loaded_picks_fewest_in_flight():
    cs = conns([3, 1, 2, 1])
    assert LeastLoaded().pick(cs) is cs[1]  # tie between 1 and 3 goes to the lower id


def test_least_loaded_skips_full_and_returns_none_when_all_full():
    cs = conns([4, 4, 2], capacity=4)
    assert LeastLoaded().pick(cs) is cs[2]
    assert LeastLoaded().pick(conns([4, 4], capacity=4)) is None


def test_round_robin_cycles_and_skips_full():
    cs = conns([0, 0, 0])
    rr = RoundRobin()
    assert [rr.pick(cs) for _ in range(6)] == [cs[0], cs[1], cs[2], cs[0], cs[1], cs[2]]
    cs[1].in_flight = {n: None for n in range(4)}
    assert [rr.pick(cs) for _ in range(4)] == [cs[0], cs[2], cs[0], cs[2]]
    assert RoundRobin().pick(conns([4, 4])) is None


def test_make_policy_rejects_unknown():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("random")


def test_slot_sort_key_is_numeric():
    assert sorted(["a/10", "a/9", "a/1"], key=lambda s: Slot(s, "a").sort_key) == [
        "a/1", "a/9", "a/10"]


def test_legal_lifecycle():
    s = Slot("default/0", "default")
    for state in ("ready", "busy", "ready", "dead", "restarting", "ready", "stopped"):
        s.transition(WorkerState(state))
    assert s.state is WorkerState.STOPPED


def test_illegal_transition_raises():
    s = Slot("default/0", "default")
    s.transition(WorkerState.FAILED)
    with pytest.raises(IllegalTransition):
        s.transition(WorkerState.BUSY)
