"""A minimal hand-written pyzmq broker: the baseline bench/throughput.py compares against.

::

    clients [DEALER] --> [ROUTER] frontend --round-robin--> [ROUTER] backend --> [DEALER] workers
                     <--                    <-- same frames ------------------ <--

It does the least a broker must do and nothing else: no capacity limit, no queue, no
health checks, no deadlines. It does msgpack-decode every client body to track the
request's id in an in-flight dict (deleted again when the reply passes through), so it
pays for the same kind of per-request bookkeeping a real router does.

Run as a broker (spawns its workers as fresh interpreters, prints ``baseline ready`` on
stdout once every worker has registered)::

    python bench/baseline_broker.py broker --frontend ipc:///tmp/x/front --workers 2

or as one echo worker (the broker does this itself)::

    python bench/baseline_broker.py worker --backend ipc:///tmp/x/back

Clients send one frame, a msgpack map ``{"i": <int, unique per client>}``, and get the
same frame back.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile

import msgpack
import zmq

READY = b"READY"
_BATCH = 1024  # messages drained per socket per poll


def _socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    return s


def worker(backend: str) -> int:
    """Echo worker: announce, then send every message back unchanged."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the broker (or the bench) stops us
    ctx = zmq.Context()
    sock = _socket(ctx, zmq.DEALER)
    sock.connect(backend)
    sock.send(READY)
    try:
        while True:
            sock.send_multipart(sock.recv_multipart(copy=True))
    finally:
        sock.close(0)
        ctx.term()


def broker(frontend: str, nworkers: int) -> int:
    ctx = zmq.Context()
    front = _socket(ctx, zmq.ROUTER)
    back = _socket(ctx, zmq.ROUTER)
    tmpdir = tempfile.mkdtemp(prefix="baseline-broker-")
    backend = f"ipc://{tmpdir}/back"
    back.bind(backend)
    front.bind(frontend)
    procs: list[subprocess.Popen] = []
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for _ in range(nworkers):
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "worker", "--backend", backend]))
        workers: list[bytes] = []
        inflight: dict[tuple[bytes, int], bytes] = {}
        rr = 0
        unpackb = msgpack.unpackb
        poller = zmq.Poller()
        poller.register(back, zmq.POLLIN)
        while not stopping:
            try:
                events = dict(poller.poll(200))
            except zmq.ZMQError:  # EINTR from a signal
                continue
            if back in events:
                for _ in range(_BATCH):
                    try:
                        frames = back.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if len(frames) == 2 and frames[1] == READY:
                        workers.append(frames[0])
                        if len(workers) == nworkers:
                            poller.register(front, zmq.POLLIN)
                            print(f"baseline ready: {nworkers} workers at {frontend}", flush=True)
                        continue
                    _, client, body = frames
                    inflight.pop((client, unpackb(body)["i"]), None)
                    front.send_multipart([client, body])
            if front in events:
                for _ in range(_BATCH):
                    try:
                        client, body = front.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    w = workers[rr]
                    rr = (rr + 1) % nworkers
                    inflight[(client, unpackb(body)["i"])] = w
                    back.send_multipart([w, client, body])
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        front.close(0)
        back.close(0)
        ctx.term()
        try:
            os.unlink(f"{tmpdir}/back")
        except OSError:
            pass
        os.rmdir(tmpdir)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="role", required=True)
    b = sub.add_parser("broker")
    b.add_argument("--frontend", required=True)
    b.add_argument("--workers", type=int, default=2)
    w = sub.add_parser("worker")
    w.add_argument("--backend", required=True)
    args = ap.parse_args(argv)
    if args.role == "worker":
        return worker(args.backend)
    return broker(args.frontend, args.workers)


if __name__ == "__main__":
    sys.exit(main())
