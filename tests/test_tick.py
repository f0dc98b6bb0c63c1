"""The router's ``tick`` between its periodic passes (docs/architecture.md, "the loop"): a
full pass every ``liveness_tick``, and on the turns between only what may be due sooner.
What is due is acted on at the turn it is due, not at the next pass. Fake clock."""

from __future__ import annotations

from ipc.lifecycle import AdminOp
from ipc.protocol import Kind
from tests.router_harness import Harness
from workerpool.config import TIMINGS

C = b"client-1"


def test_a_deadline_shorter_than_the_period_is_answered_when_it_passes():
    h = Harness()
    h.hello(workers=1)
    w = h.ready("default/0")
    h.request(C, 1)  # runs: the worker is full
    h.tick()  # a periodic pass; the next is liveness_tick away
    h.request(C, 2, timeout=TIMINGS.liveness_tick / 4)  # waits in the queue
    h.tick(TIMINGS.liveness_tick / 8)
    assert h.out.errors_to(C) == []
    h.tick(TIMINGS.liveness_tick / 4)  # past its deadline, before the next pass
    assert [e.type for e in h.out.errors_to(C)] == ["RequestTimeoutError"]
    assert len(h.dispatched_to(w)) == 1  # the expired one never left the queue


def test_a_drained_worker_is_told_to_stop_at_the_turn_its_last_reply_comes():
    h = Harness()
    h.hello(workers=1)
    w = h.ready("default/0")
    h.request(C, 1)
    (rid,) = h.dispatched_to(w)
    h.tick()  # a periodic pass
    h.client_msg(b"admin", Kind.ADMIN, 7, {"op": AdminOp.DRAIN, "worker": "default/0"})
    h.tick()
    assert Kind.SHUTDOWN not in [s.kind for s in h.out.to(w)]  # it still runs one
    h.reply(w, rid, 1)
    h.tick()  # the same moment: no periodic pass is due
    assert Kind.SHUTDOWN in [s.kind for s in h.out.to(w)]


def test_a_quiet_pool_is_still_checked_every_period():
    """A worker that stops beating is found by the periodic pass, whatever the turns
    between look at."""
    h = Harness()
    h.hello(workers=1)
    h.ready("default/0")
    h.tick()
    limit = h.core.liveness.limit
    steps = int(limit / (TIMINGS.liveness_tick / 3)) + 6
    for _ in range(steps):  # turns a third of a period apart, no heartbeat
        h.tick(TIMINGS.liveness_tick / 3)
    assert h.core.registry.slots["default/0"].conn is None  # given up as hung
