"""The one receive path: a message's frame count costs the receiver nothing it keeps."""

from __future__ import annotations

import os

import pytest
import zmq

from ipc import native, transport


@pytest.fixture(params=["C", "Python"])
def dropper(request, monkeypatch):
    """The frames past the limit let go by the C helper, then by the Python loop."""
    if request.param == "C":
        if native.frame_dropper() is None:
            # CI builds it (make test installs the package): there it must be here.
            assert not os.environ.get("CI"), "ipc._framedrop was not built or did not bind"
            pytest.skip("ipc._framedrop is not built here (no compiler at install?)")
    else:
        monkeypatch.setattr(transport, "_drop", None)
    return request.param


def test_recv_keeps_at_most_max_parts_and_the_next_message_is_intact(dropper):
    ctx = zmq.Context()
    try:
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        router.bind("inproc://t")
        dealer.connect("inproc://t")
        dealer.send_multipart([b"h", b"m", b"b", *([b""] * 100_000)])
        dealer.send_multipart([b"h2", b"m2", b"b2", b"x"])
        assert router.poll(5000)
        first = transport.recv(router, 0, 4, max_parts=10)
        assert type(first) is transport.Truncated
        assert len(first) == 10 and first.dropped == 100_004 - 10
        second = transport.recv(router, 0, 4, max_parts=10)
        assert type(second) is list and second[1:4] == [b"h2", b"m2", b"b2"]
        assert bytes(second[4]) == b"x"
        dealer.send_multipart([b"h", b"m", b"b", *([b"y"] * 6)])  # exactly the limit
        assert type(transport.recv(router, 0, 4, max_parts=10)) is list
    finally:
        ctx.destroy(linger=0)


def test_the_c_helper_stops_at_the_end_of_the_message_whatever_the_frames(dropper):
    """Frames of every size past the limit, over tcp (where a message comes in pieces):
    the count is exact and the next messages start where they should."""
    ctx = zmq.Context()
    try:
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        sizes = [0, 1, 29, 30, 31, 255, 256, 70_000, 0, 5]
        for n in range(1, 4):
            dealer.send_multipart([b"h", *(b"z" * size for size in sizes * n)])
            dealer.send_multipart([b"after", str(n).encode()])
        for n in range(1, 4):
            assert router.poll(5000)
            got = transport.recv(router, 0, 2, max_parts=3)
            assert type(got) is transport.Truncated
            assert len(got) == 3 and len(got) + got.dropped == 2 + len(sizes) * n
            after = transport.recv(router, 0, 2, max_parts=3)
            assert after[1] == b"after" and bytes(after[2]) == str(n).encode()
    finally:
        ctx.destroy(linger=0)
