"""Dynamic batching (@batched) through a real pool: how batches form, and that every caller
of a batch gets exactly its own reply or its own error, whatever happens to the batch."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError

from ipc import protocol
from ipc.protocol import Kind
from tests.conftest import _env
from tests.raw import RawPeer
from tests.router_harness import Harness
from workerpool import (
    Client,
    HandlerError,
    PayloadError,
    RequestTimeoutError,
    WorkerCrashedError,
    batched,
)
from workerpool.batching import BatchSizeMeter, batch_spec
from workerpool.busy import BusyMeter
from workerpool.errors import ResourceExhaustedError

H = "tests.handlers:Batches"


def _pool(procs, max_inflight=32, workers=1, policy="least-loaded"):
    return procs.pool("--max-inflight", str(max_inflight), "--policy", policy, handler=H,
                      workers=workers)


class _Gate:
    """Holds the single worker in a plain call, so requests line up behind it; ``open()``
    lets it go once they are all there."""

    def __init__(self, procs, pool, c):
        self.path = procs.dir / f"gate-{time.monotonic_ns()}"
        self.pool = pool
        self.fut = c.submit("gate", {"path": str(self.path)})
        _wait_in_flight(pool, 1)

    def open(self, in_flight):
        _wait_in_flight(self.pool, in_flight)
        self.path.touch()
        assert self.fut.result() == "opened"


def _wait_in_flight(pool, n):
    pool.wait_for(lambda st: st["services"][0]["in_flight"] == n, what=f"{n} in flight")


# -- the decorator -------------------------------------------------------------------------------
def test_decorator_validates_its_limits_and_refuses_generators():
    with pytest.raises(ValidationError):
        batched(max_batch_size=0)
    with pytest.raises(ValidationError):
        batched(max_delay_ms=-1)
    with pytest.raises(TypeError, match="cannot stream"):
        @batched()
        def gen(self, payloads):
            yield payloads

    class H:
        @batched(max_batch_size=4, max_delay_ms=1.5)
        def m(self, payloads):
            return payloads

        def plain(self, payload):
            return payload

    spec = batch_spec(H().m)
    assert (spec.max_batch_size, spec.max_delay_ms) == (4, 1.5)
    assert batch_spec(H().plain) is None
    assert H().m([1, 2]) == [1, 2]  # still an ordinary method in-process


# -- how batches form ----------------------------------------------------------------------------
def test_full_batches_and_one_reply_each(procs):
    pool = _pool(procs)
    with Client(pool.address, timeout=30) as c:
        gate = _Gate(procs, pool, c)
        futs = [c.submit("work", {"i": i}) for i in range(16)]
        gate.open(17)
        assert [f.result() for f in futs] == [{"i": i, "batch": 8} for i in range(16)]
        assert c.call("batch_log") == [list(range(8)), list(range(8, 16))]
        stats = c.call("whoami")["stats"]
        assert stats["batches"] == 2 and stats["batched_requests"] == 16


def test_status_shows_the_sizes_of_the_batches_each_worker_ran(procs):
    # Three clients send at once while the gate holds the worker: 18 requests wait, and
    # run as batches of 8, 8 and 2, which the worker reports in its heartbeats.
    pool = _pool(procs)
    with Client(pool.address, timeout=30) as c:
        gate = _Gate(procs, pool, c)

        def send(k: int) -> list:
            with Client(pool.address, timeout=30) as mine:
                futs = [mine.submit("work", {"i": 6 * k + j}) for j in range(6)]
                return [f.result()["i"] for f in futs]

        with ThreadPoolExecutor(3) as ex:
            senders = [ex.submit(send, k) for k in range(3)]
            gate.open(19)
            served = sorted(i for s in senders for i in s.result())
        assert served == list(range(18))
        sizes = [len(b) for b in c.call("batch_log")]
    assert sizes == [8, 8, 2]
    st = pool.wait_for(lambda st: st["workers"][0]["batches"].get("work", {}).get("count") == 3,
                       what="the batch sizes in status")
    work = st["workers"][0]["batches"]["work"]
    assert work == {"count": 3, "sum": 18, "mean": 6.0,
                    "buckets": [[1, 0], [2, 1], [4, 1], [7, 1], [8, 3]]}
    assert set(st["workers"][0]["batches"]) == {"work"}  # `patient` never ran a batch
    table = subprocess.run([sys.executable, "-m", "workerpool.cli", "status", "--router",
                            pool.address], capture_output=True, text=True, timeout=30,
                           env=_env())
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert row[header.index(" BATCH ") + 1:].split()[0] == "6.0"  # the mean batch size


def test_max_inflight_left_unset_follows_max_batch_size(procs, pool):
    # Batches (max_batch_size 8), no --max-inflight: each worker holds 2 x 8, so batches
    # are full and the next one gathers while one runs. A plain handler keeps 1.
    assert {w["capacity"] for w in pool.status()["workers"]} == {1}
    batches = procs.pool(handler=H, workers=1)
    [row] = batches.status()["workers"]
    assert row["capacity"] == 16
    with Client(batches.address, timeout=30) as c:
        gate = _Gate(procs, batches, c)
        futs = [c.submit("work", {"i": i}) for i in range(15)]  # 16 held with the gate
        gate.open(16)
        assert [f.result()["batch"] for f in futs] == [8] * 8 + [7] * 7
        assert c.call("batch_log") == [list(range(8)), list(range(8, 15))]
    assert "warning" not in batches.log.read_text()


def test_partial_batch_runs_when_the_oldest_has_waited_max_delay(procs):
    pool = _pool(procs)
    with Client(pool.address, timeout=30) as c:
        t0 = time.monotonic()
        futs = [c.submit("work", {"i": i}) for i in range(3)]
        assert [f.result() for f in futs] == [{"i": i, "batch": 3} for i in range(3)]
        assert time.monotonic() - t0 >= 0.3  # it waited max_delay_ms=300 for more
        assert c.call("batch_log") == [[0, 1, 2]]


def test_batches_never_wait_for_requests_the_router_cannot_send(procs):
    # max_inflight 1: the worker never holds a second request, so `patient`'s 2 s
    # max_delay must not apply (each call would then take over 2 s and time out).
    pool = _pool(procs, max_inflight=1)
    with Client(pool.address, timeout=1.5) as c:
        assert [c.call("patient", i) for i in range(3)] == [0, 1, 2]
        assert c.call("batch_log") == [[0], [1], [2]]
    log = pool.log.read_text()
    assert "@batched method 'work' has max_batch_size=8" in log
    assert "set the service's max_inflight >= 8" in log


def test_mixed_payloads_in_one_batch(procs):
    pool = _pool(procs)
    payloads = [1, "two", [3, [3.5]], {"i": 4}, None, b"\x00six", {"i": 7, "x": [1.0] * 1000}]
    with Client(pool.address, timeout=30) as c:
        gate = _Gate(procs, pool, c)
        futs = [c.submit("work", p) for p in payloads]
        gate.open(1 + len(payloads))
        got = [f.result() for f in futs]
        n = len(payloads)
        assert got == [{"echo": 1, "batch": n}, {"echo": "two", "batch": n},
                       {"echo": [3, [3.5]], "batch": n}, {"i": 4, "batch": n},
                       {"echo": None, "batch": n}, {"echo": b"\x00six", "batch": n},
                       {"i": 7, "batch": n}]
        assert len(c.call("batch_log")) == 1


def test_batched_and_plain_methods_and_streams_interleave(procs):
    pool = _pool(procs, workers=2, policy="round-robin")
    with Client(pool.address, timeout=60) as c:
        batched_futs = [c.submit("work", {"i": i}) for i in range(300)]
        plain_futs = [c.submit("echo", i) for i in range(300)]
        streams = [c.submit("count", {"n": 5}) for _ in range(20)]
        assert [f.result()["i"] for f in batched_futs] == list(range(300))
        assert [f.result() for f in plain_futs] == list(range(300))
        assert all(f.result() == [0, 1, 2, 3, 4] for f in streams)
        logs = [c.call("batch_log") for _ in range(2)]  # one from each worker (round-robin)
    seen = [tuple(b) for log in logs for b in log]
    ran = sorted(i for b in seen for i in b)
    assert ran == list(range(300))  # each batched request ran exactly once
    assert max(len(b) for b in seen) > 1  # and they did form batches


# -- one caller, one reply -----------------------------------------------------------------------
def _one_batch(procs, pool, c, payloads):
    gate = _Gate(procs, pool, c)
    futs = [c.submit("work", p) for p in payloads]
    gate.open(1 + len(payloads))
    return futs


def test_one_failing_item_fails_only_its_caller(procs):
    pool = _pool(procs)
    with Client(pool.address, timeout=30) as c:
        futs = _one_batch(procs, pool, c, [{"i": 0}, {"i": 1, "fail": True}, {"i": 2},
                                    {"i": 3, "item_oom": True}, {"i": 4, "typed": True},
                                    {"i": 5, "unencodable": True}])
        assert futs[0].result() == {"i": 0, "batch": 6}
        with pytest.raises(HandlerError, match="item 1 is bad") as info:
            futs[1].result()
        assert info.value.remote_type == "ValueError"
        assert futs[2].result() == {"i": 2, "batch": 6}
        with pytest.raises(ResourceExhaustedError, match="out of device memory"):
            futs[3].result()
        with pytest.raises(PayloadError, match="item 4: wrong shape"):
            futs[4].result()
        with pytest.raises(PayloadError, match="cannot be sent"):
            futs[5].result()
        assert c.call("batch_log") == [[0, 1, 2, 3, 4, 5]]
    assert pool.status()["workers"][0]["restarts"] == 0


@pytest.mark.parametrize(("flag", "error", "match", "remote_type"), [
    ("raise", HandlerError, "the whole batch failed", "ValueError"),
    ("short", HandlerError, "returned 2 results for a batch of 3 requests", "TypeError"),
    ("not_list", HandlerError, "returned dict, not a list", "TypeError"),
    ("oom", ResourceExhaustedError, "out of device memory", "RuntimeError"),
])
def test_a_batch_that_fails_as_a_whole_answers_each_caller(procs, flag, error, match, remote_type):
    pool = _pool(procs)
    with Client(pool.address, timeout=30) as c:
        pid = pool.status()["workers"][0]["pid"]
        futs = _one_batch(procs, pool, c, [{"i": 0}, {"i": 1, flag: True}, {"i": 2}])
        for f in futs:
            with pytest.raises(error, match=match) as info:
                f.result()
            assert info.value.extra.get("remote_type") == remote_type
        assert c.call("work", {"i": 9}) == {"i": 9, "batch": 1}  # the worker stays
    w = pool.status()["workers"][0]
    assert w["pid"] == pid and w["errored"] == 3


@pytest.mark.parametrize("flag", ["poison", "item_poison"])  # raised, or one item's result
def test_a_poisoned_context_in_a_batch_answers_each_caller_and_replaces_the_worker(procs, flag):
    pool = _pool(procs)
    with Client(pool.address, timeout=30) as c:
        pid = pool.status()["workers"][0]["pid"]
        gate = _Gate(procs, pool, c)
        futs = [c.submit("work", {"i": 0}), c.submit("work", {"i": 1, flag: True})]
        behind = c.submit("echo", "behind")  # held by the worker, not in the batch
        gate.open(4)
        for f in futs:
            with pytest.raises(WorkerCrashedError, match="sticky CUDA error") as info:
                f.result()
            assert info.value.extra["cause"] == "context-poisoned"
        assert behind.result() == "behind"  # never started: run on the replacement
        pool.wait_for(lambda s: s["workers"][0]["state"] == "ready"
                      and s["workers"][0]["pid"] != pid, what="respawn")


def test_a_sticky_error_while_sending_a_result_answers_the_rest_of_the_batch(procs):
    """A CUDA result is copied to the host as its reply is encoded, and an earlier kernel's
    sticky error surfaces there. The callers already answered keep their results; every
    other caller of the batch hears that the context is poisoned, and the worker is
    replaced (it used to die of the uncaught exception, its callers' cause unknown)."""
    pytest.importorskip("torch", reason="the failing result is a torch tensor")
    pool = _pool(procs)
    with Client(pool.address, timeout=30) as c:
        pid = pool.status()["workers"][0]["pid"]
        gate = _Gate(procs, pool, c)
        futs = [c.submit("work", {"i": 0}), c.submit("work", {"i": 1, "send_poison": True}),
                c.submit("work", {"i": 2})]
        behind = c.submit("echo", "behind")  # held by the worker, not in the batch
        gate.open(5)
        assert futs[0].result() == {"i": 0, "batch": 3}  # sent before the error
        for f in futs[1:]:
            with pytest.raises(WorkerCrashedError, match="sticky CUDA error") as info:
                f.result()
            assert info.value.extra["cause"] == "context-poisoned"
        assert behind.result() == "behind"  # never started: run on the replacement
        st = pool.wait_for(lambda s: s["workers"][0]["state"] == "ready"
                           and s["workers"][0]["pid"] != pid, what="respawn")
        assert "CUDA context poisoned" in st["workers"][0]["last_error"]


def test_a_bad_body_fails_only_its_caller(procs):
    pool = _pool(procs)
    peer = RawPeer(pool.address)
    try:
        with Client(pool.address, timeout=30) as c:
            gate = _Gate(procs, pool, c)
            peer.request(1, "work", {"i": 1})
            peer.send(protocol.encode(Kind.REQUEST, 2, {"method": "work"}, b"\xc1"))  # not msgpack
            peer.request(3, "work", {"i": 3})
            gate.open(4)
            peer.collect([1, 2, 3])
            assert c.call("batch_log") == [[1, 3]]
        assert peer.finals[1] == [(Kind.RESULT, {"i": 1, "batch": 2})]
        [(kind, err)] = peer.finals[2]
        assert kind is Kind.ERROR and err["type"] == "PayloadError"
        assert peer.finals[3] == [(Kind.RESULT, {"i": 3, "batch": 2})]
    finally:
        peer.close()


def test_cancelled_and_expired_requests_are_left_out_of_the_batch(procs):
    pool = _pool(procs)
    with Client(pool.address, timeout=30) as c:
        gate = _Gate(procs, pool, c)
        keep = [c.submit("work", {"i": 0}), c.submit("work", {"i": 3})]
        cancelled = c.submit("work", {"i": 1})
        expired = c.submit("work", {"i": 2}, timeout=0.3)
        _wait_in_flight(pool, 5)
        assert cancelled.cancel()
        with pytest.raises(RequestTimeoutError):
            expired.result()
        gate.open(5)  # both still take a place until the worker answers them
        assert [f.result() for f in keep] == [{"i": 0, "batch": 2}, {"i": 3, "batch": 2}]
        assert c.call("batch_log") == [[0, 3]]
        assert c.call("whoami")["stats"]["cancelled"] == 2  # both skipped by the worker
        assert pool.status()["services"][0]["in_flight"] == 0


def test_cancel_while_the_batch_is_gathering(procs):
    pool = _pool(procs)  # work's max_delay is 300 ms: time to cancel while it waits
    peer = RawPeer(pool.address)
    try:
        peer.request(1, "work", {"i": 1})
        peer.request(2, "work", {"i": 2})
        peer.send(protocol.encode(Kind.CANCEL, 1, None))
        peer.collect([2])
        assert peer.finals[2] == [(Kind.RESULT, {"i": 2, "batch": 1})]
        assert 1 not in peer.finals  # a cancelled request gets no reply
        with Client(pool.address, timeout=10) as c:
            assert c.call("batch_log") == [[2]]
    finally:
        peer.close()


def test_a_worker_killed_mid_batch_answers_each_caller_once(procs):
    pool = _pool(procs)
    started = procs.dir / "batch-started"
    with Client(pool.address, timeout=30) as c:
        pid = pool.status()["workers"][0]["pid"]
        gate = _Gate(procs, pool, c)
        futs = [c.submit("work", {"i": i, "sleep": 30, "started_file": str(started)})
                for i in range(3)]
        behind = c.submit("echo", "never started")
        gate.open(5)
        deadline = time.monotonic() + 10
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists(), "the batch never started"
        # The worker sent STARTED before the batch began; on a loaded machine it may not
        # have reached the router yet, and a kill before it does is answered as "only the
        # oldest ran" (7.1). This test is about what the router does once it knows.
        pool.wait_for(lambda st: st["workers"][0]["started"] == 3, what="STARTED for 3")
        os.kill(pid, signal.SIGKILL)
        for f in futs:  # all three were running (STARTED), not only the oldest
            with pytest.raises(WorkerCrashedError, match="SIGKILL"):
                f.result(10)
        assert behind.result(10) == "never started"  # requeued, run on the replacement
        st = pool.status()
        assert st["services"][0]["completed"] >= 2 and st["router"]["requests"] == 0
        assert c.call("batch_log") == []  # the replacement never saw the batch again


def test_exec_timeout_and_heartbeats_while_a_batch_runs(procs):
    pool = procs.pool_from_config(
        "[router]\nheartbeat_interval = 0.2\nheartbeat_liveness = 3\n"
        f'[[services]]\nname = "default"\nhandler = "{H}"\nworkers = 1\n'
        "max_inflight = 8\nexec_timeout = 2.0\n")
    with Client(pool.address, timeout=30) as c:
        pid = pool.status()["workers"][0]["pid"]
        # Longer than heartbeat_liveness (0.6 s): the worker keeps beating while it runs.
        ok = [c.submit("work", {"i": i, "sleep": 1.0}) for i in range(3)]
        assert [f.result() for f in ok] == [{"i": i, "batch": 3} for i in range(3)]
        assert pool.status()["workers"][0]["pid"] == pid
        # Longer than exec_timeout: every request of the batch times out, not only one.
        hung = [c.submit("work", {"i": i, "sleep": 60}) for i in range(3)]
        for f in hung:
            with pytest.raises(RequestTimeoutError, match="exec_timeout=2s"):
                f.result(15)
        st = pool.wait_for(lambda s: s["workers"][0]["state"] == "ready"
                           and s["workers"][0]["pid"] != pid, what="replaced")
        assert st["services"][0]["expired"] == 3
        assert c.call("work", {"i": 7}) == {"i": 7, "batch": 1}


def test_started_marks_only_requests_the_worker_holds_and_garbage_is_counted():
    h = Harness()
    h.hello(workers=1, max_inflight=8)
    w = h.ready("default/0", capacity=8, methods=("work",))
    h.request(b"c", 1, "work")
    h.request(b"c", 2, "work")
    conn = h.core.registry.conns[w]
    a, b = sorted(conn.in_flight)
    h.backend(w, Kind.STARTED, {"ids": [a, b, 99]})  # 99: not held (already answered): ignored
    assert conn.started == {a, b}
    h.backend(b"stranger#1", Kind.STARTED, {"ids": [13]})  # not a registered worker: ignored
    for bad in ({"ids": a}, {"ids": [[1]]}, {"ids": [a, "12"]}, {"ids": [True]}, {}):
        h.backend(w, Kind.STARTED, bad)
    assert h.core.stats["bad_frames_backend"] == 5
    assert conn.started == {a, b} and h.core.stats["internal_errors"] == 0


def test_a_worker_learns_when_the_router_caps_it_below_what_it_declared(procs):
    # Supervisor a describes the service first, with max_inflight 2; b's Batches worker
    # leaves it unset and declares 16. The router caps it at 2 and tells it, so its batches
    # flush at 2 instead of waiting max_delay for 8 that can never come.
    router, back = procs.router()
    procs.node(router, back, "a", "--handler", H, "--workers", "1", "--max-inflight", "2")
    router.wait_ready(1)
    b = procs.node(router, back, "b", "--handler", H, "--workers", "1")
    st = router.wait_ready(2)
    assert {w["id"]: w["capacity"] for w in st["workers"]} == {"default/a/0": 2,
                                                               "default/b/0": 2}
    told = "[default/b/0] the router caps this worker at 2 request(s) (it declared 16)"
    warned = ("@batched method 'work' has max_batch_size=8 but this worker holds at most "
              "max_inflight=2")
    # One line per method, written one after the other: wait for the one asked about,
    # not only the first (reading between the two was a flaky failure).
    deadline = time.monotonic() + 20
    while not (told in (log := b.log.read_text()) and warned in log) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert told in log
    assert warned in log
    with Client(router.address, timeout=20) as c:
        futs = [c.submit("work", {"i": i}) for i in range(8)]
        assert sorted(f.result()["i"] for f in futs) == list(range(8))


def test_a_worker_takes_its_cap_from_the_router_and_ignores_bad_ones(tmp_path, caplog):
    from workerpool.batching import BatchSpec
    from workerpool.worker import Worker, WorkerSpec

    caplog.set_level(logging.INFO, logger="workerpool.worker")
    w = Worker(WorkerSpec(slot="default/0", service="default", incarnation=1, handler=H,
                          device="cpu", backend=f"ipc://{tmp_path}/b"))
    try:
        w._batched = {"work": BatchSpec(max_batch_size=8)}
        w.declared = w.capacity = 16
        for bad in ({"capacity": "2"}, {"capacity": 0}, {"capacity": -3}, {"capacity": True},
                    {"capacity": 2.0}, {"capacity": None}, {}):
            w._on_message(protocol.encode(Kind.READY, 0, bad))
            w._take_control()
        assert w.capacity == 16 and caplog.text == ""
        w._on_message(protocol.encode(Kind.READY, 0, {"capacity": 4}))
        w._take_control()
        assert w.capacity == 4
        told = [r.getMessage() for r in caplog.records]
        assert told[0] == ("[default/0] the router caps this worker at 4 request(s) (it "
                           "declared 16): the service's max_inflight")
        assert "max_batch_size=8 but this worker holds at most max_inflight=4" in told[1]
        w._on_message(protocol.encode(Kind.READY, 0, {"capacity": 100}))  # above: declared
        w._take_control()
        assert w.capacity == 16
        assert w._ready_meta()["capacity"] == 16  # a new router hears what it can hold
    finally:
        w._sock.close(0)
        if w._shm is not None:
            w._shm.close()


# -- BatchRunner alone: a fake worker, plain values, no sockets ------------------------------
class _FakeReplies:
    def __init__(self):
        self.sent: list[tuple] = []
        self.flushed = 0

    def error(self, rid, err):
        self.sent.append(("error", rid, err.type, err.message))

    def value(self, kind, rid, value, shm_ok=False):
        self.sent.append((kind.name.lower(), rid, value))

    def send(self, kind, rid, meta=None):
        self.sent.append((kind.name.lower(), rid, meta))

    def wait_unsent(self):
        pass

    def flush(self):
        self.flushed = len(self.sent)  # how many replies were out at the last flush


class _FakeHost:
    def __init__(self):
        from workerpool.backlog import Backlog
        from workerpool.context import WorkerStats
        self.backlog = Backlog()
        self.stats = WorkerStats()
        self.replies = _FakeReplies()
        self.busy = BusyMeter()
        self.sizes = BatchSizeMeter({"work": 8})
        self.failed: list[tuple] = []

    def add(self, rid, method, payload, **meta):
        from ipc import codec
        body, buffers = codec.dumps(payload)
        self.backlog.put(protocol.decode(protocol.encode(
            Kind.REQUEST, rid, {"method": method, **meta}, body, buffers)))

    def more_may_come(self):
        return False  # flush at once: nothing else is coming

    def receive(self, wait_ms):
        pass

    def decode(self, msg):
        from ipc import codec
        return codec.loads(msg.body, msg.buffers), False

    def fail(self, req_ids, exc):
        self.failed.append((list(req_ids), type(exc).__name__))


def _run(host, fn, max_batch_size=3):
    from workerpool.batching import BatchRunner, BatchSpec
    runner = BatchRunner(host)
    first = host.backlog.pop_oldest()
    runner.run(first, None, BatchSpec(max_batch_size=max_batch_size), fn)
    assert runner.held() == 0 and not runner.gathering
    return runner


def test_batch_runner_takes_matching_requests_oldest_first_up_to_the_batch_size():
    host, calls = _FakeHost(), []
    for rid, method in enumerate(["work", "other", "work", "work", "work"], start=1):
        host.add(rid, method, {"i": rid})
    _run(host, lambda payloads: calls.append(payloads) or [p["i"] * 10 for p in payloads])
    assert calls == [[{"i": 1}, {"i": 3}, {"i": 4}]]
    assert host.backlog.ids() == [2, 5]  # the other method, and what did not fit
    assert host.replies.sent == [("started", 0, {"ids": [1, 3, 4]}), ("result", 1, 10),
                                 ("result", 3, 30), ("result", 4, 40)]
    assert (host.stats.batches, host.stats.batched_requests) == (1, 3)
    assert host.sizes.report()["work"] == {"count": 1, "sum": 3, "buckets": [
        [1, 0], [2, 0], [4, 1], [7, 1], [8, 1]]}


def test_batch_runner_answers_per_item_errors_and_leaves_out_expired_requests():
    host = _FakeHost()
    host.add(1, "work", {"i": 1})
    host.add(2, "work", {"i": 2}, timeout=0)  # its deadline passed before the batch ran
    host.add(3, "work", {"i": 3})

    def fn(payloads):
        return [ValueError("bad item"), payloads[1]["i"]]

    _run(host, fn)
    assert host.replies.sent == [
        ("error", 2, "RequestTimeoutError", "timeout=0s passed before its batch ran"),
        ("started", 0, {"ids": [1, 3]}), ("result", 3, 3)]
    assert host.failed == [([1], "ValueError")]  # only its caller hears of it
    assert host.sizes.report()["work"]["sum"] == 2  # the size as run: the expired one left out


def test_batch_runner_fails_every_caller_when_the_method_raises_or_breaks_its_contract():
    for fn, error in ((lambda p: 1 / 0, "ZeroDivisionError"), (lambda p: [1], "TypeError")):
        host = _FakeHost()
        host.add(1, "work", {})
        host.add(2, "work", {})
        _run(host, fn)
        assert host.failed == [([1, 2], error)]
