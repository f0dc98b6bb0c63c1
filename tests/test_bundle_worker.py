"""BUNDLE on the worker side, without a worker process: the grouping and holding rule
(workerpool/holding.py) with plain values, ``Replies`` holding and flushing on a socket
pair, ``inbox.messages``, and the heartbeat thread and the supervisor taking bundles in."""

from __future__ import annotations

import logging
import time

import msgpack
import pytest
import zmq

from ipc import protocol, transport
from ipc.protocol import BUNDLE_MAX, FrameError, Kind
from workerpool.backlog import Backlog
from workerpool.batching import BatchSizeMeter
from workerpool.busy import BusyMeter
from workerpool.errors import HandlerError
from workerpool.holding import HandlerTimes, HoldLimits, ReplyHold
from workerpool.inbox import messages
from workerpool.replies import Replies
from workerpool.worker import WorkerSpec, _Heartbeat


# -- the rule -----------------------------------------------------------------------------------
def test_handler_times_are_a_moving_average_and_unknown_until_measured():
    t = HandlerTimes(smoothing=0.5)
    assert t.get("echo") is None and t.get(3) is None
    t.record("echo", 100e-6)
    assert t.get("echo") == pytest.approx(100e-6)
    t.record("echo", 300e-6)
    assert t.get("echo") == pytest.approx(200e-6)


def _hold(**times: float) -> ReplyHold:
    hold = ReplyHold(HoldLimits(quick=200e-6, max_wait=1e-3, max_held=8))
    for method, seconds in times.items():
        hold.times.record(method, seconds)
    return hold


def test_a_group_is_the_run_of_quick_requests_within_the_time_and_count_bounds():
    hold = _hold(echo=50e-6, add=100e-6, slow=5e-3, edge=200e-6)
    assert hold.quick("echo") and not hold.quick("slow") and not hold.quick("edge")
    assert not hold.quick("never-seen") and not hold.quick(None)
    assert hold.plan(["echo"] * 3) == 3
    assert hold.plan(["echo", "add", "echo", "slow", "echo"]) == 3  # up to the first slow one
    assert hold.plan(["echo", "unknown", "echo"]) == 1  # a method not measured is slow
    assert hold.plan(["slow", "echo"]) == 1  # the first runs anyway: a group of one
    assert hold.plan([]) == 1
    assert hold.plan(["echo"] * 100) == 8  # max_held
    assert hold.plan(["add"] * 100) == 8
    assert hold.plan(["echo"] * 100, most=3) == 3  # half of what the worker may hold
    assert hold.plan(["echo"] * 100, most=0) == 1
    assert hold.plan(iter(["echo"] * 100)) == 8  # reads only as far as it needs
    # Expected to take under max_wait together: 9 x 100 us would reach 1 ms.
    assert ReplyHold(HoldLimits(max_wait=1e-3)).plan([]) == 1
    wide = ReplyHold(HoldLimits(max_held=BUNDLE_MAX))
    wide.times.record("add", 100e-6)
    assert wide.plan(["add"] * 100) == 9


def test_held_replies_wait_only_within_the_count_bytes_and_age_bounds():
    hold = ReplyHold(HoldLimits(max_wait=1e-3, max_held=8, max_bytes=1000))
    assert hold.keep(1, 100, since=0.0, now=0.0005)
    assert not hold.keep(1, 100, since=0.0, now=0.001)  # the oldest waited max_wait
    assert not hold.keep(8, 100, since=0.0, now=0.0)  # a full bundle
    assert not hold.keep(2, 1000, since=0.0, now=0.0)  # a bundle's worth of bytes


def test_a_method_that_turns_slow_leaves_groups_and_comes_back_when_quick_again():
    hold = _hold(echo=20e-6)
    hold.times.record("echo", 10e-3)
    assert hold.plan(["echo", "echo"]) == 1
    for _ in range(20):
        hold.times.record("echo", 20e-6)
    assert hold.plan(["echo", "echo"]) == 2


def test_the_backlog_gives_its_oldest_requests_as_many_as_asked():
    b = Backlog()
    for rid in (1, 2, 3):
        b.put(protocol.Message(Kind.REQUEST, rid, {"method": "echo"}))
    seen = []

    def two(ahead):
        seen.append(next(ahead).req_id)
        return 2

    assert [m.req_id for m in b.take_oldest(two)] == [1, 2]
    assert seen == [1] and b.ids() == [3]
    assert b.take_oldest(lambda ahead: 5) != [] and len(b) == 0  # never more than there are
    assert not b.give_back(2, 2)  # taken: started, not given back (7.3)


