"""BUNDLE with a real worker process (docs/protocol.md 2.6, 7.1): a ROUTER socket owned by
the test plays the router, so it can send the worker bundles and see every message the
worker sends; and a real pool whose worker is killed while it holds replies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from ipc import protocol
from ipc.protocol import FINAL_REPLY_KINDS, Kind
from tests.conftest import _env
from tests.raw import RawPeer
from workerpool import Client
from workerpool.worker import SPEC_ENV, WorkerSpec

HANDLER = "tests.handlers:Batches"  # echo and sleep (plain), work (@batched, 8 at most)


class FakeRouter:
    """A bound ROUTER socket and one real worker process connected to it."""

    def __init__(self, tmp_path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        address = f"ipc://{tmp_path}/backend"
        self.sock.bind(address)
        self.spec = WorkerSpec(slot="default/0", service="default", incarnation=1,
                               handler=HANDLER, device="cpu", backend=address,
                               parent_pid=os.getpid())
        env = {**_env(), SPEC_ENV: self.spec.model_dump_json()}
        self.proc = subprocess.Popen([sys.executable, "-m", "workerpool.worker"], env=env,
                                     start_new_session=True)
        self.messages: list[list[protocol.Message]] = []  # per message received: its contents
        kind = self.next()[0].kind
        assert kind is Kind.READY

    def next(self, timeout: float = 10.0) -> list[protocol.Message]:
        """The next message from the worker's main socket, as the messages it carries."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.sock.poll(100):
                continue
            ident, *frames = self.sock.recv_multipart()
            if ident != self.spec.identity:
                continue  # the heartbeat thread's
            head = frames[0]
            inner = protocol.unbundle(head) if head[3] == Kind.BUNDLE else [head]
            msgs = [protocol.decode([h]) for h in inner]
            self.messages.append(msgs)
            return msgs
        raise AssertionError(f"nothing from the worker within {timeout}s")

    def send(self, heads: list[bytes]) -> None:
        """``heads`` as one message: a BUNDLE when there are several."""
        (message,) = protocol.pack(heads)
        self.sock.send_multipart([self.spec.identity, message])

    def finals(self, ids) -> dict[int, list[protocol.Message]]:
        """Read until every id in ``ids`` has a final reply; then what each got."""
        got: dict[int, list[protocol.Message]] = {}
        self.messages.clear()
        while not set(ids) <= set(got):
            for m in self.next():
                if m.kind in FINAL_REPLY_KINDS:
                    got.setdefault(m.req_id, []).append(m)
        return got

    def __enter__(self) -> FakeRouter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def router(tmp_path):
    with FakeRouter(tmp_path) as r:
        yield r


def request(rid: int, method: str, payload) -> bytes:
    (head,) = protocol.encode(Kind.REQUEST, rid, {"method": method}, msgpack.packb(payload))
    return head


def value(m: protocol.Message):
    return msgpack.unpackb(m.body) if m.body else None


def test_a_bundle_of_quick_requests_is_answered_once_each_in_fewer_messages(router):
    router.send([request(1, "echo", 0)])  # measured once: a method never seen is slow
    assert value(router.finals([1])[1][0]) == 0
    ids = range(10, 60)
    router.send([request(i, "echo", i) for i in ids])
    got = router.finals(ids)
    assert {i: [(m.kind, value(m)) for m in got[i]] for i in ids} == \
        {i: [(Kind.RESULT, i)] for i in ids}
    assert len(router.messages) < 50
    bundles = [msgs for msgs in router.messages if len(msgs) > 1]
    assert bundles, "no replies were bundled"
    # Each group was announced before it ran, so a crash answers its requests as started.
    started = [m.meta["ids"] for msgs in router.messages for m in msgs if m.kind is Kind.STARTED]
    assert started and all(len(s) > 1 for s in started)
    assert sorted(i for s in started for i in s) == sorted(set(i for s in started for i in s))


