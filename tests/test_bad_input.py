"""Bytes from the network never hurt the router: every bad input from a client gets a
typed error reply, a bad backend peer is dropped, and everyone else keeps being served."""

from __future__ import annotations

import os
import signal
import time

import msgpack
import pytest
import zmq

from ipc import protocol
from ipc.protocol import Kind
from tests.raw import HDR, RawPeer, wire
from workerpool import Client, PayloadError, ServiceUnavailableError, UnknownMethodError


def _error(peer: RawPeer, timeout: float = 5.0) -> tuple[int, dict]:
    kind, rid, body = peer.reply(timeout)
    assert kind is Kind.ERROR, (kind, body)
    return rid, body


@pytest.mark.parametrize(
    ("frames", "code", "rid"),
    [
        ([b"garbage"], "bad-header", 0),
        ([b"\x00" * 20], "bad-magic", 0),
        (wire([HDR(Kind.REQUEST, 5, version=9), b"", b""]), "bad-version", 5),
        (wire([HDR(Kind.REQUEST, 6, version=2), b"", b""]), "bad-version", 6),
        (wire([HDR(0x7F, 6), b"", b""]), "bad-kind", 6),
        (wire([HDR(Kind.REQUEST, 7), b"\xc1\xc1", b""]), "bad-meta", 7),
        (wire([HDR(Kind.REQUEST, 8), msgpack.packb("not a map"), b""]), "bad-meta", 8),
        (wire([HDR(Kind.REQUEST, 9), msgpack.packb({"method": 5}), b""]), "bad-meta", 9),
        (wire([HDR(Kind.REQUEST, 10), msgpack.packb({"method": "echo", "timeout": -1}), b""]),
         "bad-meta", 10),
        (wire([HDR(Kind.REQUEST, 11), msgpack.packb({"method": "echo", "timeout": "soon"}),
               b""]), "bad-meta", 11),
        (wire([HDR(Kind.REQUEST, 14), msgpack.packb({"method": "echo", "idempotent": "yes"}),
               b""]), "bad-meta", 14),
        (wire([HDR(Kind.READY, 12), b"", b""]), "bad-kind", 12),  # a worker's kind, frontend
        ([HDR(Kind.REQUEST, 13)], "bad-header", 0),  # a version-2 header: too short to read
        ([wire([HDR(Kind.REQUEST, 15), b"", b"\xc0"])[0][:-1]], "bad-length", 15),
        ([HDR(Kind.REQUEST, 16) + b"\x00\x00\x00\x00\xff\xff\xff\xff"], "too-few-frames", 16),
    ],
)
def test_malformed_client_frames_get_protocol_errors(pool, frames, code, rid):
    peer = RawPeer(pool.address)
    try:
        peer.send(frames)
        got_rid, body = _error(peer)
        assert body["type"] == "ProtocolError"
        assert body["code"] == code
        assert got_rid == rid
        peer.request(99, "echo", "still here")
        kind, got, value = peer.reply()
        assert (kind, got, value) == (Kind.RESULT, 99, "still here")
    finally:
        peer.close()


def test_payload_that_is_not_msgpack(pool):
    peer = RawPeer(pool.address)
    try:
        peer.send(protocol.encode(Kind.REQUEST, 1, {"method": "echo"}, b"\xc1not msgpack"))
        _, body = _error(peer)
        assert body["type"] == "PayloadError"
        assert body["worker"].startswith("default/")
    finally:
        peer.close()
    assert pool.status()["router"]["requests"] == 0
    assert sum(w["restarts"] for w in pool.status()["workers"]) == 0


def test_unknown_service_and_method(pool):
    with Client(pool.address, timeout=5) as c:
        with pytest.raises(ServiceUnavailableError, match="unknown service 'nope'"):
            c.call("echo", 1, service="nope")
        with pytest.raises(UnknownMethodError, match="no method 'frobnicate'"):
            c.call("frobnicate", 1)
        with pytest.raises(UnknownMethodError):
            c.call("_private", 1)  # underscored names are never callable
        with pytest.raises(UnknownMethodError):
            c.call("setup", 1)  # lifecycle hooks are not methods
        assert c.call("echo", 1, service="default") == 1