# -- Replies: what is held, what goes at once ---------------------------------------------------
class Pair:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.tx, self.rx = self.ctx.socket(zmq.PAIR), self.ctx.socket(zmq.PAIR)
        self.tx.bind("inproc://replies")
        self.rx.connect("inproc://replies")
        self.now = 100.0
        self.replies = Replies(self.tx, "default/0", 2**20, clock=lambda: self.now)

    def received(self) -> list[list[tuple[Kind, int]]]:
        """Each message waiting, as the (kind, id) of what it carries."""
        out = []
        while self.rx.poll(50):
            frames = self.rx.recv_multipart()
            out.append([(m.kind, m.req_id) for m in map(protocol.decode, messages(frames))])
        return out

    def close(self) -> None:
        self.tx.close(0)
        self.rx.close(0)
        self.ctx.term()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def test_final_replies_are_held_until_flushed_then_leave_as_one_bundle(pair):
    r = pair.replies
    r.value(Kind.RESULT, 1, {"x": 1})
    pair.now = 100.5
    r.error(2, HandlerError("no"))
    r.end(3)
    assert pair.received() == []
    assert len(r.held) == 3 and r.held_since == 100.0
    assert r.held_bytes == sum(len(h) for h in r.held)
    r.flush()
    assert pair.received() == [[(Kind.RESULT, 1), (Kind.ERROR, 2), (Kind.END, 3)]]
    assert (r.held, r.held_bytes) == ([], 0)
    r.flush()  # nothing held: nothing sent
    r.value(Kind.RESULT, 4, 4)
    r.flush()
    assert pair.received() == [[(Kind.RESULT, 4)]]  # alone: not a bundle of one


def test_any_other_message_goes_at_once_after_what_is_held(pair):
    r = pair.replies
    r.value(Kind.RESULT, 1, 1)
    r.value(Kind.PARTIAL, 2, "item")
    assert pair.received() == [[(Kind.RESULT, 1), (Kind.PARTIAL, 2)]]
    r.value(Kind.RESULT, 3, 3)
    r.send(Kind.HEARTBEAT, 9, {"pong": 1})
    r.value(Kind.RESULT, 4, 4)
    r.send(Kind.STARTED, 0, {"ids": [5, 6]})
    assert pair.received() == [[(Kind.RESULT, 3), (Kind.HEARTBEAT, 9)],
                               [(Kind.RESULT, 4), (Kind.STARTED, 0)]]
    r.send(Kind.READY, 0, {"slot": "default/0"})
    assert pair.received() == [[(Kind.READY, 0)]]


def test_a_reply_of_several_frames_is_never_held_and_goes_after_what_is_held(pair):
    r = pair.replies
    r.value(Kind.RESULT, 1, 1)
    r.value(Kind.RESULT, 2, b"x" * 70000)  # its body gets a frame of its own
    got = []
    while pair.rx.poll(50):
        frames = pair.rx.recv_multipart()
        got.append((len(frames), [m.req_id for m in map(protocol.decode, messages(frames))]))
    assert got == [(1, [1]), (2, [2])]
    assert r.held == []


def test_waiting_for_zero_copy_frames_sends_what_is_held_first(pair):
    np = pytest.importorskip("numpy", reason="a zero-copy reply carries an array")
    r = pair.replies
    r.value(Kind.RESULT, 1, np.zeros(100000, dtype=np.uint8))  # tracked buffer frames
    r.value(Kind.RESULT, 2, 2)
    assert r.held
    assert [[rid for _, rid in msgs] for msgs in pair.received()] == [[1]]  # read: released
    r.wait_unsent()
    assert r.held == []
    assert [[rid for _, rid in msgs] for msgs in pair.received()] == [[2]]


def test_many_held_replies_leave_in_as_few_bundles_as_the_bounds_allow(pair):
    r = pair.replies
    for rid in range(1, BUNDLE_MAX + 11):
        r.value(Kind.RESULT, rid, rid)
    r.flush()
    got = pair.received()
    assert [len(m) for m in got] == [BUNDLE_MAX, 10]
    assert [rid for m in got for _, rid in m] == list(range(1, BUNDLE_MAX + 11))


# -- taking bundles in --------------------------------------------------------------------------
def _head(kind: Kind, rid: int, meta: dict | None = None) -> bytes:
    (head,) = protocol.encode(kind, rid, meta)
    return head


def test_messages_takes_a_bundle_apart_and_leaves_anything_else_alone():
    a, b = _head(Kind.REQUEST, 1, {"method": "echo"}), _head(Kind.CANCEL, 1)
    assert messages([a]) == [[a]]
    assert messages([a, b"buffer"]) == [[a, b"buffer"]]
    assert messages([b"junk"]) == [[b"junk"]]  # its own checks are decode's
    assert messages(protocol.pack([a, b])) == [[a], [b]]
    bad = bytearray(protocol.pack([a, b])[0])
    bad[11] = 3  # the count
    with pytest.raises(FrameError) as exc:
        messages([bytes(bad)])
    assert exc.value.code == "bad-bundle"
    with pytest.raises(FrameError):  # the BUNDLE's own lengths
        messages([protocol.pack([a, b])[0] + b"x"])


