"""Worker deaths for real (SIGKILL, segfault, os._exit): every request gets exactly one
reply, the pool returns to full strength, and later requests all succeed."""

from __future__ import annotations

import collections
import os
import signal
import time

import msgpack
import pytest

from ipc.protocol import Kind
from tests.raw import RawPeer
from workerpool import Client, RequestTimeoutError, WorkerCrashedError


def _check_exactly_one_reply(peer: RawPeer, ids) -> collections.Counter:
    missing = [i for i in ids if i not in peer.finals]
    dupes = {i: r for i, r in peer.finals.items() if len(r) != 1}
    assert not missing, f"{len(missing)} requests got no reply"
    assert not dupes, f"requests with several final replies: {dupes}"
    kinds = collections.Counter()
    for i in ids:
        kind, body = peer.finals[i][0]
        if kind is Kind.RESULT:
            kinds["result"] += 1
        else:
            assert kind is Kind.ERROR, kind
            assert body["type"] == "WorkerCrashedError", body
            assert body["retryable"] is True
            assert body["worker"].startswith("default/")
            kinds["crashed"] += 1
    return kinds


def test_sigkill_with_200_in_flight(procs):
    pool = procs.pool("--max-inflight", "64", "--policy", "round-robin")
    peer = RawPeer(pool.address)
    try:
        ids = range(1, 201)
        for i in ids:
            peer.request(i, "sleep", {"seconds": 0.02})
        victim = pool.busiest_worker(more_than=100)
        slot, pid = victim["id"], victim["pid"]
        os.kill(pid, signal.SIGKILL)
        peer.collect(ids, timeout=30)
        kinds = _check_exactly_one_reply(peer, ids)
        assert kinds["crashed"] >= 1, kinds
        assert kinds["result"] + kinds["crashed"] == 200
    finally:
        peer.close()
    st = pool.wait_ready(4)
    w = {x["id"]: x for x in st["workers"]}[slot]
    assert w["restarts"] == 1 and w["pid"] != pid
    assert "SIGKILL" in w["last_error"]
    with Client(pool.address, timeout=10) as c:
        assert [c.submit("echo", i).result() for i in range(200)] == list(range(200))
    assert pool.status()["router"]["requests"] == 0


def test_segfault_answers_everything_on_that_worker(procs):
    pool = procs.pool("--max-inflight", "64", "--policy", "least-loaded", workers=2)
    peer = RawPeer(pool.address)
    try:
        # The sleep goes to default/0, the segfault to default/1 (least loaded); the echoes
        # spread over both, so some wait behind the segfault on default/1.
        peer.request(1, "sleep", {"seconds": 0.3})
        peer.request(2, "segfault", None)
        ids = list(range(1, 103))
        for i in ids[2:]:
            peer.request(i, "echo", i)
        peer.collect(ids, timeout=30)
        kinds = _check_exactly_one_reply(peer, [i for i in ids if i != 2])
        kind, body = peer.finals[2][0]
        assert kind is Kind.ERROR and body["type"] == "WorkerCrashedError"
        assert "SIGSEGV" in body["message"]
        # What waited behind the segfault on the same worker never started: it was run
        # again elsewhere, so only the segfault itself failed.
        assert kinds["crashed"] == 0 and kinds["result"] == 101
    finally:
        peer.close()
    pool.wait_ready(2)
    with Client(pool.address, timeout=10) as c:
        assert c.call("echo", "ok") == "ok"


def test_exit_and_crash_mid_stream(procs):
    pool = procs.pool(handler="tests.handlers:Streams", workers=1)
    with Client(pool.address, timeout=10) as c:
        with pytest.raises(WorkerCrashedError, match="exited with code 3"):
            list(c.stream("count_then_crash", {"n": 3}))
        pool.wait_ready(1)
        assert c.call("echo", 1) == 1
    with Client(pool.address, timeout=10) as c:
        pool_exit = procs.pool(workers=1)
        with Client(pool_exit.address, timeout=10) as c2:
            with pytest.raises(WorkerCrashedError, match="exited with code 7") as info:
                c2.call("exit", {"code": 7})
            assert info.value.worker == "default/0"
            pool_exit.wait_ready(1)
            assert c2.call("echo", 2) == 2


def test_sys_exit_in_a_handler_is_a_crash_not_a_stop(procs):
    """SystemExit escapes the worker's loop. It used to send GOODBYE "stopped" on its way
    out: the router marked the slot stopped and failed the request as unservable."""
    pool = procs.pool(handler="tests.handlers:SysExit", workers=1)
    with Client(pool.address, timeout=10) as c:
        pid = pool.status()["workers"][0]["pid"]
        with pytest.raises(WorkerCrashedError, match="exited with code 4"):
            c.call("sys_exit", 4)
        st = pool.wait_for(lambda s: s["workers"][0]["state"] == "ready"
                           and s["workers"][0]["pid"] != pid, what="respawn")
        assert st["workers"][0]["restarts"] == 1
        assert c.call("echo", 1) == 1