def test_duplicate_request_id_in_flight(pool):
    peer = RawPeer(pool.address)
    try:
        peer.request(1, "sleep", {"seconds": 0.3})
        peer.request(1, "echo", "dup")
        rid, body = _error(peer)
        assert (rid, body["code"]) == (1, "duplicate-id")
        kind, rid, value = peer.reply()
        assert (kind, rid, value) == (Kind.RESULT, 1, {"seconds": 0.3})
    finally:
        peer.close()


def test_oversize_payload(procs):
    pool = procs.pool(workers=1)
    with Client(pool.address, timeout=5, max_message_bytes=1024) as c:
        with pytest.raises(PayloadError, match="over max_message_bytes"):
            c.submit("echo", b"x" * 2048)
        assert c.call("echo", b"x" * 100) == b"x" * 100


def test_frame_over_router_limit_disconnects_only_that_peer(procs):
    pool = procs.pool("--config", procs.config("[router]\nmax_message_bytes = 100000\n"),
                      workers=1)
    peer = RawPeer(pool.address)
    try:
        peer.send(protocol.encode(Kind.REQUEST, 1, {"method": "echo"}, b"\x00" * 200_000))
        assert peer.recv(1.0) is None  # ZeroMQ dropped the connection (MAXMSGSIZE)
    finally:
        peer.close()
    with Client(pool.address, timeout=5) as c:
        assert c.call("echo", "others are fine") == "others are fine"


def test_unpicklable_and_unsupported_payloads_are_refused_locally(pool):
    with Client(pool.address, timeout=5) as c:
        with pytest.raises(PayloadError, match="cannot encode"):
            c.submit("echo", object())
        with pytest.raises(ValueError):
            c.submit("", 1)
        with pytest.raises(ValueError):
            c.submit("echo", 1, timeout=0)


def test_backend_garbage_is_dropped(procs):
    """A rogue peer on the backend cannot register, forge replies or crash the router."""
    pool = procs.pool(workers=1)
    backend = pool.status()["router"]["backend"]
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(backend)
    try:
        rogue.send_multipart([b"junk"])
        rogue.send_multipart([b"\x00" * 20])
        rogue.send_multipart(protocol.encode(Kind.RESULT, 1, None, msgpack.packb("forged")))
        rogue.send_multipart(protocol.encode(Kind.READY, 0, {"slot": "x/0"}))  # missing fields
        rogue.send_multipart(wire([HDR(Kind.SLOT, 0), b"\xc1", b""]))
        rogue.send_multipart(protocol.encode(Kind.REQUEST, 1, {"method": "echo"}))
        time.sleep(0.3)
        with Client(pool.address, timeout=5) as c:
            assert c.call("echo", "ok") == "ok"
        counters = pool.status()["router"]["counters"]
        assert counters["bad_frames_backend"] >= 4
        assert counters["replies_from_unknown_worker"] == 1
        assert len(pool.status()["workers"]) == 1
    finally:
        rogue.close()
        ctx.term()


def test_no_workers_registered(procs):
    front = procs.ipc("front")
    cfg = procs.config("[router]\nregistration_grace = 1.0\n")
    router = procs.spawn(["router", "--config", cfg, "--frontend", front,
                          "--backend", procs.ipc("back")], front, None)
    with Client(front, timeout=10) as c:
        # Within registration_grace a request waits for workers that may be registering;
        # none comes, so it is answered when the grace ends, not at its timeout.
        with pytest.raises(ServiceUnavailableError, match="registration_grace=1s"):
            c.call("echo", 1)
        assert time.monotonic() - router.started < 6
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailableError, match="no workers are registered"):
            c.call("echo", 1)
        assert time.monotonic() - t0 < 2  # an answer, not a wait for the timeout
        st = c.status()
        assert st["services"] == []  # the names requests used were forgotten again


