"""Scheduling and admission control: priorities, FIFO, bounded queues, max_wait,
deadlines, cancellation, max_inflight seen from the worker, and overload rejections."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from router.health import Conn, Slot
from router.policy import PowerOfTwo
from tests.raw import RawPeer
from workerpool import (
    AsyncClient,
    BackpressureError,
    Client,
    RequestTimeoutError,
)
from workerpool.config import ServiceConfig

REC = "tests.handlers:Recorder"


def _busy(pool, client, seconds=0.5):
    """Occupy the single worker so that what follows queues in the router."""
    fut = client.submit("record", {"sleep": seconds})
    pool.wait_for(lambda st: st["services"][0]["in_flight"] == 1, what="worker busy")
    return fut


def _queued(pool, n):
    pool.wait_for(lambda st: st["services"][0]["queued"] == n, what=f"{n} queued")


def test_priority_order_under_contention_and_fifo_within(procs):
    # --prefetch 0: the order is the queue's (one sent ahead has left the queue already).
    pool = procs.pool("--prefetch", "0", handler=REC, workers=1)
    with Client(pool.address, timeout=30) as c:
        first = _busy(pool, c)
        futs = []
        for i in range(12):
            prio = (0, 5, 10)[i % 3]
            futs.append((prio, i, c.submit("record", {"i": i}, priority=prio)))
        _queued(pool, 12)
        first.result()
        order = sorted(futs, key=lambda t: t[2].result()["n"])
    ran = [(prio, i) for prio, i, _ in order]
    # Higher priority first; within one priority, in submission order.
    assert ran == sorted(ran, key=lambda t: (-t[0], t[1])), ran


def test_queue_full_rejects_with_retry_after(procs):
    pool = procs.pool("--queue-capacity", "3", "--prefetch", "0", handler=REC, workers=1)
    with Client(pool.address, timeout=30) as c:
        first = _busy(pool, c, 0.3)
        queued = [c.submit("record", {"i": i}) for i in range(3)]
        _queued(pool, 3)
        with pytest.raises(BackpressureError) as info:
            c.call("record", {"i": "extra"})
        err = info.value
        assert isinstance(err.retry_after, float) and 0 < err.retry_after <= 60
        assert "queue_capacity 3" in err.message
        first.result()
        assert [f.result()["payload"]["i"] for f in queued] == [0, 1, 2]
    assert pool.status()["services"][0]["rejected_backpressure"] == 1


def test_retry_after_grows_with_the_queue_and_service_time(procs):
    pool = procs.pool("--queue-capacity", "1", "--prefetch", "0", handler=REC, workers=1)
    with Client(pool.address, timeout=30) as c:
        for _ in range(3):  # teach the router the service time (~0.2 s)
            c.call("record", {"sleep": 0.2})
        first = _busy(pool, c, 0.5)
        q = c.submit("record", {"sleep": 0.2})
        _queued(pool, 1)
        with pytest.raises(BackpressureError) as info:
            c.call("record", {})
        # Two requests' worth of ~0.2 s ahead of it on one worker: not a constant.
        assert 0.2 <= info.value.retry_after <= 2.0, info.value.retry_after
        first.result()
        q.result()


def test_higher_priority_displaces_the_newest_low_priority_when_full(procs):
    pool = procs.pool("--queue-capacity", "2", "--prefetch", "0", handler=REC, workers=1)
    with Client(pool.address, timeout=30) as c:
        first = _busy(pool, c)
        low_old = c.submit("record", {"i": "old"}, priority=0)
        low_new = c.submit("record", {"i": "new"}, priority=0)
        _queued(pool, 2)
        high = c.submit("record", {"i": "high"}, priority=9)
        with pytest.raises(BackpressureError, match="displaced"):
            low_new.result(10)
        first.result()
        assert high.result()["n"] < low_old.result()["n"]
        # Equal priority displaces nothing: the newcomer is the one refused.
        busy = _busy(pool, c)
        kept = [c.submit("record", {}, priority=3) for _ in range(2)]
        _queued(pool, 2)
        with pytest.raises(BackpressureError, match="queue_capacity 2"):
            c.call("record", {}, priority=3)
        busy.result()
        assert all(f.result() for f in kept)


def test_reject_policy_never_queues(procs):
    pool = procs.pool("--capacity-policy", "reject", "--max-inflight", "1", "--prefetch", "0",
                      handler=REC, workers=2)
    with Client(pool.address, timeout=30) as c:
        a = c.submit("record", {"sleep": 0.4})
        b = c.submit("record", {"sleep": 0.4})
        pool.wait_for(lambda st: st["services"][0]["in_flight"] == 2, what="both busy")
        t0 = time.monotonic()
        with pytest.raises(BackpressureError, match="capacity_policy 'reject'") as info:
            c.call("record", {})
        assert time.monotonic() - t0 < 1.0
        assert info.value.retry_after > 0
        a.result(), b.result()
        assert c.call("record", {})["payload"] == {}
    st = pool.status()["services"][0]
    assert st["queued"] == 0 and st["rejected_backpressure"] == 1


def test_max_wait_sheds_requests_that_waited_too_long(procs):
    pool = procs.pool("--max-wait", "0.3", "--prefetch", "0", handler=REC, workers=1)
    with Client(pool.address, timeout=30) as c:
        first = _busy(pool, c, 1.5)
        t0 = time.monotonic()
        with pytest.raises(BackpressureError, match=r"waited max_wait=0\.3s") as info:
            c.call("record", {"i": 1})
        waited = time.monotonic() - t0
        assert 0.25 < waited < 1.4, waited  # answered at max_wait, not when the worker freed
        assert info.value.retry_after > 0
        first.result()
    st = pool.status()["services"][0]
    assert st["rejected_backpressure"] == 1 and st["completed"] == 1


def test_deadline_on_worker_discards_and_counts_the_late_result(procs):
    pool = procs.pool(handler=REC, workers=1)
    with Client(pool.address, timeout=30) as c:
        with pytest.raises(RequestTimeoutError, match="on worker default/0"):
            c.call("record", {"sleep": 0.6}, timeout=0.2)
        st = pool.wait_for(lambda s: s["services"][0]["late_results"] == 1, what="late result")
        assert st["services"][0]["expired"] == 1
        assert c.call("record", {})["n"] == 2  # the worker finished the late one first


def test_cancel_dispatched_request_is_skipped_by_the_worker(procs):
    pool = procs.pool("--max-inflight", "2", handler=REC, workers=1)
    with Client(pool.address, timeout=30) as c:
        running = c.submit("record", {"sleep": 0.6})
        waiting = c.submit("record", {"i": "never"})  # dispatched: waits in the worker
        pool.wait_for(lambda st: st["services"][0]["in_flight"] == 2, what="2 dispatched")
        assert waiting.cancel()
        running.result()
        stats = c.call("whoami")["stats"]
        assert stats["cancelled"] == 1  # the worker was told and never ran it
        assert c.call("record", {})["n"] == 2  # only the first record ran before this one
    assert pool.status()["services"][0]["cancelled"] == 1


def test_async_task_cancellation_cancels_the_request(procs):
    pool = procs.pool(handler=REC, workers=1)

    async def main():
        async with AsyncClient(pool.address, timeout=30) as ac:
            busy = asyncio.ensure_future(ac.call("record", {"sleep": 0.5}))
            await asyncio.sleep(0.1)
            task = asyncio.ensure_future(ac.call("record", {"i": "cancel me"}))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await busy
            assert (await ac.call("record", {}))["n"] == 2  # the cancelled one never ran
            st = await ac.status()
            assert st["services"][0]["cancelled"] == 1

    asyncio.run(main())


def test_leaving_a_stream_stops_the_worker_generating(procs):
    pool = procs.pool(workers=1)
    with Client(pool.address, timeout=30) as c:
        for item in c.stream("count", {"n": 10_000_000}):
            if item == 10:
                break
        t0 = time.monotonic()
        assert c.call("echo", "next") == "next"  # not stuck behind ten million items
        assert time.monotonic() - t0 < 5
        assert c.call("whoami")["stats"]["cancelled"] == 1


@pytest.mark.parametrize("policy,prefetch", [("round-robin", 1), ("least-loaded", 1),
                                             ("power-of-two", 1), ("least-loaded", 0)])
def test_max_inflight_never_exceeded_from_the_worker_side(procs, policy, prefetch):
    """A worker holds at most max_inflight plus the requests sent to it ahead (prefetch)."""
    pool = procs.pool("--max-inflight", "3", "--prefetch", str(prefetch), "--policy", policy,
                      workers=2)
    with Client(pool.address, timeout=60) as c:
        futs = [c.submit("sleep", {"seconds": 0.01}) for _ in range(300)]
        [f.result() for f in futs]
        seen = {}
        for _ in range(20):  # concurrent, so that every policy reaches both workers
            for w in [f.result() for f in [c.submit("whoami") for _ in range(6)]]:
                seen[w["slot"]] = w["stats"]
            if len(seen) == 2:
                break
    assert len(seen) == 2
    for stats in seen.values():
        assert stats["max_outstanding"] <= 3 + prefetch, seen
    # The burst did stack requests on a worker. (Exactly 3 needs the next request to
    # arrive before the worker reads its socket right after a reply: a race, not a rule.)
    assert max(s["max_outstanding"] for s in seen.values()) >= 2


def test_flood_of_low_priority_cannot_starve_high_priority(procs):
    pool = procs.pool("--queue-capacity", "50", handler=REC, workers=1)
    with Client(pool.address, timeout=60) as flood, Client(pool.address, timeout=60) as vip:
        flood_futs = [flood.submit("record", {"sleep": 0.005}) for _ in range(300)]
        time.sleep(0.2)
        vip_futs = [vip.submit("record", {"vip": i}, priority=100) for i in range(5)]
        vip_n = [f.result()["n"] for f in vip_futs]
        done = [f for f in flood_futs if f.done() and not f.exception()]
        # VIP work ran long before the flood drained, and was never refused.
        assert max(vip_n) < 120, vip_n
        rejected = sum(1 for f in flood_futs if isinstance(f.exception(60), BackpressureError))
        assert rejected > 0 and len(done) < 300


def test_power_of_two_choice_on_a_constructed_load():
    conns = []
    for i, load in enumerate([5, 0, 3, 8]):
        c = Conn(f"s/{i}#1".encode(), Slot(f"s/{i}", "s"), 1, i, 8, frozenset())
        c.in_flight = {n: None for n in range(load)}
        conns.append(c)
    seed = 7
    policy = PowerOfTwo(random.Random(seed))
    rng = random.Random(seed)
    room = conns[:3]  # s/3 is full (8 of 8) and must never be sampled
    for _ in range(200):
        a, b = rng.sample(room, 2)
        expected = min((a, b), key=lambda c: (len(c.in_flight), c.slot.sort_key))
        assert policy.pick(conns) is expected
    assert PowerOfTwo().pick(conns[3:]) is None
    assert PowerOfTwo().pick([conns[0], conns[3]]) is conns[0]


@pytest.mark.parametrize("priority", [-1, 1001, "high", True, 2.5])
def test_bad_priority_is_refused_by_client_and_router(pool, priority):
    with Client(pool.address, timeout=5) as c, pytest.raises(ValueError, match="priority"):
        c.submit("echo", 1, priority=priority)
    peer = RawPeer(pool.address)
    try:
        peer.request(1, "echo", 1, priority=priority)
        _, _, body = peer.reply()
        assert body["type"] == "ProtocolError" and body["code"] == "bad-meta"
        assert "priority" in body["message"]
    finally:
        peer.close()


@pytest.mark.parametrize("timeout", [0, -1, 1e9, "soon"])
def test_bad_timeouts_are_refused(pool, timeout):
    with Client(pool.address) as c, pytest.raises((ValueError, TypeError)):
        c.submit("echo", 1, timeout=timeout)


@pytest.mark.parametrize("kwargs", [{"capacity_policy": "drop"}, {"max_wait": 0},
                                    {"max_wait": -1}, {"queue_capacity": -1},
                                    {"max_inflight": 0}, {"policy": "random"}])
def test_bad_scheduling_config_is_refused(kwargs):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ServiceConfig(**kwargs)


def test_status_reports_load_per_service(procs):
    pool = procs.pool(handler=REC, workers=2)
    with Client(pool.address, timeout=30) as c:
        [f.result() for f in [c.submit("record", {"sleep": 0.01}) for _ in range(40)]]
        st = c.status()
    svc = st["services"][0]
    for key in ("queued", "in_flight", "completed", "errored", "rejected_backpressure",
                "expired", "cancelled", "service_time_p50_ms", "service_time_p99_ms"):
        assert key in svc
    assert svc["completed"] == 40
    assert 5 <= svc["service_time_p50_ms"] <= svc["service_time_p99_ms"]