def test_crash_is_reported_within_100ms(procs):
    pool = procs.pool(workers=1)
    with Client(pool.address, timeout=10) as c:
        fut = c.submit("hang")
        pool.wait_for(lambda st: st["workers"][0]["in_flight"] == 1, what="hang running")
        pid = pool.status()["workers"][0]["pid"]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            fut.result(5)
        elapsed = time.monotonic() - t0
    # Not a performance threshold: death is an event, so the answer must not wait for any
    # timeout (the smallest one in the system is 1 s).
    assert elapsed < 1.0, elapsed


def test_respawn_backoff_and_other_workers_keep_serving(procs):
    pool = procs.pool("--policy", "round-robin", workers=2)
    with Client(pool.address, timeout=10) as c:
        for _ in range(3):
            pid = pool.workers()["default/0"]["pid"]
            os.kill(pid, signal.SIGKILL)
            pool.wait_for(lambda st, pid=pid: st["workers"][0]["pid"] != pid
                          or st["workers"][0]["state"] != "ready", what="death noticed")
            # Meanwhile the other worker answers everything.
            assert [c.call("echo", i) for i in range(20)] == list(range(20))
            pool.wait_ready(2)
        assert pool.workers()["default/0"]["restarts"] == 3
        assert pool.workers()["default/1"]["restarts"] == 0


def test_hung_handler_with_timeout(procs):
    pool = procs.pool("--max-inflight", "1", workers=2)
    with Client(pool.address) as c:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="on worker default/"):
            c.call("hang", timeout=0.3)
        assert time.monotonic() - t0 < 5
        # The hung worker keeps its capacity (it is still running the request): traffic
        # goes to the other one.
        assert [c.call("echo", i, timeout=5) for i in range(10)] == list(range(10))
        st = pool.status()
        assert st["services"][0]["expired"] == 1
        hung = [w for w in st["workers"] if w["in_flight"] == 1]
        assert len(hung) == 1
        os.kill(hung[0]["pid"], signal.SIGKILL)
        pool.wait_ready(2)
    assert pool.status()["router"]["requests"] == 0


@pytest.mark.parametrize("prefetch,where", [("0", "in the queue"),
                                            ("1", "held ahead on worker default/0, not started")])
def test_timeout_while_queued(procs, prefetch, where):
    """Behind a running request, in the router's queue (prefetch 0) or held ahead on the
    worker (prefetch 1): the deadline answers it, and it never runs."""
    pool = procs.pool("--prefetch", prefetch, workers=1)
    with Client(pool.address) as c:
        slow = c.submit("sleep", {"seconds": 1.0})
        pool.wait_for(lambda st: st["workers"][0]["in_flight"] == 1, what="sleep running")
        with pytest.raises(RequestTimeoutError, match=where):
            c.call("echo", 1, timeout=0.2)
        assert slow.result(5) == {"seconds": 1.0}
        st = pool.status()
        assert st["services"][0]["expired"] == 1
        assert st["workers"][0]["completed"] == 1  # the expired request never ran


def test_cancel_a_queued_request(procs):
    pool = procs.pool("--prefetch", "0", workers=1)  # queued in the router, not held ahead
    with Client(pool.address, timeout=10) as c:
        slow = c.submit("sleep", {"seconds": 0.5})
        pool.wait_for(lambda st: st["workers"][0]["in_flight"] == 1, what="sleep running")
        queued = c.submit("echo", "never")
        pool.wait_for(lambda st: st["services"][0]["queued"] == 1, what="one queued")
        assert queued.cancel()
        pool.wait_for(lambda st: st["services"][0]["cancelled"] == 1, what="cancel")
        assert slow.result() == {"seconds": 0.5}
        assert c.call("echo", "after") == "after"
    st = pool.status()
    assert st["workers"][0]["completed"] == 2  # sleep + "after"; the cancelled one never ran


def test_setup_failure_marks_the_slot_failed(procs):
    pool = procs.pool(handler="tests.handlers:BadSetup", workers=1, wait=False)
    # Every worker failed in setup(): `up` stops with status 1 instead of respawning forever.
    assert pool.popen.wait(30) == 1
    log = pool.log.read_text()
    assert "weights not found" in log
    assert log.count("setup failed") == 1


def test_no_reply_from_a_vanished_worker_is_forwarded_twice(procs):
    """A late reply from a dead incarnation is dropped: the router keys replies by
    incarnation, and the record is gone once the crash was answered."""
    pool = procs.pool(workers=1)
    peer = RawPeer(pool.address)
    try:
        peer.request(1, "sleep", {"seconds": 0.5})
        pool.wait_for(lambda st: st["workers"][0]["in_flight"] == 1, what="running")
        os.kill(pool.status()["workers"][0]["pid"], signal.SIGKILL)
        peer.collect([1], timeout=10, settle=1.0)
        assert len(peer.finals[1]) == 1
        assert msgpack.unpackb(msgpack.packb(peer.finals[1][0][1]))["type"] == "WorkerCrashedError"
    finally:
        peer.close()