def test_client_that_disconnects_with_requests_in_flight(pool):
    peer = RawPeer(pool.address)
    for i in range(1, 41):
        peer.request(i, "sleep", {"seconds": 0.05})
    pool.wait_for(lambda st: st["router"]["requests"] > 20, what="requests admitted")
    peer.close()  # gone with most requests queued or running
    st = pool.wait_for(lambda st: st["router"]["requests"] == 0, what="records drained")
    assert st["router"]["counters"]["unroutable_replies"] >= 1
    assert st["services"][0]["queued"] == 0
    with Client(pool.address, timeout=5) as c:
        assert c.call("echo", 1) == 1


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_memory_bombs_cost_the_router_nothing_it_keeps(pool):
    """The attacks of a client with no manners: a million empty frames (2 MB sent), a meta
    over the size limit, and metas just under it made of empty arrays (the costliest thing
    to decode), many distinct ones. Each gets a typed error; the router's memory comes back
    within 64 MiB of where it started; a well-behaved client is served throughout."""
    with Client(pool.address) as good:
        router_pid = good.status()["router"]["pid"]
        assert good.call("echo", 1) == 1
        before = _rss_mib(router_pid)
        peer = RawPeer(pool.address)
        try:
            peer.send(wire([HDR(Kind.REQUEST, 21), msgpack.packb({"method": "echo"}), b"",
                            *([b""] * 1_000_000)]))
            rid, body = _error(peer, timeout=60)
            assert (rid, body["code"]) == (21, "too-many-frames")
            assert good.call("echo", 2) == 2
            peer.send(wire([HDR(Kind.REQUEST, 22), b"\x80" * (16 * 2**20), b""]))
            rid, body = _error(peer, timeout=30)
            assert (rid, body["code"]) == (22, "meta-too-large")
            for i in range(8):  # just under the limit, each different: none is cached
                meta = msgpack.packb({"method": "echo", "i": i,
                                      "pad": [[] for _ in range(600_000)]})
                peer.send(wire([HDR(Kind.REQUEST, 100 + i), meta, msgpack.packb(i)]))
            replies = [peer.reply(timeout=60) for _ in range(8)]
            assert sorted(r[1] for r in replies) == list(range(100, 108))
            assert good.call("echo", 3) == 3
            after = _rss_mib(router_pid)
            assert after - before < 64, f"router RSS {before:.0f} -> {after:.0f} MiB"
        finally:
            peer.close()


def test_a_rogue_backend_peer_cannot_take_a_slot_over_or_reshape_the_pool(procs):
    """The attacks of issue 12 on a keyless backend that the supervisor's vouch closes: a
    READY claiming a real slot with a huge incarnation, a forged SLOT ``failed``, a DRAIN,
    and heartbeats in a real worker's name (router.vouching)."""
    pool = procs.pool(workers=1)
    st = pool.status()
    backend = st["router"]["backend"]
    real = st["workers"][0]
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(backend)
    try:
        slot, inc = real["id"], real["incarnation"]
        rogue.send_multipart(protocol.encode(Kind.READY, 0, {
            "slot": slot, "incarnation": 2**62, "service": "default", "capacity": 64,
            "pid": 1, "methods": ["echo"]}))
        rogue.send_multipart(protocol.encode(Kind.READY, 0, {
            "slot": "default/99", "incarnation": 1, "service": "default", "capacity": 64,
            "pid": 1, "methods": ["echo"]}))
        rogue.send_multipart(protocol.encode(Kind.SLOT, 0, {
            "slot": slot, "service": "default", "incarnation": inc, "event": "failed",
            "reason": "forged"}))
        rogue.send_multipart(protocol.encode(Kind.DRAIN, 0, {}))
        rogue.send_multipart(protocol.encode(Kind.HEARTBEAT, 0, {"of": f"{slot}#{inc}".encode()}))
        time.sleep(0.3)
        with Client(pool.address, timeout=10) as c:
            assert [c.call("echo", i) for i in range(20)] == list(range(20))
        st = pool.status()
        assert [w["id"] for w in st["workers"]] == [slot]
        assert st["workers"][0]["state"] in ("ready", "busy") and not st["router"]["draining"]
        counters = st["router"]["counters"]
        assert counters["slot_events_not_owner"] == 1 and counters["drains_refused"] == 1
        assert counters["heartbeats_refused"] == 1
        # The real worker's respawn is not refused as stale.
        os.kill(real["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = pool.status()["workers"][0]
            if row["incarnation"] == inc + 1 and row["state"] == "ready":
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the respawn did not register: {row}")
        with Client(pool.address, timeout=10) as c:
            assert c.call("echo", "after") == "after"
    finally:
        rogue.close()
        ctx.term()
