"""Frames and codecs: every malformed input decodes to a typed error, never a crash."""

from __future__ import annotations

import struct

import msgpack
import pytest

from ipc import codec, protocol
from ipc.protocol import FrameError, Kind
from workerpool import errors


def test_header_round_trip():
    frames = protocol.encode(Kind.REQUEST, 2**64 - 1, {"method": "echo"}, b"\x01")
    assert frames[0] == b"WP\x01\x01" + b"\xff" * 8
    msg = protocol.decode(frames)
    assert (msg.kind, msg.req_id, msg.meta, msg.body, msg.buffers) == (
        Kind.REQUEST, 2**64 - 1, {"method": "echo"}, b"\x01", [])


def test_buffers_are_kept_in_order():
    msg = protocol.decode(protocol.encode(Kind.RESULT, 7, None, b"", [b"a", b"bb"]))
    assert msg.buffers == [b"a", b"bb"]
    assert msg.meta == {}


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([], "too-few-frames"),
        ([b"WP\x01\x01" + bytes(8)], "too-few-frames"),
        ([b"short", b"", b""], "bad-header"),
        ([b"XX\x01\x01" + bytes(8), b"", b""], "bad-magic"),
        ([b"WP\x09\x01" + bytes(8), b"", b""], "bad-version"),
        ([b"WP\x01\xee" + bytes(8), b"", b""], "bad-kind"),
        ([b"WP\x01\x01" + bytes(8), b"\xc1", b""], "bad-meta"),  # 0xc1 is never valid msgpack
        ([b"WP\x01\x01" + bytes(8), msgpack.packb([1, 2]), b""], "bad-meta"),
        ([b"WP\x01\x01" + bytes(8), b"\x81", b""], "bad-meta"),  # truncated map
    ],
)
def test_malformed_frames_raise_frame_error(frames, code):
    with pytest.raises(FrameError) as info:
        protocol.decode(frames)
    assert info.value.code == code


def test_frame_error_keeps_request_id_when_header_is_readable():
    header = struct.pack("!2sBBQ", b"WP", 9, 1, 42)
    with pytest.raises(FrameError) as info:
        protocol.decode([header, b"", b""])
    assert info.value.req_id == 42


def test_every_kind_has_a_distinct_byte():
    assert len({k.value for k in Kind}) == len(Kind)
    assert all(0 < k.value < 256 for k in Kind)


def test_codec_round_trip_and_refusals():
    value = {"a": [1, 2.5, None, True, "s", b"\x00\xff"], "nested": {"k": {"x": -1}}}
    body, buffers = codec.dumps(value)
    assert buffers == []
    assert codec.loads(body) == value
    assert codec.loads(b"") is None
    assert codec.loads(codec.dumps((1, 2))[0]) == [1, 2]  # tuples travel as lists
    with pytest.raises(codec.PayloadError):
        codec.dumps(object())
    with pytest.raises(codec.PayloadError):
        codec.dumps(2**70)
    with pytest.raises(codec.PayloadError, match="not valid msgpack"):
        codec.loads(b"\xc1")
    with pytest.raises(codec.PayloadError, match="extension type 5"):
        codec.loads(msgpack.packb(msgpack.ExtType(5, b"x")))


def test_pickle_is_never_used():
    import pickle

    with pytest.raises(codec.PayloadError):
        codec.loads(pickle.dumps({"a": 1}))


def test_errors_round_trip_the_wire():
    err = errors.BackpressureError("full", retry_after=0.25, worker="default/1")
    back = errors.from_wire(msgpack.unpackb(msgpack.packb(err.to_wire())))
    assert type(back) is errors.BackpressureError
    assert back.retry_after == 0.25
    assert back.retryable is True
    assert back.worker == "default/1"
    assert isinstance(back, errors.WorkerPoolError)


def test_handler_error_carries_remote_traceback_as_cause():
    err = errors.from_wire({"type": "HandlerError", "message": "ValueError: x",
                            "remote_type": "ValueError", "traceback": "Traceback...\nValueError: x"})
    assert isinstance(err, errors.HandlerError)
    assert err.remote_type == "ValueError"
    assert isinstance(err.__cause__, errors.RemoteTraceback)
    assert "ValueError: x" in str(err.__cause__)
    assert err.retryable is False


@pytest.mark.parametrize("body", [None, 3, "x", [], {"type": 5, "message": None}])
def test_from_wire_never_raises(body):
    assert isinstance(errors.from_wire(body), errors.WorkerPoolError)


def test_unknown_error_type_keeps_its_name():
    err = errors.from_wire({"type": "QuotaError", "message": "m"})
    assert type(err) is errors.WorkerPoolError
    assert err.extra["wire_type"] == "QuotaError"


def test_timeout_error_is_also_builtin_timeout():
    assert issubclass(errors.RequestTimeoutError, TimeoutError)


# -- the cost of decoding a meta -----------------------------------------------------------------
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
        protocol.decode([protocol.pack_header(Kind.REQUEST, 3), msgpack.packb(meta), b""],
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
