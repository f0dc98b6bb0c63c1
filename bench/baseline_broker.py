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

or as libzmq's own proxy (``zmq.proxy_steerable``: the forwarding loop runs in C, no Python
per message) in front of the same echo workers, the floor any broker of ZeroMQ messages
between Python processes can reach on the machine::

    python bench/baseline_broker.py proxy --frontend tcp://127.0.0.1:5555 --workers 2

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
import threading
import time

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


def _bound(ctx: zmq.Context, frontend: str, back_kind: int
           ) -> tuple[zmq.Socket, zmq.Socket, str, str]:
    """A ROUTER bound at ``frontend`` for clients, and a ``back_kind`` socket bound at a
    fresh ipc address for the workers: (front, back, its folder, its address)."""
    front = _socket(ctx, zmq.ROUTER)
    back = _socket(ctx, back_kind)
    tmpdir = tempfile.mkdtemp(prefix="baseline-broker-")
    backend = f"ipc://{tmpdir}/back"
    back.bind(backend)
    front.bind(frontend)
    return front, back, tmpdir, backend


def _spawn_workers(backend: str, nworkers: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker",
                              "--backend", backend]) for _ in range(nworkers)]


def _stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class _Stop:
    """Set by SIGTERM or SIGINT."""

    def __init__(self) -> None:
        self.now = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_: object) -> None:
        self.now = True


def broker(frontend: str, nworkers: int) -> int:
    ctx = zmq.Context()
    front, back, tmpdir, backend = _bound(ctx, frontend, zmq.ROUTER)
    procs: list[subprocess.Popen] = []
    stop = _Stop()
    try:
        procs = _spawn_workers(backend, nworkers)
        workers: list[bytes] = []
        inflight: dict[tuple[bytes, int], bytes] = {}
        rr = 0
        unpackb = msgpack.unpackb
        poller = zmq.Poller()
        poller.register(back, zmq.POLLIN)
        while not stop.now:
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
        _stop_workers(procs)
        front.close(0)
        back.close(0)
        ctx.term()
        _remove(tmpdir)
    return 0


def proxy(frontend: str, nworkers: int) -> int:
    """libzmq's proxy between a ROUTER for clients and a DEALER for the echo workers: the
    DEALER deals requests round-robin, the ROUTER routes each reply by the client's id,
    which the worker sends back with it. No bookkeeping at all, and none of it in Python."""
    ctx = zmq.Context()
    front, back, tmpdir, backend = _bound(ctx, frontend, zmq.DEALER)
    control = ctx.socket(zmq.PAIR)
    control.bind("inproc://control")
    procs: list[subprocess.Popen] = []
    stop = _Stop()
    thread = None
    try:
        procs = _spawn_workers(backend, nworkers)
        ready = 0
        while ready < nworkers and not stop.now:  # each worker's READY, before any request
            if back.poll(200):
                ready += back.recv() == READY
        if stop.now:
            return 0
        steer = ctx.socket(zmq.PAIR)
        steer.connect("inproc://control")
        thread = threading.Thread(target=zmq.proxy_steerable, args=(front, back, None, steer))
        thread.start()
        print(f"baseline ready: {nworkers} workers at {frontend} (libzmq proxy)", flush=True)
        while not stop.now:
            time.sleep(0.2)  # a signal cuts it short
    finally:
        if thread is not None:
            control.send(b"TERMINATE")
            thread.join()
            steer.close(0)
        _stop_workers(procs)
        control.close(0)
        front.close(0)
        back.close(0)
        ctx.term()
        _remove(tmpdir)
    return 0


def _remove(tmpdir: str) -> None:
    try:
        os.unlink(f"{tmpdir}/back")
    except OSError:
        pass
    os.rmdir(tmpdir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="role", required=True)
    for role in ("broker", "proxy"):
        b = sub.add_parser(role)
        b.add_argument("--frontend", required=True)
        b.add_argument("--workers", type=int, default=2)
    w = sub.add_parser("worker")
    w.add_argument("--backend", required=True)
    args = ap.parse_args(argv)
    if args.role == "worker":
        return worker(args.backend)
    return (proxy if args.role == "proxy" else broker)(args.frontend, args.workers)


if __name__ == "__main__":
    sys.exit(main())
