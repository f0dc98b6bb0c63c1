"""Client internals that need no router."""

from __future__ import annotations

from workerpool import client as wc


def test_local_deadline_timers_stay_bounded_by_the_pending_requests():
    timers: list = []
    pending: dict = {}
    for rid in range(1, 50_001):
        entry = wc._Pending(None, None, 1e9 + rid)
        pending[rid] = entry
        wc._arm(timers, pending, entry.deadline, rid)
        if rid > 10:  # answered: gone from pending, its timer left behind
            del pending[rid - 10]
    assert len(timers) <= 2 * len(pending) + wc._TIMER_SLACK + 1
    armed = {rid for _, rid in timers if rid in pending}
    assert armed == set(pending)  # every pending request keeps its deadline
