"""Holding ahead for a far worker's round trip: a worker on a host whose round trip to the
router is long against its handler time is sent that round trip's worth of requests
beyond what it runs, not just ``prefetch`` (router.service.ahead_for). The rule with plain
values; the router's side with a fake clock (tests/router_harness.py). The multi-host
path with real namespaces and a delayed link is in tests/test_multihost.py."""

from __future__ import annotations

import pytest

from ipc.protocol import Kind
from router.health import BusySamples
from router.requests import Phase
from router.service import MAX_AHEAD, STALL_MIN, ahead_for
from tests.router_harness import Harness
from workerpool.config import TIMINGS

C = b"client-1"
NEAR, FAR = b"sup-near", b"sup-far"


@pytest.mark.parametrize(("prefetch", "rtt", "per_request", "ahead"), [
    (1, None, 0.005, 1),  # no round trip reported yet
    (1, 0.1, None, 1),  # no handler time yet
    (1, 0.0005, 0.001, 1),  # next to the router, 1 ms a request: prefetch covers it
    (1, 0.0005, 0.00002, 25),  # next to the router, 20 µs a request: 25 in one round trip
    (1, 0.1, 0.005, 20),  # 100 ms away, 5 ms a request: 20 run in one round trip
    (1, 0.1, 0.2, 1),  # the handler outlasts the round trip: one ahead is enough
    (3, 0.01, 0.005, 3),  # prefetch already covers it
    (1, 0.5, 0.0001, MAX_AHEAD),  # bounded
    (0, 0.1, 0.005, 0),  # prefetch 0: nothing held ahead, near or far
])
def test_ahead_covers_the_round_trip(prefetch, rtt, per_request, ahead):
    assert ahead_for(prefetch, rtt, per_request) == ahead


def test_busy_samples_give_the_handler_time_per_request():
    s = BusySamples(done=4)  # the slot had answered 4 before this incarnation
    assert s.per_request() is None
    s.add([0.0, 1.0], done=4)
    assert s.per_request() is None  # nothing ran or finished yet: no figure
    s.add([1.0, 2.0], done=104)
    assert s.per_request() == pytest.approx(0.01)  # 1 s of handler over 100 requests
    for k in range(3, 3 + BusySamples.WINDOW + 1):
        s.add([1.0, float(k)], done=104)  # idle for a whole window: the figure stands
    assert s.per_request() == pytest.approx(0.01)
    s.add([1.5, 10.0], done=114)  # busy again: from the window, idle beats included
    assert s.per_request() == pytest.approx(0.05)


def _ping(h: Harness, sup: bytes, ms: float) -> None:
    h.backend(sup, Kind.HEARTBEAT, {"ping": 1, "rtt": ms, "srtt": ms})


def _beat(h: Harness, ident: bytes, busy: float, wall: float) -> None:
    h.backend(ident + b"#hb", Kind.HEARTBEAT, {"of": ident, "busy": [busy, wall]})


def _two_hosts(prefetch: int = 1, far_ms: float = 100.0) -> tuple[Harness, bytes, bytes]:
    """One worker near the router (0.3 ms) and one far from it (``far_ms``), each of which
    has answered 10 requests of 5 ms, and said so in a heartbeat."""
    h = Harness()
    h.hello(workers=1, sup=NEAR, node="near", prefetch=prefetch)
    h.hello(workers=1, sup=FAR, node="far")
    near, far = h.ready("default/near/0"), h.ready("default/far/0")
    _ping(h, NEAR, 0.3)
    _ping(h, FAR, far_ms)
    for rid in range(10_000, 10_020, 2):  # both idle: one each
        h.request(C, rid)
        h.request(C, rid + 1)
        h.reply(near, h.dispatched_to(near)[-1])
        h.reply(far, h.dispatched_to(far)[-1])
    assert not h.core.requests.records
    _beat(h, near, 0.05, 1.0)
    _beat(h, far, 0.05, 1.0)
    h.tick(0.001)  # the router's first liveness check: each worker is sized there
    return h, near, far


def _row(h: Harness, slot: str) -> dict:
    return next(w for w in h.core.status()["workers"] if w["id"] == slot)


def test_a_far_worker_is_sent_a_round_trip_of_requests_ahead():
    h, near, far = _two_hosts()
    assert _row(h, "default/far/0")["prefetch"] == 20  # 100 ms / 5 ms
    assert _row(h, "default/near/0")["prefetch"] == 1  # the service's prefetch
    before = (len(h.dispatched_to(near)), len(h.dispatched_to(far)))
    for rid in range(1, 41):
        h.request(C, rid)
    assert len(h.dispatched_to(far)) - before[1] == 21  # one it runs, 20 ahead
    assert len(h.dispatched_to(near)) - before[0] == 2
    assert h.core.services["default"].queued == 40 - 23