def test_a_slow_handler_s_replies_are_not_held(router):
    ids = range(1, 6)
    router.send([request(i, "sleep", {"seconds": 0.005}) for i in ids])
    router.finals(ids)
    assert [[(m.kind, m.req_id) for m in msgs] for msgs in router.messages] == \
        [[(Kind.RESULT, i)] for i in ids]  # each alone, as it finished


def test_a_cancel_in_the_same_bundle_cancels_before_start(router):
    (cancel,) = protocol.encode(Kind.CANCEL, 2, None)
    router.send([request(1, "echo", 1), request(2, "echo", 2), cancel, request(3, "echo", 3)])
    got = router.finals([1, 2, 3])
    assert [len(got[i]) for i in (1, 2, 3)] == [1, 1, 1]
    assert got[2][0].kind is Kind.ERROR
    err = value(got[2][0])
    assert (err["type"], err["message"]) == ("RequestCancelledError",
                                            "cancelled before it started")
    assert (value(got[1][0]), value(got[3][0])) == (1, 3)


def test_a_batch_is_answered_as_one_bundle_after_its_started(router):
    ids = list(range(1, 9))
    router.send([request(i, "work", {"i": i}) for i in ids])
    got = router.finals(ids)
    assert {i: value(got[i][0]) for i in ids} == {i: {"i": i, "batch": 8} for i in ids}
    kinds = [[(m.kind, m.req_id) for m in msgs] for msgs in router.messages]
    assert kinds == [[(Kind.STARTED, 0)], [(Kind.RESULT, i) for i in ids]]


def test_pings_and_a_malformed_bundle(router):
    (ping,) = protocol.encode(Kind.HEARTBEAT, 7, {"ping": 42})
    router.send([request(1, "echo", 1), ping])
    replies = router.next() + router.next()
    assert {(m.kind, m.req_id) for m in replies} == {(Kind.RESULT, 1), (Kind.HEARTBEAT, 7)}
    # A BUNDLE whose count is wrong: none of it runs, nothing is answered (the router is
    # trusted: it is logged), and the worker goes on serving.
    bad = bytearray(protocol.pack([request(2, "echo", 2), request(3, "echo", 3)])[0])
    bad[11] = 3
    router.sock.send_multipart([router.spec.identity, bytes(bad)])
    router.send([request(4, "echo", 4)])
    assert [(m.kind, m.req_id) for m in router.next()] == [(Kind.RESULT, 4)]


def test_a_worker_killed_while_holding_replies_answers_each_request_once(procs):
    """Requests line up behind a slow one; then they run as groups whose replies are held,
    and the worker is killed inside one of them, at a gate. The router answers every
    request exactly once: those of the group as started (run again: idempotent), the rest
    as never run."""
    pool = procs.pool("--max-inflight", "64", handler=HANDLER, workers=1)
    gate = procs.dir / "gate"
    gate.touch()
    with Client(pool.address, timeout=30) as c:
        for _ in range(3):  # echo and gate become quick methods: they may join a group
            assert c.call("echo", 1) == 1
            assert c.call("gate", {"path": str(gate)}) == "opened"
        pid = c.call("whoami")["pid"]
        gate.unlink()
        peer = RawPeer(pool.address)
        try:
            peer.request(1, "sleep", {"seconds": 1.0}, idempotent=True)
            for i in range(2, 21):
                peer.request(i, "echo", i, idempotent=True)
            peer.request(21, "gate", {"path": str(gate)}, idempotent=True)
            for i in range(22, 31):
                peer.request(i, "echo", i, idempotent=True)
            peer.collect([1], timeout=10, settle=0.3)  # then the groups run up to the gate
            os.kill(pid, signal.SIGKILL)
            gate.touch()  # the respawned worker passes it
            peer.collect(range(1, 31), timeout=30, settle=0.5)
            assert {i: [k for k, _ in peer.finals.get(i, [])] for i in range(1, 31)} == \
                {i: [Kind.RESULT] for i in range(1, 31)}
        finally:
            peer.close()
        svc = c.status()["services"][0]
        # The gate and at least one more of its group counted as started.
        assert svc["retried"] >= 2 and svc["errored"] == 0
