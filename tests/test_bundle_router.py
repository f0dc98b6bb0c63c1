"""BUNDLE in the router's core (docs/protocol.md 2.6), with a fake outbox and clock: bundles
taken in on both sockets, each message as if alone; what one batch has for one peer sent as
one message; failed sends found at the end of a batch keep the meaning they have at once."""

from __future__ import annotations

from collections import Counter

import msgpack
import pytest

from ipc import protocol
from ipc.curve import Role
from ipc.errors import BackpressureError, PermissionDeniedError, ProtocolError
from ipc.lifecycle import AdminOp
from ipc.protocol import Kind
from router.clients import Delivery
from router.outgoing import Outgoing
from tests.router_harness import Harness

C = b"client-1"


def head(kind: int, rid: int, meta: dict | bytes | None = None, value: object = None) -> bytes:
    """The one frame of a message (``kind`` may be a byte no kind has)."""
    body = b"" if value is None else msgpack.packb(value)
    meta_frame = meta if isinstance(meta, bytes) else protocol.pack_meta(meta)
    return protocol.HEADER.pack(b"WP", protocol.VERSION, kind, rid, len(meta_frame),
                                len(body)) + meta_frame + body


def req(rid: int, method: str = "echo", value: object = None, **meta: object) -> bytes:
    return head(Kind.REQUEST, rid, {"method": method, **meta}, value)


def bundle(*heads: bytes) -> bytes:
    [frame] = protocol.pack(list(heads))
    assert protocol.unpack_header(frame) == (Kind.BUNDLE, len(heads))
    return frame


def raw_bundle(count: int, body: bytes, meta: bytes = b"") -> bytes:
    """A BUNDLE whose outer header is right for its bytes, whatever its body holds."""
    return protocol.HEADER.pack(b"WP", protocol.VERSION, Kind.BUNDLE, count, len(meta),
                                len(body)) + meta + body


def pool(workers: int = 1, capacity: int = 10, **config: object) -> tuple[Harness, list[bytes]]:
    h = Harness(**config)
    h.hello(workers=workers)
    idents = [h.ready(f"default/{i}", capacity=capacity) for i in range(workers)]
    h.out.take()
    h.out.wire.clear()
    return h, idents


def wire_to(h: Harness, peer: bytes) -> list[int]:
    """How many messages each wire message to ``peer`` held."""
    return [n for _, p, n in h.out.wire if p == peer]


def answers(h: Harness, client: bytes = C) -> list[tuple[Kind, int]]:
    return [(s.kind, s.req_id) for s in h.out.to(client)]


# -- taking bundles in ---------------------------------------------------------------------
def test_a_bundle_of_requests_is_dispatched_and_answered_as_bundles():
    h, [w] = pool()
    h.core.on_frontend([C, bundle(*[req(i, value=i) for i in range(1, 11)])])
    rids = h.dispatched_to(w)
    assert len(set(rids)) == 10 and wire_to(h, w) == [10]
    h.core.on_backend([w, bundle(*[head(Kind.RESULT, rid, None, n)
                                   for n, rid in enumerate(rids, 1)])])
    assert wire_to(h, C) == [10]
    assert [(s.kind, s.req_id, s.body) for s in h.out.to(C)] == \
        [(Kind.RESULT, i, i) for i in range(1, 11)]
    assert not h.core.requests.records
    counters = h.core.status()["router"]["counters"]
    assert counters["bundles_received"] == 2 and counters["bundles_sent"] == 2


def test_a_lone_message_goes_as_itself_in_a_batch_or_not():
    h, [w] = pool()
    h.request(C, 1)
    with h.core.batch():
        h.request(C, 2)
        assert h.dispatched_to(w)[1:] == []  # held until the batch ends
    assert wire_to(h, w) == [1, 1] and "bundles_sent" not in h.core.stats


def test_each_message_of_a_bundle_is_handled_as_if_alone():
    h, [w] = pool()
    ping = head(Kind.HEARTBEAT, 0, {"held": [1, 7]})
    h.core.on_frontend([C, bundle(req(1), req(2, priority="high"), head(0x7F, 4, None),
                                  head(Kind.CANCEL, 1), head(Kind.STATUS, 3), ping,
                                  head(Kind.RESULT, 5), req(0))])
    assert answers(h) == [(Kind.ERROR, 2), (Kind.ERROR, 4), (Kind.RESULT, 3),
                          (Kind.HEARTBEAT, 0), (Kind.ERROR, 5), (Kind.ERROR, 0)]
    codes = [e.code for e in h.out.errors_to(C)]
    assert codes == ["bad-meta", "bad-kind", "bad-kind", "bad-request-id"]
    [pong] = [s.body for s in h.out.to(C) if s.kind is Kind.HEARTBEAT]
    assert pong["unknown"] == [1, 7]  # cancelled before the ping: no longer held
    [rid] = h.dispatched_to(w)
    assert [(s.kind, s.req_id) for s in h.out.to(w)] == [(Kind.REQUEST, rid), (Kind.CANCEL, rid)]
    assert wire_to(h, w) == [2] and wire_to(h, C) == [6]
    # Not counted: bad-meta for a REQUEST's fields, and bad-request-id (protocol.md 6.1).
    assert h.core.stats["bad_frames_frontend"] == 2