def test_its_room_growing_sends_it_what_waits_in_the_queue():
    h = Harness()
    h.hello(workers=1, sup=FAR, node="far", prefetch=1)
    far = h.ready("default/far/0")
    _ping(h, FAR, 100.0)
    for rid in range(1, 11):
        h.request(C, rid)
    assert len(h.dispatched_to(far)) == 2  # no handler time yet: prefetch 1
    h.reply(far, h.dispatched_to(far)[0])
    _beat(h, far, 0.005, 1.0)  # 5 ms for the one answered
    h.tick(0.001)  # at the router's liveness check, not at the next request
    assert len(h.dispatched_to(far)) == 10
    assert h.core.services["default"].queued == 0


def test_prefetch_0_holds_nothing_ahead_however_far():
    h, _, _ = _two_hosts(prefetch=0)
    assert _row(h, "default/far/0")["prefetch"] == 0
    for rid in range(1, 5):
        h.request(C, rid)
    assert h.core.services["default"].queued == 2


def test_a_far_worker_that_dies_holding_them_loses_none_and_runs_none_twice():
    h, near, far = _two_hosts()
    first_far = len(h.dispatched_to(far))
    for rid in range(1, 31):
        h.request(C, rid)
    held = h.dispatched_to(far)[first_far:]
    assert len(held) == 21
    h.slot_event("default/far/0", "died", reason="was killed by SIGKILL", sup=FAR)
    h.tick(0.01)
    # Only the oldest it held counts as started (protocol 4.6); the 20 behind it never ran.
    assert [e.type for e in h.out.errors_to(C)] == ["WorkerCrashedError"]
    for rid in held[1:]:
        rec = h.core.requests.records[rid]
        assert rec.starts == 0 and rec.phase is not Phase.DONE
    ran = []
    while h.core.requests.records:
        rid = next(r for r in h.dispatched_to(near)[10:] if r not in ran)
        ran.append(rid)
        h.reply(near, rid)
    sent = h.dispatched_to(near)[10:]
    assert len(sent) == len(set(sent)) == 29  # every other request once, on the near worker
    assert set(held[1:]) <= set(sent)
    answers = [s.req_id for s in h.out.to(C) if s.kind in (Kind.RESULT, Kind.ERROR)]
    assert sorted(a for a in answers if a <= 30) == list(range(1, 31))  # one answer each


def test_a_request_held_far_ahead_is_asked_back_for_an_idle_worker():
    h, near, far = _two_hosts()
    for rid in range(1, 24):
        h.request(C, rid)  # near runs 1 and holds 1; far runs 1 and holds 20
    on_near = h.dispatched_to(near)[10:]
    for rid in on_near:
        h.reply(near, rid)  # near is idle, the queue is empty
    asked = [s.req_id for s in h.out.to(far + b"#hb") if s.kind is Kind.RECLAIM]
    # One per free run slot of the idle worker, the newest first: it would start last.
    assert asked == [h.dispatched_to(far)[-1]]


def _reclaims(h: Harness, ident: bytes) -> list[int]:
    return [s.req_id for s in h.out.to(ident + b"#hb") if s.kind is Kind.RECLAIM]


def test_a_stalled_far_worker_gives_back_what_it_holds_ahead_and_is_sized_again_after():
    """A request that runs far longer than the worker's usual (a 2 s one among 5 ms ones)
    would hold the 20 behind it: once no reply came for 10 requests' time (at least
    STALL_MIN), the worker falls back to prefetch and the rest is asked back, to run
    elsewhere. When it answers again it is sized for its round trip again."""
    h, near, far = _two_hosts()
    first_far, first_near = len(h.dispatched_to(far)), len(h.dispatched_to(near))
    for rid in range(1, 31):
        h.request(C, rid)
    held = h.dispatched_to(far)[first_far:]
    assert len(held) == 21
    h.tick(STALL_MIN / 2)
    assert _reclaims(h, far) == []  # not stalled yet
    h.tick(TIMINGS.liveness_tick)
    assert _row(h, "default/far/0")["prefetch"] == 1
    asked = _reclaims(h, far)
    assert asked == held[:1:-1]  # the newest 19: it keeps one running, one ahead
    for rid in asked:
        h.backend(far + b"#hb", Kind.RECLAIM, {"returned": True}, req_id=rid)
    # Back in the queue at their places, ahead of the 7 that never left it; the near worker
    # runs them as it frees up, each once.
    for _ in range(19):
        rid = next(r for r in h.dispatched_to(near)[first_near:]
                   if r in h.core.requests.records)
        h.reply(near, rid)
    assert set(asked) <= set(h.dispatched_to(near))
    assert not set(asked) & set(h.dispatched_to(far)[first_far + 21:])
    h.reply(far, held[0])  # the long one ends
    h.clock.advance(TIMINGS.liveness_tick)
    h.reply(far, held[1])  # and it answers as often as before
    h.tick()
    assert _row(h, "default/far/0")["prefetch"] == 20  # sized for its round trip again
    assert len(h.dispatched_to(far)) > first_far + 21  # and sent what waits
