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
    assert frames[0] == b"WP\x02\x01" + b"\xff" * 8
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
        ([b"WP\x02\x01" + bytes(8)], "too-few-frames"),
        ([b"short", b"", b""], "bad-header"),
        ([b"XX\x01\x01" + bytes(8), b"", b""], "bad-magic"),
        ([b"WP\x09\x01" + bytes(8), b"", b""], "bad-version"),
        ([b"WP\x02\xee" + bytes(8), b"", b""], "bad-kind"),
        ([b"WP\x02\x01" + bytes(8), b"\xc1", b""], "bad-meta"),  # 0xc1 is never valid msgpack
        ([b"WP\x02\x01" + bytes(8), msgpack.packb([1, 2]), b""], "bad-meta"),
        ([b"WP\x02\x01" + bytes(8), b"\x81", b""], "bad-meta"),  # truncated map
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

