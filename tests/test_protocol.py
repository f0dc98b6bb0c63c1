"""Frames and codecs: every malformed input decodes to a typed error, never a crash."""

from __future__ import annotations

import struct

import msgpack
import pytest

from ipc import codec, protocol
from ipc.protocol import FrameError, Kind
from workerpool import errors


def _head(meta: bytes = b"", body: bytes = b"", *, version: int = 3, kind: int = 1,
          rid: int = 0, meta_len: int | None = None, body_len: int | None = None) -> bytes:
    """A head frame built by hand, lengths overridable: the bytes protocol.md 2.1 shows."""
    return struct.pack("!2sBBQII", b"WP", version, kind, rid,
                       len(meta) if meta_len is None else meta_len,
                       len(body) if body_len is None else body_len) + meta + body


def test_header_round_trip():
    frames = protocol.encode(Kind.REQUEST, 2**64 - 1, {"method": "echo"}, b"\x01")
    meta = msgpack.packb({"method": "echo"})
    assert frames == [b"WP\x03\x01" + b"\xff" * 8 + bytes([0, 0, 0, len(meta), 0, 0, 0, 1])
                      + meta + b"\x01"]
    msg = protocol.decode(frames)
    assert (msg.kind, msg.req_id, msg.meta, msg.body, msg.buffers) == (
        Kind.REQUEST, 2**64 - 1, {"method": "echo"}, b"\x01", [])


def test_buffers_are_kept_in_order():
    msg = protocol.decode(protocol.encode(Kind.RESULT, 7, None, b"", [b"a", b"bb"]))
    assert msg.buffers == [b"a", b"bb"]
    assert msg.meta == {}
    assert msg.body == b""


def test_a_large_body_travels_in_its_own_frame():
    body = b"\xc4" + bytes(protocol.BODY_FRAME_MIN)
    frames = protocol.encode(Kind.RESULT, 7, {"a": 1}, body, [b"x"])
    assert len(frames) == 3 and frames[1] is body  # not copied into the head
    assert frames[0][16:20] == b"\xff\xff\xff\xff"
    msg = protocol.decode(frames)
    assert (msg.meta, msg.body, msg.buffers) == ({"a": 1}, body, [b"x"])


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"WP\x03\x01" + bytes(8)], "bad-header"),  # a version 2 header: too short
        ([b"short"], "bad-header"),
        ([_head()[:19]], "bad-header"),
        ([b"XX" + _head()[2:]], "bad-magic"),
        ([_head(version=2)], "bad-version"),
        ([_head(kind=0xEE)], "bad-kind"),
        ([_head(b"\xc1")], "bad-meta"),  # 0xc1 is never valid msgpack
        ([_head(msgpack.packb([1, 2]))], "bad-meta"),
        ([_head(b"\x81")], "bad-meta"),  # truncated map
        ([_head(b"", b"\xc0", body_len=2)], "bad-length"),  # says more than it has
        ([_head(b"\x80", b"", meta_len=0)], "bad-length"),  # has more than it says
        ([_head(b"", b"", meta_len=2**32 - 2)], "bad-length"),
        ([_head(b"", b"\xc0", body_len=protocol.BODY_IN_FRAME)], "bad-length"),
        ([_head(b"", b"", body_len=protocol.BODY_IN_FRAME)], "too-few-frames"),
    ],
)
def test_malformed_frames_raise_frame_error(frames, code):
    with pytest.raises(FrameError) as info:
        protocol.decode(frames)
    assert info.value.code == code


def test_frame_error_keeps_request_id_when_header_is_readable():
    for head in (_head(version=9, rid=42), _head(b"", b"", body_len=5, rid=42)):
        with pytest.raises(FrameError) as info:
            protocol.decode([head])
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

