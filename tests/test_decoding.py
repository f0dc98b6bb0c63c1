"""The cost of decoding what a peer sends: bounded by a small multiple of its size, on the
router and on the worker, and nothing a peer can make large is kept."""

from __future__ import annotations

import msgpack
import pytest

from ipc import protocol
from ipc.protocol import FrameError, Kind
from tests.router_harness import Harness

C = b"client-1"


_META_LIMIT = protocol.MAX_META_BYTES - 64  # just under the default max_meta_bytes


def _worst_metas() -> dict[str, bytes]:
    """Metas just under the limit made of what costs most to decode, per kind of value."""
    n = _META_LIMIT
    two_chars = [chr(97 + i % 26) + chr(97 + i // 26 % 26) for i in range(n // 3)]
    return {
        "empty arrays": msgpack.packb({"pad": [[] for _ in range(n)]})[:n],
        "empty maps": msgpack.packb({"pad": [{} for _ in range(n)]})[:n],
        "nested arrays": msgpack.packb({"pad": [[[[]]] for _ in range(n // 4)]}),
        "2-char strings": msgpack.packb({"pad": two_chars}),
        "negative ints": msgpack.packb({"pad": [-100] * (n // 2)}),
        "floats": msgpack.packb({"pad": [1.5] * (n // 9)}),
        "ext types": msgpack.packb({"pad": [msgpack.ExtType(5, b"a")] * (n // 3)}),
        "maps of 2-char keys": msgpack.packb({"pad": [
            {two_chars[j]: None for j in range(i, i + 14)} for i in range(n // 58)]}),
    }


@pytest.mark.parametrize("name", list(_worst_metas()))
def test_decoding_a_meta_costs_a_small_multiple_of_its_size(name):
    """A map of empty arrays once cost 64 times its size to decode (74 for maps): a 640 KiB
    meta, 45 MiB. Whatever a meta holds, decoding it now costs at most ~21 times its size,
    refused or not."""
    import tracemalloc

    frame = _worst_metas()[name]
    assert len(frame) <= protocol.MAX_META_BYTES
    tracemalloc.start()
    try:
        try:
            meta = protocol.unpack_meta(frame, 1, protocol.MAX_META_BYTES)
        except FrameError as exc:
            assert exc.code == "bad-meta" and exc.req_id == 1
            meta = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del meta
    assert peak <= 21 * len(frame), f"{name}: {peak / len(frame):.1f} bytes per byte"


def test_real_metas_are_within_the_container_bound():
    ping = protocol.pack_meta({"held": list(range(2**63, 2**63 + 65_536))})
    assert len(ping) <= protocol.MAX_META_BYTES
    assert len(protocol.unpack_meta(ping, None, protocol.MAX_META_BYTES)["held"]) == 65_536
    slots = [{"slot": f"s{i % 4}/{i}", "service": f"s{i % 4}", "device": "cpu"}
             for i in range(2000)]
    services = [{"name": f"s{i}", "workers": 500, "spares": 0, "policy": "round_robin"}
                for i in range(4)]
    hello = protocol.pack_meta({"pid": 1, "host": "h", "services": services, "slots": slots})
    assert len(protocol.unpack_meta(hello)["slots"]) == 2000
    small = protocol.pack_meta({"a": [[] for _ in range(protocol.META_CONTAINERS - 1)]})
    assert len(protocol.unpack_meta(small)["a"]) == protocol.META_CONTAINERS - 1


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"a": [[] for _ in range(5000)]}, "maps and arrays"),
        ({"a": [{} for _ in range(5000)]}, "maps and arrays"),
        ({"method": "echo", "x": msgpack.ExtType(1, b"")}, "extension type 1"),
    ],
)
def test_metas_beyond_the_bounds_are_bad_meta(meta, match):
    with pytest.raises(FrameError, match=match) as info:
        protocol.decode(protocol.encode(Kind.REQUEST, 3, msgpack.packb(meta)),
                        protocol.MetaCache())
    assert (info.value.code, info.value.req_id) == ("bad-meta", 3)


def test_a_peer_filling_the_meta_cache_makes_it_keep_little():
    """Each cached frame is at most CACHED_META_BYTES, and there are at most ``size``: what a
    client that invents distinct worst-case metas makes the cache keep stays small."""
    import tracemalloc

    cache = protocol.MetaCache()
    keys = [chr(0x100 + i) + chr(0x100 + j) for i in range(64) for j in range(64)]
    tracemalloc.start()
    try:
        for i in range(3 * 512):
            frame = msgpack.packb({k: -100 - i % 20 for k in keys[i % 64 * 34:][:34]}
                                  | {"i": i})
            assert len(frame) <= protocol.CACHED_META_BYTES
            cache.unpack(frame)
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(cache._maps) <= 512
    assert kept < 4 * 2**20, f"the cache keeps {kept / 2**20:.1f} MiB"


def test_request_metas_are_bounded_tighter_than_pings():
    """Only a ping's list of held ids needs max_meta_bytes: a REQUEST (CANCEL, STATUS,
    ADMIN) meta over MAX_REQUEST_META_BYTES is refused before it is decoded or queued."""
    h = Harness()
    h.hello(workers=1)
    h.ready("default/0")
    pad = "x" * protocol.MAX_REQUEST_META_BYTES
    for kind, rid in ((Kind.REQUEST, 5), (Kind.STATUS, 6), (Kind.ADMIN, 7), (Kind.CANCEL, 8)):
        h.core.on_frontend([C, *protocol.encode(
            kind, rid, msgpack.packb({"method": "echo", "op": "scale", "pad": pad}))])
    errors = [(s.req_id, s.body["code"]) for s in h.out.take() if s.kind is Kind.ERROR]
    assert errors == [(5, "meta-too-large"), (6, "meta-too-large"), (7, "meta-too-large"),
                      (8, "meta-too-large")]
    assert not h.core.requests.records
    held = list(range(1, 60_001))
    h.core.on_frontend([C, *protocol.encode(Kind.HEARTBEAT, 9, {"held": held})])
    [pong] = h.out.take()
    assert pong.kind is Kind.HEARTBEAT and pong.body["unknown"] == held
    h.request(C, 10, "echo", 1, pad="x" * (protocol.MAX_REQUEST_META_BYTES - 100))
    assert h.core.requests.records  # just under: admitted


def test_the_worker_applies_the_same_bounds():
    """The worker decodes a forwarded meta again, with the same limits (its MetaCache)."""
    cache = protocol.MetaCache()
    frames = protocol.encode(Kind.REQUEST, 3, {"method": "echo",
                                               "pad": "x" * protocol.MAX_REQUEST_META_BYTES})
    with pytest.raises(FrameError) as info:
        protocol.decode(frames, cache)
    assert info.value.code == "meta-too-large"
    assert protocol.decode(protocol.encode(Kind.HEARTBEAT, 0, {"ping": "x" * 100_000}),
                           cache).meta["ping"]


def test_a_message_over_max_message_bytes_in_all_is_refused():
    """ZeroMQ bounds each frame (MAXMSGSIZE), not their sum: many large buffer frames are
    refused by the router as a whole, before anything is queued or forwarded."""
    h = Harness(max_message_bytes=4096)
    h.hello(workers=1)
    w = h.ready("default/0")
    frames = protocol.encode(Kind.REQUEST, 4, {"method": "echo"}, b"\xc0", [b"x" * 3000] * 2)
    h.core.on_frontend([C, *frames])
    [err] = h.out.errors_to(C)
    assert (err.code, h.out.to(C)[0].req_id) == ("too-large", 4)
    assert "6001 bytes" in err.message and "max_message_bytes=4096" in err.message
    assert not h.core.requests.records and not h.dispatched_to(w)
    h.core.on_frontend([C, *protocol.encode(Kind.REQUEST, 5, {"method": "echo"}, b"\xc0",
                                            [b"x" * 4000])])
    assert h.dispatched_to(w)  # just under: forwarded


def test_a_worker_reply_over_max_message_bytes_in_all_ends_its_request():
    h = Harness(max_message_bytes=4096)
    h.hello(workers=1)
    w = h.ready("default/0")
    h.request(C, 1)
    [rid] = h.dispatched_to(w)
    h.core.on_backend([w, *protocol.encode(Kind.RESULT, rid, b"", b"\xc0", [b"y" * 3000] * 2)])
    [err] = h.out.errors_to(C)
    assert err.type == "PayloadError" and "6001 bytes" in err.message
    assert "max_message_bytes=4096" in err.message
    assert not h.core.requests.records
    assert h.core.stats["bad_frames_backend"] == 1


def test_large_metas_are_decoded_at_most_once_per_interval_per_connection():
    """Receiving a meta just under max_meta_bytes takes microseconds, decoding it
    milliseconds: a client sending them back to back is refused undecoded (meta-too-often)
    but for one per LARGE_META_INTERVAL, so the router keeps up and its backlog stays
    small. A Python client's ping (at most one a second) is never refused."""
    from router.core import LARGE_META, LARGE_META_INTERVAL

    h = Harness()
    ping = protocol.pack_meta({"held": list(range(2**40, 2**40 + 20_000))})
    assert LARGE_META < len(ping) <= protocol.MAX_META_BYTES

    def send(client: bytes, rid: int, meta: bytes = ping) -> tuple[Kind, int, object]:
        h.core.on_frontend([client, *protocol.encode(Kind.HEARTBEAT, rid, meta)])
        [reply] = h.out.take()
        return reply.kind, reply.req_id, (reply.body or {}).get("code")

    assert send(C, 1) == (Kind.HEARTBEAT, 1, None)
    assert send(C, 2) == (Kind.ERROR, 2, "meta-too-often")
    assert send(b"other", 3) == (Kind.HEARTBEAT, 3, None)  # per connection
    assert send(C, 4, b"\x80") == (Kind.HEARTBEAT, 4, None)  # small metas: never limited
    too_large = msgpack.packb({"pad": "x" * protocol.MAX_META_BYTES})
    assert send(C, 5, too_large) == (Kind.ERROR, 5, "meta-too-large")  # its own check first
    h.clock.advance(LARGE_META_INTERVAL)
    assert send(C, 6) == (Kind.HEARTBEAT, 6, None)
    assert h.core.stats["bad_frames_frontend"] == 2


def test_large_backend_metas_are_decoded_only_for_peers_that_registered(monkeypatch):
    """Decoding a meta over LARGE_META takes milliseconds. On the backend only a worker or
    a supervisor that registered may make the router spend them (a STARTED naming a large
    batch, a supervisor's HELLO of many slots); anyone else's is dropped undecoded."""
    from router.core import LARGE_META

    h = Harness()
    h.hello(workers=1, max_inflight=4)
    a = h.ready("default/0", capacity=4)
    h.request(C, 1)
    [rid] = h.dispatched_to(a)
    h.out.take()
    pad = "x" * (LARGE_META + 1)  # unknown keys are ignored: only the size matters here
    decoded = []
    unpack = protocol.unpack_meta
    monkeypatch.setattr(protocol, "unpack_meta",
                        lambda frame, *args: decoded.append(len(frame)) or unpack(frame, *args))
    beat = a + protocol.HEARTBEAT_SUFFIX

    for stranger in (b"stranger", b"stranger" + protocol.HEARTBEAT_SUFFIX):
        h.backend(stranger, Kind.HEARTBEAT, {"of": stranger, "ping": 1, "pad": pad})
        h.backend(stranger, Kind.STARTED, {"ids": [rid], "pad": pad})
    assert decoded == [] and h.out.take() == []
    assert h.core.stats["bad_frames_backend"] == 4
    assert not h.core.registry.conns[a].started

    h.clock.advance(0.5)
    h.backend(beat, Kind.HEARTBEAT, {"of": a, "pad": pad})  # its worker registered
    assert h.core.registry.conns[a].last_beat == h.clock()
    h.backend(a, Kind.STARTED, {"ids": [rid], "pad": pad})
    assert rid in h.core.registry.conns[a].started
    h.backend(b"sup", Kind.HEARTBEAT, {"ping": 7, "pad": pad})  # a supervisor that said HELLO
    assert [s.meta.get("pong") for s in h.out.take() if s.peer == b"sup"] == [7]
    h.hello(sup=b"sup-2", service="other", workers=1, pad=pad)  # a HELLO registers: decoded
    assert "other" in h.core.services
    assert len([n for n in decoded if n > LARGE_META]) == 4
    assert h.core.stats["bad_frames_backend"] == 4
    assert h.core.stats["internal_errors"] == 0


def test_large_metas_from_many_connections_are_bounded_router_wide():
    """150 connections with one costly ping each held every client about 2.7 s, within
    each connection's interval: the router decodes at most LARGE_META_RATE of them a second
    from all connections together, and refuses the rest undecoded (meta-too-often)."""
    from router.core import LARGE_META_RATE

    h = Harness()
    ping = protocol.pack_meta({"held": list(range(2**40, 2**40 + 20_000))})
    rate = int(LARGE_META_RATE)

    def send(client: bytes) -> str | None:
        h.core.on_frontend([client, *protocol.encode(Kind.HEARTBEAT, 1, ping)])
        [reply] = h.out.take()
        return (reply.body or {}).get("code") if reply.kind is Kind.ERROR else None

    codes = [send(b"c%d" % i) for i in range(3 * rate)]
    assert codes == [None] * rate + ["meta-too-often"] * (2 * rate)
    h.clock.advance(1 / LARGE_META_RATE)  # one more a 1/rate second later
    assert [send(b"d%d" % i) for i in range(2)] == [None, "meta-too-often"]
    h.clock.advance(10.0)  # the budget refills to rate at most
    assert [send(b"e%d" % i) for i in range(rate + 1)] == [None] * rate + ["meta-too-often"]
    # small metas are never limited
    h.core.on_frontend([C, *protocol.encode(Kind.HEARTBEAT, 2, b"\x80")])
    assert h.out.take()[0].kind is Kind.HEARTBEAT
