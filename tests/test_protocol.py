"""Frames and codecs: every malformed input decodes to a typed error, never a crash."""

from __future__ import annotations

import struct

import msgpack
import pytest

from ipc import codec, protocol
from ipc.protocol import FrameError, Kind
from workerpool import errors


def _head(meta: bytes = b"", body: bytes = b"", *, version: int = protocol.VERSION, kind: int = 1,
          rid: int = 0, meta_len: int | None = None, body_len: int | None = None) -> bytes:
    """A head frame built by hand, lengths overridable: the bytes protocol.md 2.1 shows."""
    return struct.pack("!2sBBQII", b"WP", version, kind, rid,
                       len(meta) if meta_len is None else meta_len,
                       len(body) if body_len is None else body_len) + meta + body


def test_header_round_trip():
    frames = protocol.encode(Kind.REQUEST, 2**64 - 1, {"method": "echo"}, b"\x01")
    meta = msgpack.packb({"method": "echo"})
    assert frames == [b"WP\x04\x01" + b"\xff" * 8 + bytes([0, 0, 0, len(meta), 0, 0, 0, 1])
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
        ([b"WP\x04\x01" + bytes(8)], "bad-header"),  # a version 2 header: too short
        ([b"short"], "bad-header"),
        ([_head()[:19]], "bad-header"),
        ([b"XX" + _head()[2:]], "bad-magic"),
        ([_head(version=3)], "bad-version"),
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



# -- BUNDLE ---------------------------------------------------------------------------------
def _one(kind: Kind, rid: int, meta=None, body: bytes = b"") -> bytes:
    [head] = protocol.encode(kind, rid, meta, body)
    return head


def test_a_bundle_holds_its_messages_end_to_end_and_gives_them_back_in_order():
    heads = [_one(Kind.REQUEST, i, {"method": "echo"}, msgpack.packb(i)) for i in range(1, 6)]
    [frame] = protocol.pack(heads)
    kind, count, meta, body, buffers = protocol.split([frame])
    assert (kind, count, meta, buffers) == (Kind.BUNDLE, 5, b"", [])
    assert body == b"".join(heads)  # protocol.md 2.6: nothing but the messages
    assert protocol.unbundle(frame) == heads
    assert [protocol.decode([h]).req_id for h in protocol.unbundle(frame)] == [1, 2, 3, 4, 5]


def test_pack_sends_a_lone_message_as_itself_and_splits_at_the_bounds():
    one = _one(Kind.RESULT, 1)
    assert protocol.pack([one]) == [one]
    many = [_one(Kind.RESULT, i) for i in range(1, protocol.BUNDLE_MAX + 2)]
    frames = protocol.pack(many)
    assert len(frames) == 2 and frames[1] == many[-1]  # the 65th goes alone
    assert protocol.unbundle(frames[0]) == many[:-1]
    big = _one(Kind.RESULT, 9, None, msgpack.packb(bytes(protocol.BUNDLE_BYTES - 40)))
    frames = protocol.pack([one, big, one, one])
    assert frames[0] == one and frames[1] == big  # a large one goes alone, order kept
    assert protocol.unbundle(frames[2]) == [one, one]
    half = _one(Kind.RESULT, 2, None, msgpack.packb(bytes(protocol.BUNDLE_BYTES // 2)))
    frames = protocol.pack([half, half, half])
    assert [protocol.split([f])[0] for f in frames] == [Kind.RESULT] * 3  # none fit two


def _bundle(body: bytes, count: int, meta_len: int = 0) -> bytes:
    return struct.pack("!2sBBQII", b"WP", protocol.VERSION, Kind.BUNDLE, count, meta_len,
                       len(body)) + body


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        (_bundle(b"", 0), "1 to 64"),
        (_bundle(_one(Kind.RESULT, 1) * 65, 65), "1 to 64"),
        (_bundle(_one(Kind.RESULT, 1, None, msgpack.packb(bytes(33000))) * 2, 2),
         "at most 65536 bytes"),
        (_bundle(_one(Kind.RESULT, 1) * 2, 3), "says 3 messages"),  # fewer than it says
        (_bundle(_one(Kind.RESULT, 1) * 3, 2), "and 20 bytes more"),  # more than it says
        (_bundle(_one(Kind.RESULT, 1) + b"WP\x04", 2), "shorter than a header"),
        (_bundle(_one(Kind.RESULT, 1, None, b"\xc0")[:-1], 1), "past its end"),
        (_bundle(_bundle(_one(Kind.RESULT, 1), 1), 1), "is a BUNDLE"),
        (_bundle(_head(b"", b"", body_len=protocol.BODY_IN_FRAME), 1), "frame of its own"),
    ],
)
def test_a_malformed_bundle_is_refused_whole(frame, says):
    with pytest.raises(FrameError) as info:
        protocol.unbundle(frame)
    assert info.value.code == "bad-bundle" and says in str(info.value)
    assert info.value.req_id is None  # answered under id 0: no message in it is acted on


def test_a_bundle_with_a_meta_is_refused():
    frame = struct.pack("!2sBBQII", b"WP", protocol.VERSION, Kind.BUNDLE, 1, 1, 20) \
        + b"\x80" + _one(Kind.RESULT, 1)
    with pytest.raises(FrameError, match="no meta"):
        protocol.unbundle(frame)


def test_messages_in_a_bundle_are_checked_one_by_one_when_handled():
    bad = _head(version=3, rid=7)  # well framed, wrong version: its own error, its own id
    frame = _bundle(_one(Kind.RESULT, 1) + bad, 2)
    first, second = protocol.unbundle(frame)
    assert protocol.decode([first]).req_id == 1
    with pytest.raises(FrameError) as info:
        protocol.decode([second])
    assert (info.value.code, info.value.req_id) == ("bad-version", 7)
