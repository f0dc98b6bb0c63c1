"""The worker's socket thread (workerpool/wire.py): alone on a socket pair, then in a real
worker process behind a ROUTER socket the test owns (docs/protocol.md 7.1-7.2): requests
are taken in, pings answered and held requests cancelled while a handler runs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time

import msgpack
import pytest
import zmq

from ipc import protocol, transport
from ipc.protocol import FINAL_REPLY_KINDS, Kind
from tests.test_bundle_worker_live import FakeRouter, request, value
from workerpool import Client, WorkerCrashedError, wire
from workerpool.wire import Sent, Wire


class Pair:
    """A DEALER (the worker's side, given to a Wire) connected to a ROUTER (the router's)."""

    def __init__(self, tmp_path, on_message=None) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(f"ipc://{tmp_path}/w")
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.IDENTITY, b"w")
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(f"ipc://{tmp_path}/w")
        self.got: list[tuple[list, str]] = []
        self.wire = Wire(self.dealer, on_message or (
            lambda frames: self.got.append((frames, threading.current_thread().name))))

    def recv(self, timeout: float = 10.0) -> list:
        assert self.router.poll(timeout * 1000), "nothing arrived"
        return self.router.recv_multipart()[1:]

    def close(self) -> None:
        self.wire.stop()
        self.dealer.close(0)
        self.router.close(0)
        self.ctx.term()


@pytest.fixture
def pair(tmp_path):
    with contextlib.closing(Pair(tmp_path)) as p:
        yield p


def _until(cond) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.005)


def test_not_lent_a_send_is_the_caller_s_and_the_thread_reads_nothing(pair):
    pair.wire.start()
    pair.wire.send([b"direct"])
    assert not pair.wire._out  # sent by the caller itself, not handed over
    assert pair.recv() == [b"direct"]
    pair.router.send_multipart([b"w", b"unread"])
    time.sleep(0.2)
    assert pair.got == [] and transport.readable(pair.dealer)  # left for the main thread


def test_lent_messages_leave_in_order_and_arrive_on_the_wire_thread(pair):
    pair.wire.start()
    pair.wire.lend()
    for i in range(200):
        pair.wire.send([b"%d" % i, b"body"] if i % 2 else [b"%d" % i])
    assert [pair.recv() for _ in range(200)] == [
        [b"%d" % i, b"body"] if i % 2 else [b"%d" % i] for i in range(200)]
    for i in range(3):
        pair.router.send_multipart([b"w", b"in-%d" % i])
    _until(lambda: len(pair.got) == 3)
    assert pair.got == [([b"in-%d" % i], "workerpool-wire") for i in range(3)]


def test_what_was_handed_over_leaves_before_what_the_caller_sends_after_reclaim(pair):
    pair.wire.start()
    for _ in range(20):  # reclaimed at once, or after the thread took the socket
        pair.wire.lend()
        pair.wire.send([b"handed"])
        pair.wire.reclaim()
        assert not pair.wire._out
        pair.wire.send([b"direct"])
        assert [pair.recv(), pair.recv()] == [[b"handed"], [b"direct"]]


def test_a_send_wakes_a_lent_thread_asleep_in_its_poll(pair, monkeypatch):
    monkeypatch.setattr(wire, "POLL_MS", 600_000)  # without the wake-up it would sleep on
    pair.wire.start()
    pair.wire.lend()
    time.sleep(0.2)  # asleep by now
    pair.wire.send([b"late"])
    assert pair.recv() == [b"late"]


def test_stop_sends_what_was_handed_over_then_gives_the_socket_back(pair):
    pair.wire.start()
    pair.wire.lend()
    for i in range(50):
        pair.wire.send([b"%d" % i])
    pair.wire.stop()
    assert not pair.wire.is_alive() and not pair.wire.lent
    transport.send(pair.dealer, [b"after"])  # the caller's again
    assert [pair.recv() for _ in range(51)] == [[b"%d" % i] for i in range(50)] + [[b"after"]]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_socket_is_not_lent_to_a_thread_that_stopped(tmp_path):
    def fail(frames):
        raise ValueError("a bug")

    p = Pair(tmp_path, on_message=fail)
    try:
        p.wire.start()
        p.wire.send([b"hello"])  # the ROUTER drops what it sends to a peer it does not know yet
        assert p.recv() == [b"hello"]
        p.wire.lend()
        p.router.send_multipart([b"w", b"boom"])
        _until(lambda: not p.wire.is_alive())
        p.wire.reclaim()  # returns: nothing left to wait for
        with pytest.raises(RuntimeError, match="socket thread has stopped"):
            p.wire.lend()
    finally:
        p.close()


def test_a_tracked_send_is_waited_on_until_zeromq_lets_go_of_its_memory(pair):
    big = bytearray(transport.COPY_THRESHOLD * 4)  # zero-copy
    with pytest.raises(zmq.NotDone):
        Sent().wait(0.01)  # never handed to a thread: never sent
    pair.wire.start()
    pair.wire.lend()
    (sent,) = pair.wire.send([b"head", big], track=True)
    sent.wait(10)
    assert sent.trackers and all(t.done for t in sent.trackers)
    assert pair.recv() == [b"head", bytes(big)]
    assert pair.wire.send([b"small"], track=False) == []


# -- in a worker process ---------------------------------------------------------------------
@pytest.fixture
def router(tmp_path):
    with FakeRouter(tmp_path) as r:
        yield r


def _wait_for(path: str) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def test_the_next_request_is_taken_in_while_a_handler_runs_back_to_back(router, tmp_path):
    started = str(tmp_path / "started")
    # The second was in the worker as the first ended: the socket is lent while it runs.
    router.send([request(1, "echo", 1), request(2, "received", {"n": 3, "started": started})])
    _wait_for(started)  # running: anything sent now arrives during the handler call
    router.send([request(3, "echo", "next")])
    got = router.finals([1, 2, 3])
    assert value(got[2][0]) == 3  # it saw the third request arrive, without waiting 20 s
    assert value(got[3][0]) == "next"


def test_a_ping_is_answered_while_a_handler_runs_back_to_back(router, tmp_path):
    path = str(tmp_path / "open")
    router.send([request(1, "echo", 1), request(2, "gate", {"path": path})])
    assert value(router.finals([1])[1][0]) == 1
    (ping,) = protocol.encode(Kind.HEARTBEAT, 7, {"ping": 7})
    router.send([ping])
    (pong,) = router.next()
    assert (pong.kind, pong.req_id, pong.meta) == (Kind.HEARTBEAT, 7, {"pong": 7})
    open(path, "w").close()
    assert value(router.finals([2])[2][0]) == "opened"


def test_a_cancel_of_a_request_held_ahead_is_answered_while_the_handler_runs(router, tmp_path):
    path = str(tmp_path / "open")
    router.send([request(1, "echo", 1), request(2, "gate", {"path": path}),
                 request(3, "echo", 3)])
    assert value(router.finals([1])[1][0]) == 1
    (cancel,) = protocol.encode(Kind.CANCEL, 3, None)
    router.send([cancel])
    (answer,) = router.next()  # before the gate opens: the place it held is free at once
    assert (answer.kind, answer.req_id) == (Kind.ERROR, 3)
    err = value(answer)
    assert (err["type"], err["message"], err["worker"]) == (
        "RequestCancelledError", "cancelled before it started", "default/0")
    open(path, "w").close()
    got = router.finals([2])
    assert value(got[2][0]) == "opened" and 3 not in got
    router.send([request(4, "whoami", None)])  # counted once, by the main thread
    assert value(router.finals([4])[4][0])["stats"]["cancelled"] == 1


def test_cancels_racing_their_requests_get_one_final_reply_each(router):
    router.send([request(1, "echo", 0)])  # measured: later ones may group
    router.finals([1])
    ids = range(10, 410)
    for i in ids:
        (cancel,) = protocol.encode(Kind.CANCEL, i, None)
        router.send([request(i, "echo", i)])
        router.send([cancel])
    finals: dict[int, list] = {}
    router.messages.clear()
    while len(finals) < len(ids):
        for m in router.next():
            if m.kind in FINAL_REPLY_KINDS:
                finals.setdefault(m.req_id, []).append(m)
    with pytest.raises(AssertionError, match="nothing from the worker"):
        while True:  # a second answer to any of them would come within the half second
            for m in router.next(timeout=0.5):
                assert m.kind not in FINAL_REPLY_KINDS, f"a second final reply for {m.req_id}"
    assert sorted(finals) == list(ids) and all(len(v) == 1 for v in finals.values())
    kinds = {(m.kind, value(m) if m.kind is Kind.RESULT else value(m)["type"])
             for v in finals.values() for m in v}
    assert kinds <= {(Kind.RESULT, i) for i in ids} | {(Kind.ERROR, "RequestCancelledError")}


def test_the_socket_is_lent_while_work_comes_back_to_back_and_taken_back_after(router):
    # Back to back: the second was held ahead as the first ended, and runs lent.
    router.send([request(1, "echo", 1), request(2, "lent", None)])
    assert value(router.finals([1, 2])[2][0]) is True
    # Then one at a time, after pauses: the worker takes it back (workerpool/lending.py
    # says when; test_lending.py holds it to that).
    seen = []
    for i in range(3, 6):
        time.sleep(0.02)
        router.send([request(i, "lent", None)])
        seen.append(value(router.finals([i])[i][0]))
    assert seen == [False] * 3


def test_a_worker_whose_socket_thread_fails_is_replaced_and_every_request_answered(procs):
    pool = procs.pool(workers=1, handler="tests.handlers:WireFails")
    with Client(pool.address, timeout=30) as c:
        pid = c.call("break_wire")
        # Back to back: the socket is lent, the thread fails on its first read; the replies
        # handed to it leave when the worker takes the socket back, and the next lend
        # ends the worker, which its supervisor replaces.
        futures = [c.submit("echo", i) for i in range(200)]
        outcomes = []
        for i, fut in enumerate(futures):
            try:
                assert fut.result(30) == i
                outcomes.append("ok")
            except WorkerCrashedError:
                outcomes.append("crashed")  # it was running when the worker ended
        assert outcomes.count("crashed") <= 1
        me = c.call("whoami")
        assert me["pid"] != pid and me["slot"] == "default/0"
        assert c.call("echo", "after") == "after"
        (w,) = pool.status()["workers"]
        assert w["restarts"] == 1 and w["state"] in ("ready", "busy")
    log = pool.log.read_text()
    assert "the worker's socket thread failed" in log  # logged by the thread
    assert "the worker's socket thread has stopped" in log  # the next lend ended the worker


def test_an_error_reply_is_built_the_same_by_either_thread():
    from workerpool.errors import RequestCancelledError
    from workerpool.replies import Replies

    r = Replies(None, "svc/0", 1 << 20)
    frames = r.error_frames(5, RequestCancelledError("cancelled before it started"))
    r.error(5, RequestCancelledError("cancelled before it started"))
    assert r.held == frames
    msg = protocol.decode(frames)
    assert msg.meta == {"worker": "svc/0"}
    assert msgpack.unpackb(msg.body)["worker"] == "svc/0"


# -- whether the handler computes (workerpool/busy.py) ------------------------------------------
def _in_python(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:  # computes, holding the GIL
        pass


def _in_c(seconds: float) -> None:
    buf = bytes(16384)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:  # keeps a CPU busy without the GIL (CUDA's spin)
        hashlib.md5(buf)


@pytest.mark.alone  # counts wake-ups that other processes on the CPUs can flip (below)
@pytest.mark.parametrize(("work", "late"), [
    (time.sleep, False),  # waits: a device's blocking sync, I/O
    (_in_c, False),
    (_in_python, True),
])
def test_a_wake_up_is_late_only_while_the_handler_holds_the_gil(pair, work, late):
    pair.wire.start()
    seen = []
    for i in range(20):
        pair.wire.lend()  # lent anew: looked at anew
        assert pair.wire.late is False
        _until(lambda: pair.wire._asleep)
        pair.wire.send([b"reply %d" % i])  # wakes the thread, then the handler runs
        work(0.03)
        assert pair.recv() == [b"reply %d" % i]
        seen.append(pair.wire.late)
    # On quiet CPUs every wake-up says the same: 20 late, or none. With other processes on
    # them, the kernel may run the woken thread while the handler's thread is still in the
    # write that woke it (the GIL let go), or stop the handler's thread in the instant it
    # holds the GIL between two C calls. That wake-up then rightly says the other thing; the
    # worker judges a lending by all of its wake-ups (workerpool/lending.py). With both CPUs
    # taken by two other processes, 9-16 of 20 were late here computing in Python, 0-1 not.
    if late:
        assert sum(seen) >= 5, seen
    else:
        assert sum(seen) <= 2, seen


def test_the_time_a_thread_waits_for_a_cpu_is_read_without_the_gil():
    with wire.RunQueue() as queue:
        first = queue.waited()
        time.sleep(0.01)
        assert queue.waited() >= first >= 0.0
