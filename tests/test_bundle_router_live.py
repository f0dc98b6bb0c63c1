"""BUNDLE against a real pool (docs/protocol.md 2.6): a raw DEALER sends bundles to the
router's frontend and backend, and reads replies that may come bundled (``RawPeer``
hands them out one at a time and counts wire messages)."""

from __future__ import annotations

import os
import signal
import time

import msgpack

from ipc import protocol
from ipc.protocol import Kind
from tests.raw import HDR, RawPeer


def _req(rid: int, method: str = "echo", value: object = None, **meta: object) -> bytes:
    [head] = protocol.encode(Kind.REQUEST, rid, {"method": method, **meta}, msgpack.packb(value))
    return head


def _msg(kind: Kind, rid: int, meta: dict | None = None) -> bytes:
    [head] = protocol.encode(kind, rid, meta)
    return head


def _bundle(*heads: bytes) -> bytes:
    [frame] = protocol.pack(list(heads))
    return frame


def _messages(peer: RawPeer, settle: float = 0.5) -> list[tuple[Kind, int, object]]:
    """Every message that arrives until ``settle`` seconds pass without one."""
    out = []
    while (frames := peer.recv(settle)) is not None:
        msg = protocol.decode(frames)
        out.append((msg.kind, msg.req_id, msgpack.unpackb(msg.body) if msg.body else None))
    return out


def _counters(pool) -> dict:
    return pool.status()["router"]["counters"]


def test_client_bundles_are_taken_apart_and_replies_come_bundled(procs):
    pool = procs.pool("--prefetch", "8", workers=2)
    peer = RawPeer(pool.address)
    try:
        n = protocol.BUNDLE_MAX
        peer.send([_bundle(*[_req(i, value=i) for i in range(1, n + 1)])])
        peer.collect(range(1, n + 1))
        assert {rid: finals for rid, finals in peer.finals.items()} == \
            {i: [(Kind.RESULT, i)] for i in range(1, n + 1)}
        assert peer.received < n, "no reply came bundled"

        # Each message as if alone: a good request, a bad one, a cancelled one, a STATUS,
        # a ping, and a kind clients may not send, each answered under its own id.
        peer.received = 0
        peer.send([_bundle(_req(1001, value="a"), _req(1002, timeout=-1),
                           _req(1003, "sleep", {"seconds": 1.0}), _msg(Kind.CANCEL, 1003),
                           _msg(Kind.STATUS, 1004), _msg(Kind.HEARTBEAT, 0, {"held": [1003, 7]}),
                           _msg(Kind.RESULT, 1005))])
        got = {(kind, rid): body for kind, rid, body in _messages(peer, 1.5)}
        assert set(got) == {(Kind.RESULT, 1001), (Kind.ERROR, 1002), (Kind.RESULT, 1004),
                            (Kind.HEARTBEAT, 0), (Kind.ERROR, 1005)}, got
        assert got[(Kind.RESULT, 1001)] == "a"
        assert (got[(Kind.ERROR, 1002)]["code"], got[(Kind.ERROR, 1005)]["code"]) == \
            ("bad-meta", "bad-kind")
        assert "counters" in got[(Kind.RESULT, 1004)]["router"]
        assert got[(Kind.HEARTBEAT, 0)]["unknown"] == [1003, 7]

        # Malformed (it says 3 messages and holds 2): one ERROR under id 0, nothing run.
        body = _req(2001) + _req(2002)
        peer.send([protocol.HEADER.pack(b"WP", protocol.VERSION, Kind.BUNDLE, 3, 0, len(body))
                   + body])
        [(kind, rid, err)] = _messages(peer)
        assert (kind, rid, err["type"], err["code"]) == (Kind.ERROR, 0, "ProtocolError",
                                                          "bad-bundle")
        counters = _counters(pool)
        # At least the two sent above: the workers bundle their replies too.
        assert counters["bundles_received"] >= 2 and counters["bundles_sent"] > 0
    finally:
        peer.close()


def test_bundles_on_the_backend_and_max_client_inflight_per_request(procs):
    pool = procs.pool("--config", procs.config("[router]\nmax_client_inflight = 4\n"),
                      workers=1)
    peer = RawPeer(pool.address)
    backend = RawPeer(pool.status()["router"]["backend"])
    try:
        peer.send([_bundle(*[_req(i, "sleep", {"seconds": 0.2, "i": i}) for i in range(1, 7)])])
        peer.collect(range(1, 7))
        assert sorted(peer.finals) == list(range(1, 7))
        assert [kind for kind, _ in peer.finals[1] + peer.finals[4]] == [Kind.RESULT] * 2
        refused = [body for i in (5, 6) for kind, body in peer.finals[i]]
        assert [(e["type"], e["code"]) for e in refused] == [("BackpressureError",
                                                              "client-limit")] * 2

        backend.send([_bundle(_msg(Kind.HEARTBEAT, 0, {"ping": 1}),
                              _msg(Kind.HEARTBEAT, 0, {"ping": 2}))])
        pongs = [protocol.decode(backend.recv()).meta["pong"] for _ in range(2)]
        assert pongs == [1, 2]
        backend.send([HDR(Kind.BUNDLE, 2) + b"\x00\x00\x00\x00\x00\x00\x00\x00"])  # empty
        time.sleep(0.2)
        counters = _counters(pool)
        assert counters["bad_frames_backend"] == 1 and counters["bundles_received"] >= 2
    finally:
        peer.close()
        backend.close()


def test_a_worker_killed_under_a_bundle_loses_and_repeats_nothing(procs):
    pool = procs.pool("--prefetch", "8", workers=2)
    peer = RawPeer(pool.address)
    try:
        victim = next(w["pid"] for w in pool.status()["workers"] if w["id"] == "default/0")
        os.kill(victim, signal.SIGKILL)
        ids = range(1, 201)
        for first in (1, 51, 101, 151):  # the last while the router learns of the death
            peer.send([_bundle(*[_req(i, value=i, idempotent=True)
                                 for i in range(first, first + 50)])])
        peer.collect(ids, timeout=30)
        assert {rid: finals for rid, finals in peer.finals.items()} == \
            {i: [(Kind.RESULT, i)] for i in ids}
        print(f"\nworker killed under bundles: counters {_counters(pool)}")
    finally:
        peer.close()


def test_a_client_gone_with_replies_pending_has_its_requests_dropped(procs):
    pool = procs.pool(workers=1)
    peer = RawPeer(pool.address)
    peer.send([_bundle(*[_req(i, "sleep", {"seconds": 0.05}) for i in range(1, 41)])])
    time.sleep(0.1)
    peer.close()
    deadline = time.monotonic() + 10
    while (st := pool.status()["router"])["requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    counters = st["counters"]
    assert st["requests"] == 0 and counters["clients_gone"] == 1, st
    assert counters["dropped_queued"] > 0 and counters["unroutable_replies"] >= 1