def test_the_heartbeat_thread_answers_a_bundle_of_reclaims_with_one(standin_router, caplog):
    ctx, router, address = standin_router.ctx, standin_router.sock, standin_router.address
    spec = WorkerSpec(slot="default/0", service="default", incarnation=1, handler="x:Y",
                      device="cpu", backend=address, heartbeat_interval=0.05)
    backlog = Backlog()
    backlog.put(protocol.Message(Kind.REQUEST, 7, {"method": "echo"}))  # seq 1: waiting
    busy = BusyMeter()
    heart = _Heartbeat(ctx, spec, busy, BatchSizeMeter({}), backlog)
    heart.start()

    def next_from_worker() -> list[protocol.Message]:
        assert router.poll(5000), "nothing from the heartbeat thread within 5 s"
        _, *frames = router.recv_multipart()
        return [protocol.decode(f) for f in messages(frames)]

    try:
        assert next_from_worker()[0].kind is Kind.HEARTBEAT
        ident = spec.identity + protocol.HEARTBEAT_SUFFIX
        caplog.set_level(logging.WARNING, logger="workerpool.worker")
        bad = bytearray(protocol.pack([_head(Kind.RECLAIM, 7, {"seq": 1})] * 2)[0])
        bad[11] = 1  # says 1 message, holds 2: refused whole, the request stays
        router.send_multipart([ident, bytes(bad)])
        router.send_multipart([ident, *protocol.pack([
            _head(Kind.RECLAIM, 7, {"seq": 1}),  # waiting here: given back
            _head(Kind.RECLAIM, 8, {"seq": 2}),  # not read yet: given back
            _head(Kind.RECLAIM, 9, {"seq": "x"}),  # not an int: not given back
            _head(Kind.HEARTBEAT, 0, {"register": True})])])
        deadline = time.monotonic() + 5
        while True:
            got = next_from_worker()
            if got[0].kind is Kind.RECLAIM:
                break
            assert time.monotonic() < deadline
        assert [(m.req_id, m.meta) for m in got] == [
            (7, {"returned": True}), (8, {"returned": True}), (9, {"returned": False})]
        assert heart.register_again.is_set() and len(backlog) == 0
        assert "dropped a malformed bundle" in caplog.text
    finally:
        heart.stop()


def test_the_supervisor_takes_each_message_of_a_bundle_as_alone(standin_supervisor, caplog):
    sup, router, ident = standin_supervisor
    bad = bytearray(protocol.pack([_head(Kind.DRAINED, 0)] * 2)[0])
    bad[11] = 5
    transport.send(router, [ident, bytes(bad)])  # refused whole: no DRAINED acted on
    transport.send(router, [ident, *protocol.pack([
        _head(Kind.ADMIN, 0, {"op": "reboot"}),  # unknown op: logged, ignored
        _head(Kind.ADMIN, 0, {"op": "scale", "service": "default"}),  # malformed
        _head(Kind.HEARTBEAT, 0, {"router": "r1"}),
        _head(Kind.READY, 0, {"slot": "nope/0", "incarnation": 1})])])
    deadline = time.monotonic() + 5
    while sup._link.instance is None and time.monotonic() < deadline:
        sup._drain_socket()
        time.sleep(0.01)
    assert "dropped malformed bundle from router" in caplog.text
    assert "ignored ADMIN with unknown op 'reboot'" in caplog.text
    assert "dropped malformed ADMIN from router" in caplog.text
    assert sup._link.instance == "r1" and not sup._drained and not sup._stopping


def test_a_cancel_takes_a_request_out_of_a_group_before_it_starts(tmp_path):
    from workerpool.worker import Worker

    w = Worker(WorkerSpec(slot="default/0", service="default", incarnation=1,
                          handler="tests.handlers:Batches", device="cpu",
                          backend=f"ipc://{tmp_path}/b"))
    try:
        w._group[5] = protocol.Message(Kind.REQUEST, 5, {"method": "echo"})
        assert w._outstanding() == 1
        w._on_message(protocol.encode(Kind.CANCEL, 5))  # on the wire thread: left to main
        assert w._group and not w.stats.cancelled
        w._take_control()  # the main thread's next turn
        assert not w._group and w.stats.cancelled == 1
        (reply,) = [protocol.decode([h]) for h in w.replies.held]
        assert reply.kind is Kind.ERROR and reply.req_id == 5
        assert msgpack.unpackb(reply.body)["message"] == "cancelled before it started"
    finally:
        w._sock.close(0)
        if w._shm is not None:
            w._shm.close()
