"""End to end: real router and worker processes, both dispatch policies, both clients."""

from __future__ import annotations

import asyncio
import collections
import threading

import pytest

from workerpool import AsyncClient, Client, HandlerError, UnknownMethodError


@pytest.mark.parametrize("policy", ["round-robin", "least-loaded"])
@pytest.mark.parametrize("max_inflight", ["1", "1000"])
def test_2000_requests_across_4_workers(procs, policy, max_inflight):
    pool = procs.pool("--policy", policy, "--max-inflight", max_inflight)
    with Client(pool.address, timeout=60) as c:
        futs = [c.submit("echo", {"i": i}) for i in range(2000)]
        assert [f.result() for f in futs] == [{"i": i} for i in range(2000)]
    st = pool.status()
    done = {w["id"]: w["completed"] for w in st["workers"]}
    assert sum(done.values()) == 2000
    assert all(n > 0 for n in done.values()) and len(done) == 4, done
    if policy == "round-robin" and max_inflight == "1000":
        # No worker is ever full, so rotation is never skipped: exactly even.
        assert set(done.values()) == {500}, done
    assert st["services"][0]["completed"] == 2000
    assert st["router"]["requests"] == 0  # no record outlives its reply


def test_round_robin_is_exactly_even_for_sequential_calls(procs):
    pool = procs.pool("--policy", "round-robin")
    with Client(pool.address, timeout=10) as c:
        slots = [c.call("whoami")["slot"] for _ in range(200)]
    assert collections.Counter(slots) == {f"default/{i}": 50 for i in range(4)}


def _occupy_three(pool, c: Client, seconds: float) -> list:
    """Three slow requests, once they are all running; their futures."""
    slow = [c.submit("sleep", {"seconds": seconds}) for _ in range(3)]
    pool.wait_for(lambda st: sum(w["in_flight"] for w in st["workers"]) == 3,
                  what="3 in flight")
    return slow


def test_least_loaded_follows_in_flight_counts(procs):
    pool = procs.pool("--policy", "least-loaded", "--max-inflight", "8")
    with Client(pool.address, timeout=30) as c:
        # Three workers get one slow request each (ties go to the lowest id: 0, 1, 2)...
        slow = _occupy_three(pool, c, 1.5)
        busy = {w["id"] for w in pool.status()["workers"] if w["in_flight"]}
        assert busy == {"default/0", "default/1", "default/2"}
        # ...so while they run, every quick request goes to the one idle worker.
        slots = {c.call("whoami")["slot"] for _ in range(20)}
        assert slots == {"default/3"}
        assert all(f.result() == {"seconds": 1.5} for f in slow)


def test_round_robin_ignores_in_flight_counts(procs):
    pool = procs.pool("--policy", "round-robin", "--max-inflight", "8")
    with Client(pool.address, timeout=30) as c:
        slow = _occupy_three(pool, c, 0.5)
        quick = [c.submit("whoami") for _ in range(8)]
        slots = collections.Counter(f.result()["slot"] for f in quick)
        assert len(slots) == 4  # the busy workers get their turn too
        [f.result() for f in slow]


def test_streaming_sync_and_async(pool):
    with Client(pool.address, timeout=10) as c:
        assert list(c.stream("count", {"n": 5})) == [0, 1, 2, 3, 4]
        assert c.call("count", {"n": 3}) == [0, 1, 2]  # call() collects a stream
        assert list(c.stream("echo", {"a": 1})) == [{"a": 1}]  # a plain method: one item
        assert list(c.stream("count", {"n": 0})) == []

    async def main():
        async with AsyncClient(pool.address, timeout=10) as ac:
            items = [i async for i in ac.stream("count", {"n": 4})]
            assert items == [0, 1, 2, 3]
            assert await ac.call("echo", {"x": 1}) == {"x": 1}
            futs = [await ac.submit("echo", i) for i in range(200)]
            assert await asyncio.gather(*futs) == list(range(200))
            results = await asyncio.gather(*(ac.call("echo", i) for i in range(100)))
            assert results == list(range(100))
            with pytest.raises(HandlerError, match="requested failure"):
                await ac.call("raise_error", {})
            st = await ac.status()
            assert len(st["workers"]) == 4

    asyncio.run(main())


def test_stream_that_fails_midway(procs):
    pool = procs.pool(handler="tests.handlers:Streams", workers=1)
    with Client(pool.address, timeout=10) as c:
        got = []
        with pytest.raises(HandlerError, match="stream broke") as info:
            for item in c.stream("count_then_fail", {"n": 3}):
                got.append(item)
        assert got == [0, 1, 2]
        assert info.value.remote_type == "RuntimeError"
        assert c.call("echo", 1) == 1


def test_leaving_a_stream_early_cancels_it(pool):
    with Client(pool.address, timeout=10) as c:
        for item in c.stream("count", {"n": 100000}):
            if item == 3:
                break
        assert c.call("echo", "after") == "after"


def test_domain_error_keeps_the_worker(pool):
    with Client(pool.address, timeout=10) as c:
        with pytest.raises(HandlerError) as info:
            c.call("raise_error", {"message": "bad input"})
        err = info.value
        assert err.remote_type == "ValueError"
        assert "bad input" in err.message
        assert err.worker.startswith("default/")
        assert "Traceback" in str(err.__cause__)
        with pytest.raises(UnknownMethodError, match="no method 'nope'"):
            c.call("nope")
        assert c.call("echo", 5) == 5
    st = pool.status()
    assert sum(w["errored"] for w in st["workers"]) == 1
    assert sum(w["restarts"] for w in st["workers"]) == 0
    assert {w["pid"] for w in st["workers"]} == {w["pid"] for w in pool.status()["workers"]}


def test_client_is_thread_safe(pool):
    errors = []
    with Client(pool.address, timeout=30) as c:
        def work(t):
            try:
                for i in range(100):
                    assert c.call("echo", [t, i]) == [t, i]
            except Exception as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []


def test_unencodable_result_is_a_typed_error(procs):
    pool = procs.pool(handler="tests.handlers:Streams", workers=1)
    from workerpool import PayloadError
    with Client(pool.address, timeout=10) as c:
        with pytest.raises(PayloadError, match="cannot be sent"):
            c.call("unencodable")
        assert c.call("echo", 2) == 2
