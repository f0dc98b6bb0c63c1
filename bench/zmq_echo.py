"""A raw pyzmq echo server, no broker: the baseline for one ZeroMQ hop and nothing else.

::

    client [DEALER] --connects to each--> [ROUTER] zmq_echo.py  (one process per address)
                    <-- the same frames, zero-copy ----------+

It sends every message back to its sender unchanged: no decoding, no bookkeeping, no
copies (``copy=False`` both ways). bench/throughput.py starts one per worker and
connects one DEALER to all of them, which spreads requests round-robin.

    python bench/zmq_echo.py ipc:///tmp/x/echo0     # prints "echo ready" once bound
"""

from __future__ import annotations

import signal
import sys

import zmq


def serve(address: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark stops us with SIGTERM
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(address)
    print(f"echo ready at {address}", flush=True)
    try:
        while True:
            sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
    finally:
        sock.close(0)
        ctx.term()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: zmq_echo.py ADDRESS")
    sys.exit(serve(sys.argv[1]))
