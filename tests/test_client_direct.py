"""``Client.call`` with nothing else outstanding sends and reads its reply on the caller's
thread (workerpool/client/sync.py, ``DIRECT_WAIT``), and hands anything longer, or
anything that meets other work, to the I/O thread. Every way in and out of that path."""

from __future__ import annotations

import threading

import pytest

from workerpool import Client, RequestTimeoutError
from workerpool.client import sync


def test_sequential_calls_are_answered_on_the_callers_thread(pool):
    with Client(pool.address, timeout=10) as c:
        for i in range(50):
            assert c.call("echo", i) == i
        assert c.call("count", {"n": 3}) == [0, 1, 2]  # a stream, collected
        assert c._direct_calls == 51
        assert not c._replies and c.unmatched_replies == 0


def test_a_call_longer_than_the_direct_wait_is_handed_to_the_io_thread(pool):
    with Client(pool.address, timeout=10) as c:
        assert c.call("sleep", {"seconds": sync.DIRECT_WAIT * 4}) == {"seconds": sync.DIRECT_WAIT * 4}
        assert c._direct_calls == 0
        assert c.call("echo", 1) == 1  # and the next one is direct again
        assert c._direct_calls == 1


def test_a_deadline_inside_the_direct_wait_is_still_the_routers(pool):
    with Client(pool.address) as c:
        with pytest.raises(RequestTimeoutError):
            c.call("sleep", {"seconds": 2}, timeout=0.02)
        assert c.call("echo", 2) == 2


def test_calls_from_many_threads_with_submits_between_all_get_their_own_replies(pool):
    """Threads race for the socket: one wins a direct call, the others go through the I/O
    thread, and a submit pushed during a direct call ends it early (the I/O thread takes
    over). Every reply reaches its own caller, once."""
    with Client(pool.address, timeout=30) as c:
        errors: list[BaseException] = []

        def caller(k: int) -> None:
            try:
                for i in range(200):
                    value = (k, i)
                    assert c.call("echo", value) == list(value)
                    if i % 20 == 0:
                        futs = [c.submit("echo", j) for j in range(5)]
                        assert [f.result(30) for f in futs] == list(range(5))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        assert c.unmatched_replies == 0 and not c._replies


def test_closing_during_a_direct_call_fails_it_as_closed(pool):
    c = Client(pool.address, timeout=10)
    result: list = []

    def call() -> None:
        try:
            result.append(c.call("sleep", {"seconds": 1}))
        except Exception as exc:
            result.append(exc)

    t = threading.Thread(target=call)
    t.start()
    t.join(sync.DIRECT_WAIT / 2)  # most likely inside the direct wait now
    c.close()
    t.join(10)
    assert len(result) == 1 and type(result[0]).__name__ == "ClientClosedError"
