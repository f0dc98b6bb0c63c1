"""Prefetch: a worker is sent one request beyond what it runs, so the next one is already
there when it finishes; one held ahead is asked back (RECLAIM) when another worker could
run it now. The router's side with a fake clock (tests/router_harness.py); the worker's
answer with a real Worker object; the whole path with a live pool."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from ipc import protocol
from ipc.protocol import Kind
from router.requests import Phase
from tests.router_harness import Harness
from workerpool import Client

C = b"client-1"


def _pool(policy: str = "least-loaded", workers: int = 2) -> tuple[Harness, list[bytes]]:
    h = Harness()
    h.hello(workers=workers, prefetch=1, policy=policy)
    return h, [h.ready(f"default/{i}") for i in range(workers)]


def _reclaims(h: Harness, ident: bytes) -> list[int]:
    return [s.req_id for s in h.out.to(ident + b"#hb") if s.kind is Kind.RECLAIM]


def _answer(h: Harness, ident: bytes, rid: int, returned: bool) -> None:
    h.backend(ident + b"#hb", Kind.RECLAIM, {"returned": returned}, req_id=rid)


def _b_idle_while_a_holds_one_ahead() -> tuple[Harness, bytes, bytes, list[int]]:
    """Four requests on two workers (two each), then b finishes both: b is idle while a
    runs its first and holds its second ahead. Returns (h, a, b, a's requests)."""
    h, (a, b) = _pool()
    for rid in range(1, 5):
        h.request(C, rid)
    on_a, on_b = h.dispatched_to(a), h.dispatched_to(b)
    h.reply(b, on_b[0], "fast")
    h.reply(b, on_b[1], "fast")
    return h, a, b, on_a


@pytest.mark.parametrize("policy", ["least-loaded", "round-robin", "power-of-two"])
def test_each_worker_holds_one_ahead_and_idle_workers_come_first(policy):
    h, (a, b) = _pool(policy)
    for rid in range(1, 6):
        h.request(C, rid)
    # Both start one before either is sent one to hold ahead; the fifth waits in the queue.
    first = h.dispatched_to(a)[:1] + h.dispatched_to(b)[:1]
    assert sorted(first) == sorted(h.core.requests.records)[:2]
    assert len(h.dispatched_to(a)) == len(h.dispatched_to(b)) == 2
    assert h.core.services["default"].queued == 1
    row = h.core.status()["workers"][0]
    assert (row["capacity"], row["prefetch"], row["in_flight"]) == (1, 1, 2)


def test_a_request_held_ahead_behind_a_slow_one_is_taken_back_for_an_idle_worker():
    h, a, b, on_a = _b_idle_while_a_holds_one_ahead()
    assert _reclaims(h, a) == [on_a[1]]
    _reclaims_before = len(h.out.sent)
    h.tick(0.5)  # a second ask for the same request would be a second hand-back
    assert _reclaims(h, a) == [on_a[1]] and len(h.out.sent) == _reclaims_before
    _answer(h, a, on_a[1], returned=True)
    assert h.dispatched_to(b)[-1] == on_a[1]  # runs on b now
    rec = h.core.requests.records[on_a[1]]
    assert rec.conn.identity == b and rec.starts == 0
    h.reply(b, on_a[1], "moved")
    h.reply(a, on_a[0], "slow")
    results = [s.body for s in h.out.to(C) if s.kind is Kind.RESULT]
    assert sorted(results) == ["fast", "fast", "moved", "slow"]  # one reply each
    assert h.core.stats["reclaimed"] == 1


def test_a_hand_back_that_lost_the_race_leaves_the_request_where_it_runs():
    h, a, b, on_a = _b_idle_while_a_holds_one_ahead()
    h.reply(a, on_a[0])  # a finished its first and started the one held ahead...
    _answer(h, a, on_a[1], returned=False)  # ...so it could not give it back
    assert on_a[1] not in h.dispatched_to(b)
    h.reply(a, on_a[1], "ran on a")
    assert [s.body for s in h.out.to(C)].count("ran on a") == 1
    assert not h.core.requests.records and h.core.stats["reclaimed"] == 0


def test_an_answer_for_a_request_already_answered_changes_nothing():
    h, a, _, on_a = _b_idle_while_a_holds_one_ahead()
    h.reply(a, on_a[0])
    h.reply(a, on_a[1])  # its reply overtook the answer to RECLAIM
    _answer(h, a, on_a[1], returned=True)  # cannot be: a worker gives back only unstarted
    assert len([s for s in h.out.to(C) if s.kind is Kind.RESULT]) == 4
    assert not h.core.registry.conns[a].reclaiming


def test_a_request_cancelled_while_being_taken_back_is_dropped_once():
    h, a, b, on_a = _b_idle_while_a_holds_one_ahead()
    client_rid = h.core.requests.records[on_a[1]].client_rid
    h.client_msg(C, Kind.CANCEL, client_rid)
    rec = h.core.requests.records[on_a[1]]
    assert rec.phase is Phase.ORPHANED
    _answer(h, a, on_a[1], returned=True)
    assert on_a[1] not in h.core.requests.records and on_a[1] not in h.dispatched_to(b)
    assert on_a[1] not in h.core.registry.conns[a].in_flight


def test_a_request_held_ahead_by_a_worker_that_dies_runs_elsewhere_once_and_uncounted():
    h, (a, b) = _pool()
    for rid in range(1, 5):
        h.request(C, rid)
    on_a = h.dispatched_to(a)
    h.slot_event("default/0", "died", reason="was killed by SIGKILL")
    h.tick(0.01)
    held_ahead = h.core.requests.records[on_a[1]]
    assert held_ahead.starts == 0 and held_ahead.phase is not Phase.DONE  # not a crash of it
    errors = h.out.errors_to(C)
    assert [e.type for e in errors] == ["WorkerCrashedError"]  # only the one it was running
    on_b = h.dispatched_to(b)
    for rid in on_b:
        h.reply(b, rid)
    for rid in h.dispatched_to(b)[len(on_b):]:
        h.reply(b, rid)
    assert on_a[1] in h.dispatched_to(b)
    assert not h.core.requests.records


def test_no_hand_back_while_requests_wait_in_the_queue_or_with_prefetch_0():
    h, (a, b) = _pool()
    for rid in range(1, 8):
        h.request(C, rid)
    h.reply(b, h.dispatched_to(b)[0])  # the queue refills b: nothing to take back
    assert not _reclaims(h, a)
    h2 = Harness()
    h2.hello(workers=2, prefetch=0)
    a2, b2 = h2.ready("default/0"), h2.ready("default/1")
    for rid in range(1, 4):
        h2.request(C, rid)
    assert len(h2.dispatched_to(a2)) == len(h2.dispatched_to(b2)) == 1  # none held ahead
    # STATUS says it, per service (protocol.md 6.2) and per worker (6.3).
    assert [s["prefetch"] for s in h.core.status()["services"]] == [1]
    assert [s["prefetch"] for s in h2.core.status()["services"]] == [0]
    assert [w["prefetch"] for w in h2.core.status()["workers"]] == [0, 0]


# -- the worker's side --------------------------------------------------------------------------
def _msg(rid: int) -> protocol.Message:
    return protocol.decode(protocol.encode(Kind.REQUEST, rid, {"method": "echo"}, b"\xc0"))


def test_the_backlog_gives_back_only_what_has_not_started():
    from workerpool.backlog import Backlog

    b = Backlog()
    assert b.put(_msg(1)) and b.put(_msg(2))
    assert b.pop_oldest().req_id == 1  # started
    assert b.give_back(1, seq=1) is False  # started: it stays, its reply follows
    assert b.give_back(2, seq=2) is True and 2 not in b  # read, waiting: given back
    assert b.give_back(3, seq=3) is True  # not read yet: given back before it arrives...
    assert b.put(_msg(3)) is False and len(b) == 0  # ...and dropped when read
    assert b.put(_msg(4)) and b.give_back(4, seq=4) and b.pop_oldest() is None


def test_start_and_give_back_race_and_exactly_one_wins():
    """The main thread starts requests while the heartbeat thread asks for each back: every
    request is either started or given back, never both and never neither."""
    from workerpool.backlog import Backlog

    b = Backlog()
    n = 20000
    started: list[int] = []
    given: list[int] = []

    def main() -> None:
        for rid in range(1, n + 1):
            b.put(_msg(rid))
            if rid % 3 == 0:
                while (m := b.pop_oldest()) is not None:
                    started.append(m.req_id)
        while (m := b.pop_oldest()) is not None:
            started.append(m.req_id)

    t = threading.Thread(target=main)
    t.start()
    for rid in range(1, n + 1, 2):
        if b.give_back(rid, seq=rid):
            given.append(rid)
    t.join(60)
    assert not set(started) & set(given)
    assert set(started) | set(given) == set(range(1, n + 1))


# -- live ---------------------------------------------------------------------------------------
def test_a_slow_request_does_not_hold_up_the_one_behind_it(procs):
    """Two workers; the first request sleeps 3 s. Quick requests behind it all finish
    before it: the one sent ahead to the sleeping worker was handed back to the other."""
    pool = procs.pool(workers=2, handler="workerpool.handlers:Echo")
    with Client(pool.address, timeout=30) as c:
        slow = c.submit("sleep", {"seconds": 3.0})
        quick = [c.submit("echo", i) for i in range(20)]
        assert [f.result() for f in quick] == list(range(20))
        assert not slow.done()  # none of them waited behind the sleep
        assert slow.result() == {"seconds": 3.0}
    counters = pool.status()["router"]["counters"]
    assert counters["reclaimed"] >= 1 and counters["reclaims_asked"] >= counters["reclaimed"]


def test_cancel_of_a_request_held_ahead(procs):
    """A request held ahead on a busy worker, cancelled: it never runs; the worker and the
    client go on."""
    pool = procs.pool(workers=1, handler="workerpool.handlers:Echo")
    with Client(pool.address, timeout=30) as c:
        running = c.submit("sleep", {"seconds": 1.0})
        pool.wait_for(lambda st: st["workers"][0]["in_flight"] == 1, what="sleep running")
        ahead = c.submit("echo", "x")
        pool.wait_for(lambda st: st["workers"][0]["in_flight"] == 2, what="one held ahead")
        assert ahead.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            ahead.result(timeout=5)
        assert running.result() == {"seconds": 1.0}
        assert c.call("echo", "after") == "after"
    st = pool.status()
    assert st["workers"][0]["completed"] == 2  # the sleep and "after": x never ran
    assert st["services"][0]["cancelled"] == 1