def _malformed() -> list[tuple[str, bytes]]:
    one = req(1)
    return [
        ("no messages", raw_bundle(0, one)),
        ("257 messages", raw_bundle(protocol.BUNDLE_MAX + 1, one * (protocol.BUNDLE_MAX + 1))),
        ("count mismatch", raw_bundle(3, one + one)),
        ("a meta", raw_bundle(1, one, meta=b"\x80")),
        ("shorter than a header", raw_bundle(2, one + one[:10])),
        ("runs past the end", raw_bundle(2, one + one[:-1])),
        ("nested", raw_bundle(2, one + bundle(req(2), req(3)))),
        ("body in frame 1", raw_bundle(2, one + protocol.HEADER.pack(
            b"WP", protocol.VERSION, Kind.REQUEST, 2, 0, protocol.BODY_IN_FRAME))),
        ("bytes left over", raw_bundle(1, one + b"\x00\x01")),
    ]


@pytest.mark.parametrize(("why", "frame"), _malformed(), ids=[w for w, _ in _malformed()])
def test_a_malformed_bundle_is_refused_whole_under_id_0(why, frame):
    h, [w] = pool()
    h.core.on_frontend([C, frame])
    assert answers(h) == [(Kind.ERROR, 0)]
    [err] = h.out.errors_to(C)
    assert isinstance(err, ProtocolError) and err.code == "bad-bundle"
    assert h.dispatched_to(w) == [] and not h.core.requests.records
    assert h.core.stats["bad_frames_frontend"] == 1 and "bundles_received" not in h.core.stats


def test_each_message_of_a_bundle_keeps_the_connections_role():
    h, [w] = pool()
    drain = head(Kind.ADMIN, 3, {"op": AdminOp.DRAIN, "worker": "default/0"})
    h.core.on_frontend([C, bundle(req(1), drain, head(Kind.STATUS, 4))], Role.CLIENT)
    assert answers(h) == [(Kind.ERROR, 3), (Kind.RESULT, 4)]
    [err] = h.out.errors_to(C)
    assert isinstance(err, PermissionDeniedError) and err.code == "role"
    assert len(h.dispatched_to(w)) == 1 and h.core.stats["permission_denied"] == 1
    h.out.take()
    h.core.on_frontend([C, bundle(req(5), head(Kind.CANCEL, 1), head(Kind.STATUS, 6))], None)
    assert answers(h) == [(Kind.ERROR, 5), (Kind.ERROR, 6)]  # a CANCEL is never answered
    assert {e.code for e in h.out.errors_to(C)} == {"revoked"}
    assert h.dispatched_to(w) == [] and h.core.requests.held_by(C) == 1
    h.out.take()
    h.core.on_frontend([C, raw_bundle(2, req(7))], None)
    assert answers(h) == [(Kind.ERROR, 0)]


def test_max_client_inflight_counts_each_request_of_a_bundle():
    h, [w] = pool(max_client_inflight=3)
    h.core.on_frontend([C, bundle(*[req(i) for i in range(1, 6)])])
    assert answers(h) == [(Kind.ERROR, 4), (Kind.ERROR, 5)]
    assert all(isinstance(e, BackpressureError) and e.code == "client-limit"
               for e in h.out.errors_to(C))
    assert len(h.dispatched_to(w)) == 3 and h.core.stats["refused_client_limit"] == 2


