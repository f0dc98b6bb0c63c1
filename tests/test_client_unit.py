"""Client internals that need no router: the reply table (``Replies``) with plain values,
a fake clock, and both kinds of Future."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue

import pytest

from ipc import codec
from ipc.protocol import Kind
from workerpool.client import _replies
from workerpool.client._replies import Pending, Replies, reply_meta
from workerpool.errors import (
    ClientClosedError,
    HandlerError,
    PayloadError,
    RequestTimeoutError,
    RouterRestartedError,
)

META = b"\x81\xa6worker\xa9default/0"  # msgpack {"worker": "default/0"}


class FakePool:
    """Stands in for a SegmentPool: records which requests it was told are finished."""

    def __init__(self) -> None:
        self.finished: list[int] = []

    def finish(self, tag: int) -> None:
        self.finished.append(tag)


def _future(replies: Replies, rid: int, deadline: float | None = None):
    fut: concurrent.futures.Future = concurrent.futures.Future()
    replies.add(rid, Pending(fut, None, deadline))
    return fut


def _stream(replies: Replies, rid: int, deadline: float | None = None) -> queue.SimpleQueue:
    items: queue.SimpleQueue = queue.SimpleQueue()
    replies.add(rid, Pending(None, items.put, deadline))
    return items


def _drain(items: queue.SimpleQueue) -> list:
    out = []
    while not items.empty():
        out.append(items.get_nowait())
    return out


def test_partial_then_result_settles_a_future_and_feeds_a_stream():
    pool = FakePool()
    replies = Replies(pool)
    fut = _future(replies, 1)
    items = _stream(replies, 2)
    for rid in (1, 2):
        assert replies.apply(Kind.PARTIAL, rid, "a", META) is None
        assert replies.apply(Kind.PARTIAL, rid, "b", META) is None
    assert not fut.done() and len(replies) == 2 and pool.finished == []
    replies.apply(Kind.END, 1, None, META)  # a Future for a streaming method: its items
    assert fut.result(0) == ["a", "b"]
    assert reply_meta(fut) == {"worker": "default/0"}
    replies.apply(Kind.RESULT, 2, "c", META)
    assert _drain(items) == [(Kind.PARTIAL, "a"), (Kind.PARTIAL, "b"), (Kind.RESULT, "c")]
    assert len(replies) == 0 and pool.finished == [1, 2]


def test_result_and_error():
    replies = Replies()
    ok, bad = _future(replies, 1), _future(replies, 2)
    replies.apply(Kind.RESULT, 1, {"x": 1}, META)
    err = HandlerError("boom")
    replies.apply(Kind.ERROR, 2, err, b"\x80")
    assert ok.result(0) == {"x": 1}
    assert bad.exception(0) is err and reply_meta(bad) == {}  # the router's own error


def test_a_late_reply_for_an_unknown_id_is_ignored_and_counted():
    replies = Replies()
    fut = _future(replies, 1)
    replies.apply(Kind.RESULT, 1, "first", META)
    replies.apply(Kind.RESULT, 1, "second", META)  # a duplicate
    replies.apply(Kind.PARTIAL, 99, "never sent", META)
    assert fut.result(0) == "first"
    assert replies.unmatched == 2


def test_a_reply_to_a_cancelled_future_is_dropped():
    replies = Replies()
    fut = _future(replies, 1)
    fut.cancel()  # by its owner, before the table heard of it
    replies.apply(Kind.RESULT, 1, "late", META)  # no InvalidStateError
    assert fut.cancelled() and len(replies) == 0
    _future(replies, 2)
    assert replies.forget(2) and not replies.forget(2)  # a cancel that reached the table
    replies.apply(Kind.RESULT, 2, "late", META)
    assert replies.unmatched == 1


def test_fail_and_fail_all():
    pool = FakePool()
    replies = Replies(pool)
    lost, other = _future(replies, 1), _future(replies, 2)
    items = _stream(replies, 3)
    assert replies.fail(1, RouterRestartedError("lost"))
    assert not replies.fail(1, RouterRestartedError("lost"))  # once
    assert isinstance(lost.exception(0), RouterRestartedError) and reply_meta(lost) is None
    replies.fail_all(ClientClosedError("closed"))
    assert isinstance(other.exception(0), ClientClosedError)
    [(kind, err)] = _drain(items)
    assert kind is Kind.ERROR and isinstance(err, ClientClosedError)
    assert len(replies) == 0 and sorted(pool.finished) == [1, 2, 3]
    assert replies.next_deadline() is None


def test_expiry_with_a_fake_clock():
    replies = Replies()
    early, late = _future(replies, 1, deadline=10.0), _future(replies, 2, deadline=20.0)
    items = _stream(replies, 3, deadline=15.0)
    answered = _future(replies, 4, deadline=5.0)
    _future(replies, 5)  # no deadline: never expires
    replies.apply(Kind.RESULT, 4, "in time", META)
    assert answered.result(0) == "in time"
    assert list(replies.expire(9.9)) == []  # the answered request's timer is skipped
    assert replies.next_deadline() == 10.0
    _future(replies, 6, deadline=8.0)
    assert replies.forget(6)  # cancelled
    assert replies.next_deadline() == 10.0  # its timer is dropped, not waited for
    assert replies.expire(15.0) == [1, 3]
    with pytest.raises(RequestTimeoutError, match="no reply before the deadline"):
        early.result(0)
    [(kind, err)] = _drain(items)
    assert kind is Kind.ERROR and isinstance(err, RequestTimeoutError)
    assert not late.done()
    replies.apply(Kind.RESULT, 1, "too late", META)
    assert replies.unmatched == 1
    assert replies.expire(100.0) == [2]
    assert list(replies) == [5] and replies.next_deadline() is None


def test_shm_unreachable_error_hands_back_the_request_once():
    replies = Replies()
    fut = concurrent.futures.Future()
    entry = Pending(fut, None, None)
    request = entry.request = ("echo", b"payload", None, 0, None, None)
    replies.add(1, entry)
    err = PayloadError("cannot map", code=codec.SHM_UNREACHABLE)
    assert replies.apply(Kind.ERROR, 1, err, META) == request  # to send again in frames
    assert not fut.done() and 1 in replies  # waits for the answer to the frames
    assert replies.apply(Kind.ERROR, 1, err, META) is None  # could not resend: settled
    assert fut.exception(0) is err


def test_asyncio_futures_are_settled_the_same_way():
    async def main():
        loop = asyncio.get_running_loop()
        replies = Replies()
        ok, cancelled = loop.create_future(), loop.create_future()
        replies.add(1, Pending(ok, None, None))
        replies.add(2, Pending(cancelled, None, None))
        items: asyncio.Queue = asyncio.Queue()
        replies.add(3, Pending(None, items.put_nowait, 1.0))
        cancelled.cancel()
        replies.apply(Kind.RESULT, 1, "x", META)
        replies.apply(Kind.RESULT, 2, "y", META)  # cancelled meanwhile: dropped
        assert replies.expire(2.0) == [3]
        kind, err = items.get_nowait()
        assert await ok == "x" and kind is Kind.ERROR and isinstance(err, RequestTimeoutError)

    asyncio.run(main())


def test_local_deadline_timers_stay_bounded_by_the_pending_requests():
    replies = Replies()
    for rid in range(1, 50_001):
        replies.add(rid, Pending(None, None, 1e9 + rid))
        if rid > 10:  # answered: gone from the table, its timer left behind
            assert replies.forget(rid - 10)
    timers = replies._timers
    assert len(timers) <= 2 * len(replies) + _replies._TIMER_SLACK + 1
    armed = {rid for _, rid in timers if rid in replies}
    assert armed == set(replies)  # every pending request keeps its deadline


def _pong(instance: str, unknown: list[int], uptime: float) -> bytes:
    import msgpack

    return msgpack.packb({"router": instance, "unknown": unknown, "uptime": uptime})


def test_router_watch_names_the_lost_requests_of_a_router_that_changed():
    from workerpool.client._base import RouterWatch

    watch = RouterWatch()
    assert watch.due(100.0) and not watch.due(100.5)
    assert watch.lost(_pong("a", [], 50.0), 100.01) == []  # first pong: router a, old
    assert watch.lost(_pong("a", [7], 51.0), 101.0) == []  # same router: nothing lost
    assert watch.lost(_pong("b", [7, 8], 0.4), 102.0) == [7, 8]  # a new router


def test_router_watch_knows_a_restart_that_happened_before_its_first_pong():
    """The router died after taking the first request but before answering the ping that
    followed it: the first pong comes from its successor, younger than that ping."""
    from workerpool.client._base import RouterWatch

    watch = RouterWatch()
    assert watch.due(100.0)
    assert watch.lost(_pong("b", [3], 0.8), 101.2) == [3]
    fresh = RouterWatch()  # a client whose first ping reached a router up for a while
    assert fresh.due(100.0)
    assert fresh.lost(_pong("a", [3], 30.0), 100.001) == []


@pytest.mark.parametrize("address", ["foo", "tcp://", "tcp://127.0.0.1", "http://x:1", "ipc://",
                                     "localhost:5555"])
def test_an_address_that_is_not_one_is_a_value_error_saying_what_one_looks_like(address):
    from workerpool import AsyncClient, Client

    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match="tcp://HOST:PORT, ipc://PATH or inproc://NAME"):
            make(address)


def test_the_cli_refuses_an_address_that_is_not_one_as_a_usage_error():
    from click.testing import CliRunner

    from workerpool.cli import main

    for args in (["status", "--router", "foo"], ["status", "--watch", "--router", "foo"],
                 ["call", "echo", "1", "--router", "tcp://nohost"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert "is not an address" in result.output and "Traceback" not in result.output
