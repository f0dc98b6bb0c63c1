"""Limits on one client connection against a live pool: a flooder holds only its share, a
flooder that leaves takes its queued work with it, and a client that never reads its
replies is cut off with the router's memory bounded (router.clients)."""

from __future__ import annotations

import threading
import time

import msgpack
import zmq

from ipc import protocol
from ipc.protocol import FINAL_REPLY_KINDS, Kind
from tests.raw import RawPeer
from workerpool import Client

MiB = 2**20


def _pool(procs, router: str, handler: str = "workerpool.handlers:Echo", workers: int = 2):
    return procs.pool_from_config(
        f"[router]\n{router}\n"
        f'[[services]]\nname = "default"\nhandler = "{handler}"\n'
        f"workers = {workers}\nmax_inflight = 1\n")


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak since the process started), in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


class Flooder(threading.Thread):
    """A raw connection that keeps sending ``sleep`` requests as fast as it can, reading
    whatever comes back, until stopped: it always holds as much as the router lets it."""

    def __init__(self, address: str, seconds: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.seconds = seconds
        self.stop = threading.Event()
        self.codes: dict[str, int] = {}
        self.results = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._flood()
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def _flood(self) -> None:
        peer = RawPeer(self.address)
        try:
            rid = 0
            while not self.stop.is_set():
                for _ in range(64):
                    rid += 1
                    peer.request(rid, "sleep", {"seconds": self.seconds})
                wait = 0.005  # the first read waits a little: the router has work to do
                while (frames := peer.recv(wait)) is not None:
                    wait = 0
                    msg = protocol.decode(frames)
                    if msg.kind is Kind.ERROR:
                        body = msgpack.unpackb(msg.body)
                        code = f"{body['type']}:{body.get('code')}"
                        self.codes[code] = self.codes.get(code, 0) + 1
                    elif msg.kind in FINAL_REPLY_KINDS:
                        self.results += 1
        finally:
            peer.close()


def test_a_flooder_holds_its_limit_and_a_well_behaved_client_is_not_refused(procs):
    pool = _pool(procs, "max_client_inflight = 20")
    flooder = Flooder(pool.address)
    flooder.start()
    try:
        with Client(pool.address, timeout=60) as c:
            pool.wait_for(lambda st: st["router"]["counters"].get("refused_client_limit", 0) > 0,
                          what="the flooder to reach its limit")
            answers = [c.call("echo", i) for i in range(30)]
            st = c.status()
    finally:
        flooder.stop.set()
        flooder.join(30)
    assert flooder.error is None, flooder.error
    assert answers == list(range(30))  # none refused, none failed
    [svc] = st["services"]
    assert svc["queued"] + svc["in_flight"] <= 20 + 1  # the flooder's share, plus one call
    assert flooder.codes.get("BackpressureError:client-limit", 0) > 0
    assert "BackpressureError:service-full" not in flooder.codes


def test_a_flooder_that_disconnects_leaves_no_queued_work_behind(procs):
    pool = _pool(procs, "max_client_inflight = 5000", workers=1)
    peer = RawPeer(pool.address)
    try:
        for rid in range(1, 1001):
            peer.request(rid, "sleep", {"seconds": 0.05})  # 50 s of work on one worker
        pool.wait_for(lambda st: st["services"][0]["queued"] > 900, what="the flood to queue")
    finally:
        peer.close()  # gone without reading a reply: its next one is unroutable
    st = pool.wait_for(lambda st: st["services"][0]["queued"] == 0,
                       what="the gone client's queue to be dropped")
    counters = st["router"]["counters"]
    assert counters["clients_gone"] == 1 and counters["dropped_queued"] > 900
    with Client(pool.address, timeout=30) as c:
        assert c.call("echo", "after") == "after"


def test_a_client_that_never_reads_is_cut_off_and_router_memory_stays_bounded(procs):
    pool = _pool(procs, "max_unread_replies = 8\nslow_client_cutoff = 60",
                 handler="tests.handlers:Big")
    pid = pool.status()["router"]["pid"]
    before = _memory_kib(pid)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)  # takes one reply off the wire, then never reads
    sock.setsockopt(zmq.RCVBUF, 65536)
    sock.connect(pool.address)
    try:
        for rid in range(1, 401):  # 400 MiB of replies asked for
            sock.send_multipart(protocol.encode(
                Kind.REQUEST, rid, {"method": "big"}, msgpack.packb({"n": MiB})))
        st = pool.wait_for(lambda st: st["router"]["counters"].get("clients_cut_off", 0) == 1,
                           what="the reader to be cut off")
        # What it waited for is gone, so no worker keeps working for it.
        st = pool.wait_for(lambda st: st["services"][0]["queued"] == 0
                           and st["services"][0]["in_flight"] == 0, what="its work dropped")
        assert st["router"]["clients_cut_off"] == 1
        with Client(pool.address, timeout=30) as c:
            assert [c.call("big", {"n": 10}) for _ in range(5)] == [b"x" * 10] * 5
        after = _memory_kib(pid)
        counters = pool.status()["router"]["counters"]
    finally:
        sock.close(0)
        ctx.term()
    # At most max_unread_replies replies of 1 MiB wait for it, plus what is on the wire.
    assert after["VmHWM"] - before["VmRSS"] < 64 * 1024, (before, after)
    assert counters["dropped_queued"] + counters["dropped_running"] > 0
    assert counters.get("refused_not_reading", 0) + counters["dropped_queued"] > 300, counters


def test_a_client_that_sends_faster_than_the_router_reads_waits_in_its_own_memory(procs):
    """20,000 STATUS requests of 16 KiB each, sent as fast as ZeroMQ takes them, while the
    router needs about 0.1 ms to answer each: the router holds at most
    ``max_unread_messages`` of them (ZeroMQ stops reading the connection past it), the
    rest wait in the sender, so the router's memory does not grow with the backlog (it
    grew by about 300 MiB when it read without limit). Every request is answered."""
    pool = _pool(procs, "max_client_inflight = 20")
    with Client(pool.address, timeout=30) as c:
        pid = c.status()["router"]["pid"]
    before = _memory_kib(pid)["VmRSS"]
    n, pad = 20_000, b"x" * 16_384
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pool.address)
    sent = answered = 0
    deadline = time.monotonic() + 90
    try:
        while answered < n:
            assert time.monotonic() < deadline, f"{sent} sent, {answered} answered"
            events = sock.poll(100, zmq.POLLIN | (zmq.POLLOUT if sent < n else 0))
            while sent < n and events & zmq.POLLOUT:
                try:
                    sock.send(protocol.encode(Kind.STATUS, sent + 1, None, pad)[0], zmq.NOBLOCK)
                except zmq.Again:
                    break
                sent += 1
            while True:
                try:
                    [head] = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                kind, count = protocol.unpack_header(head)
                answered += count if kind is Kind.BUNDLE else 1
        peak = _memory_kib(pid)["VmHWM"]
    finally:
        sock.close(0)
        ctx.term()
    assert (peak - before) * 1024 < 64 * MiB, f"router RSS {before} KiB -> peak {peak} KiB"