# -- the backend -------------------------------------------------------------------------
def test_a_workers_bundle_of_replies_and_heartbeats_is_taken_apart():
    h, [w] = pool()
    for i in (1, 2, 3):
        h.request(C, i)
    r1, r2, r3 = h.dispatched_to(w)
    h.core.on_backend([w, bundle(head(Kind.STARTED, 0, {"ids": [r1, r2]}),
                                 head(Kind.RESULT, r1, None, "a"),
                                 head(Kind.ERROR, r2, None, {"type": "ValueError",
                                                              "message": "no"}))])
    assert answers(h) == [(Kind.RESULT, 1), (Kind.ERROR, 2)] and wire_to(h, C) == [2]
    h.clock.advance(1.0)
    h.core.on_backend([w + protocol.HEARTBEAT_SUFFIX, bundle(
        head(Kind.HEARTBEAT, 0, {"of": w}), head(Kind.HEARTBEAT, 0, {"of": w, "busy": 0.5}))])
    assert h.core.registry.conns[w].last_beat == h.clock.now
    h.core.on_backend([b"sup", bundle(head(Kind.HEARTBEAT, 0, {"ping": 1}),
                                      head(Kind.HEARTBEAT, 0, {"ping": 2}))])
    assert [s.meta["pong"] for s in h.out.to(b"sup")] == [1, 2] and wire_to(h, b"sup") == [2]
    assert h.core.stats["bundles_received"] == 3 and "bad_frames_backend" not in h.core.stats
    h.core.on_backend([w, raw_bundle(2, head(Kind.RESULT, r3, None, "c"))])
    assert h.core.stats["bad_frames_backend"] == 1 and r3 in h.core.registry.conns[w].in_flight
    assert len(h.out.to(C)) == 2


# -- failed sends found at the end of a batch -------------------------------------------------
def test_requests_pending_for_a_worker_found_gone_are_requeued_once_each():
    h, [a, b] = pool(workers=2, capacity=3)
    h.out.unreachable.add(a)  # its process is gone; no death notice yet
    with h.core.batch():
        for i in (1, 2, 3, 4):
            h.request(C, i)
        h.client_msg(C, Kind.CANCEL, 3)  # answered meanwhile: let go, not requeued
        assert h.dispatched_to(a) == [] and h.dispatched_to(b) == []
    stats = h.core.stats
    assert stats["dispatch_unroutable"] == 2 and stats["unroutable_backend"] == 1  # the CANCEL
    assert [c.slot.id for c in h.core.services["default"].conns] == ["default/1"]
    sent = h.dispatched_to(b)
    # 1 joined what waited for default/1 (2 and 4) in the same flush.
    assert len(sent) == len(set(sent)) == 3 and wire_to(h, b) == [3]
    for rid in sent:
        h.reply(b, rid, rid)
    assert sorted(rid for kind, rid in answers(h) if kind is Kind.RESULT) == [1, 2, 4]
    assert not h.core.requests.records and h.core.requests.held_by(C) == 0
    assert h.core.registry.conns[a].in_flight == {}


def test_a_client_found_gone_at_flush_has_its_requests_dropped():
    h, [w0, w1] = pool(workers=2, capacity=1)
    for i in (1, 2, 3, 4):
        h.request(C, i)
    [r1], [r2] = h.dispatched_to(w0), h.dispatched_to(w1)
    h.out.unreachable.add(C)
    with h.core.batch():
        h.reply(w0, r1, "x")  # its RESULT waits for the end of the batch; 3 goes to w0
    [_, r3] = h.dispatched_to(w0)
    stats = h.core.stats
    assert (stats["unroutable_replies"], stats["clients_gone"], stats["dropped_running"],
            stats["dropped_queued"]) == (1, 1, 2, 1)
    cancels = {(s.peer, s.req_id) for s in h.out.sent if s.kind is Kind.CANCEL}
    assert cancels == {(w0, r3), (w1, r2)}
    assert h.core.requests.held_by(C) == 0


def test_a_client_found_not_reading_at_flush_is_cut_off_and_its_stream_not_overrun():
    h, [w0, w1] = pool(workers=2, capacity=1)
    h.request(C, 1)
    h.request(C, 2)  # a stream
    [r1], [r2] = h.dispatched_to(w0), h.dispatched_to(w1)
    h.out.not_reading.add(C)
    with h.core.batch():
        h.reply(w0, r1, "x")
        # The stream's item goes at once, after the RESULT, whose send finds the queue full.
        h.reply(w1, r2, "item", kind=Kind.PARTIAL)
    stats = h.core.stats
    assert stats["clients_cut_off"] == 1 and stats["unroutable_replies"] == 1
    assert "streams_overrun" not in stats and not h.core.clients.owed
    assert [(s.kind, s.req_id) for s in h.out.to(w1)][-1] == (Kind.CANCEL, r2)
    h.out.not_reading.clear()
    h.request(C, 3)
    assert [e.code for e in h.out.errors_to(C)] == ["not-reading"]


