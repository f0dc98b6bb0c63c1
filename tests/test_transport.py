"""The one receive path: a message's frame count costs the receiver nothing it keeps."""

from __future__ import annotations

import zmq

from ipc import transport


def test_recv_keeps_at_most_max_parts_and_the_next_message_is_intact():
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