def test_a_stream_item_and_a_multi_frame_message_go_after_what_waits_for_their_peer():
    h, [w] = pool(capacity=2)
    h.request(C, 1)
    h.request(C, 2)
    r1, r2 = h.dispatched_to(w)
    h.out.wire.clear()
    with h.core.batch():
        h.reply(w, r1, "done")
        assert answers(h) == []
        h.reply(w, r2, "item", kind=Kind.PARTIAL)
        assert answers(h) == [(Kind.RESULT, 1), (Kind.PARTIAL, 2)]
        h.reply(w, r2, None, kind=Kind.END)
        h.request(C, 3)
        big = protocol.encode(Kind.REQUEST, 4, {"method": "echo"},
                              msgpack.packb(bytes(protocol.BODY_FRAME_MIN)))
        assert len(big) == 2
        h.core.on_frontend([C, *big])
        assert len(h.dispatched_to(w)) == 4  # 3, then 4 at once behind it
    assert answers(h)[2:] == [(Kind.END, 2)]
    assert wire_to(h, w) == [1, 1] and wire_to(h, C) == [1, 1, 1]


def test_what_a_tick_sends_one_client_goes_as_one_message():
    h, _ = pool(capacity=1)
    for i in (1, 2, 3):
        h.request(C, i, timeout=1.0)
    h.tick(2.0)
    assert sorted(rid for _, rid in answers(h)) == [1, 2, 3] and wire_to(h, C) == [3]


# -- Outgoing alone --------------------------------------------------------------------------
class _Wire:
    """An outbox that takes ``room`` messages, then answers ``then``."""

    def __init__(self, room: int, then: Delivery) -> None:
        self.room = room
        self.then = then
        self.frames: list[bytes] = []

    def to_client(self, client: bytes, frames: list) -> Delivery:
        if len(self.frames) >= self.room:
            return self.then
        self.frames.extend(frames)
        return Delivery.SENT

    def to_backend(self, ident: bytes, frames: list) -> bool:
        return bool(self.to_client(ident, frames))


def test_outgoing_packs_up_to_bundle_max_and_fails_the_rest_after_a_failed_send():
    failed = []
    stats: Counter[str] = Counter()
    out = Outgoing(_Wire(1, Delivery.FULL), stats, lambda *args: failed.append(args))
    heads = [head(Kind.RESULT, i, None, i) for i in range(1, 301)]
    with out.batch():
        for h in heads:
            assert out.to_client(C, [h]) is None
        assert out.pending() == 300
    assert [protocol.unbundle(f) for f in out.out.frames] == [heads[:protocol.BUNDLE_MAX]]
    [(to_client, peer, tags, why)] = failed
    assert (to_client, peer, len(tags), why) == (True, C, 300 - protocol.BUNDLE_MAX,
                                                  Delivery.FULL)
    assert stats["bundles_sent"] == 1 and out.pending() == 0


def test_outgoing_sends_at_once_outside_a_batch_and_keeps_each_peers_order():
    failed = []
    out = Outgoing(_Wire(100, Delivery.GONE), Counter(),
                   lambda *args: failed.append(args))
    one, two, three = (head(Kind.CANCEL, i) for i in (1, 2, 3))
    assert out.to_backend(b"w", [one], "tag") is Delivery.SENT
    with out.batch():
        with out.batch():  # nested: only the outermost sends
            out.to_backend(b"w", [two], "tag")
        assert out.pending() == 1
        assert out.to_backend(b"w", [three, b"frame 1"], now=True) is Delivery.SENT
        assert out.out.frames == [one, two, three, b"frame 1"]
    assert not failed


def test_outgoing_tells_which_backend_messages_failed():
    failed = []
    out = Outgoing(_Wire(0, Delivery.GONE), Counter(),
                   lambda *args: failed.append(args))
    with out.batch():
        out.to_backend(b"w", [head(Kind.REQUEST, 1)], "rec-1")
        out.to_backend(b"w", [head(Kind.CANCEL, 2)])
    assert failed == [(False, b"w", ["rec-1", None], Delivery.GONE)]



def test_a_bundle_over_the_frame_or_byte_limit_is_refused_under_id_0_not_its_count():
    from ipc.transport import Truncated

    h, [w] = pool(max_buffer_frames=2, max_message_bytes=1024)
    frames = Truncated([C, bundle(req(1), req(2), req(3)), b"", b""])
    frames.dropped = 5
    h.core.on_frontend(frames)
    h.core.on_frontend([C, bundle(req(4), req(5)), bytes(2000)])
    errors = [(s.kind, s.req_id, s.body["code"]) for s in h.out.to(C)]
    assert errors == [(Kind.ERROR, 0, "too-many-frames"), (Kind.ERROR, 0, "too-large")]
    assert not h.dispatched_to(w)  # nothing in either was acted on
