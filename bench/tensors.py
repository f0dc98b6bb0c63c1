"""Large arrays through workerpool: round-trip bandwidth against memcpy and raw ZeroMQ.

Every system moves the same float32 numpy array (``--sizes`` MiB, default 1, 16, 64) out
and back, one request at a time, holding the previous reply while the next call runs (as a
caller that uses its result does). Each size is run ``--warmup`` times uncounted, then
``--reps`` times; the median round-trip time (RTT) is reported, and the best next to it.

Definitions (GB = 1e9 bytes, N = payload bytes):

- round-trip bandwidth = 2 * N / RTT: the payload goes out and comes back.
- memcpy bandwidth = N / t, t the time of one ``numpy.copyto`` of N bytes into an array
  that is already allocated and touched. It is computed the same way as a round trip
  made of two such copies (2 * N / 2t).
- ratio = round-trip bandwidth / memcpy bandwidth = 2t / RTT: how close a round trip comes
  to the two plain copies that moving the data there and back needs at the least.

Systems:

- ``memcpy``: ``numpy.copyto(dst, src)`` in this process.
- ``zmq ipc (raw)``: a DEALER in this process and a ROUTER echo in a child process over
  ipc://, no broker; both sides send zero-copy (``copy=False``) and receive zero-copy.
- ``workerpool shm``: ``workerpool up --handler workerpool.handlers:Echo --workers 1`` with
  an ipc:// frontend, ``Client.call("echo", array)``; large arrays go through shared memory.
- ``workerpool frames``: the same pool, ``Client(..., shm=False)``: the array travels as
  out-of-band ZeroMQ frames through the router, as it does for remote peers.

Usage::

    .venv/bin/python bench/tensors.py                  # table
    .venv/bin/python bench/tensors.py --reps 30 --json # one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from _pool import process_group  # noqa: E402  (bench/ helpers)

from workerpool import Client  # noqa: E402

MiB = 2**20
GOAL_RATIO_64 = 0.5  # the goal: 64 MiB round trip >= 0.5x memcpy (workerpool shm)


def _array(nbytes: int) -> np.ndarray:
    return np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)


def _times(fn, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_memcpy(nbytes: int, warmup: int, reps: int) -> list[float]:
    src = _array(nbytes)
    dst = np.ones_like(src)  # touched: no page faults in the timed copies
    return _times(lambda: np.copyto(dst, src), warmup, reps)


def zmq_echo(address: str) -> None:
    """The raw baseline's echo side: a ROUTER that sends every message straight back."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    print("zmq echo ready", flush=True)
    while True:
        frames = sock.recv_multipart(copy=False)
        sock.send_multipart(frames, copy=False)


def bench_zmq(address: str, nbytes: int, warmup: int, reps: int) -> list[float]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    arr = _array(nbytes)
    held: list[Any] = [None]

    def once() -> None:
        sock.send(arr, copy=False)
        frame = sock.recv(copy=False)
        held[0] = np.frombuffer(frame, np.float32)

    try:
        times = _times(once, warmup, reps)
        if not np.array_equal(held[0], arr):
            raise AssertionError("raw zmq echo returned different bytes")
        return times
    finally:
        sock.close(0)


def bench_workerpool(frontend: str, shm: bool, nbytes: int, warmup: int,
                     reps: int) -> list[float]:
    arr = _array(nbytes)
    held: list[Any] = [None]
    with Client(frontend, shm=shm, timeout=60) as client:
        def once() -> None:
            held[0] = client.call("echo", arr)

        times = _times(once, warmup, reps)
        if not (isinstance(held[0], np.ndarray) and np.array_equal(held[0], arr)):
            raise AssertionError("workerpool echo returned a different array")
        held[0] = None
    return times


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [float(s) for s in args.sizes.split(",")]
    results: dict[str, dict[int, list[float]]] = {}
    results["memcpy"] = {s: bench_memcpy(int(s * MiB), args.warmup, args.reps) for s in sizes}
    with tempfile.TemporaryDirectory(prefix="wpbt-") as tmp:
        echo_addr = f"ipc://{tmp}/echo"
        argv = [sys.executable, os.path.abspath(__file__), "--zmq-echo", echo_addr]
        with process_group(argv, "zmq echo ready", tmp, "zmq-echo"):
            results["zmq ipc (raw)"] = {s: bench_zmq(echo_addr, int(s * MiB), args.warmup, args.reps)
                                        for s in sizes}
        frontend = f"ipc://{tmp}/front"
        argv = [sys.executable, "-m", "workerpool.cli", "up", "--handler",
                "workerpool.handlers:Echo", "--workers", "1", "--frontend", frontend]
        with process_group(argv, "workerpool ready", tmp, "workerpool"):
            for name, shm in (("workerpool shm", True), ("workerpool frames", False)):
                results[name] = {s: bench_workerpool(frontend, shm, int(s * MiB), args.warmup,
                                                     args.reps) for s in sizes}
    rows = []
    for s in sizes:
        copy_t = statistics.median(results["memcpy"][s])
        memcpy_gbs = int(s * MiB) / copy_t / 1e9
        for name, by_size in results.items():
            times = by_size[s]
            med, best = statistics.median(times), min(times)
            if name == "memcpy":
                gbs, ratio = memcpy_gbs, 1.0
            else:
                gbs = 2 * int(s * MiB) / med / 1e9
                ratio = gbs / memcpy_gbs
            rows.append({"system": name, "mib": s, "median_ms": med * 1e3, "best_ms": best * 1e3,
                         "gb_per_s": gbs, "ratio_vs_memcpy": ratio})
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                       f"Python {platform.python_version()}, pyzmq {zmq.__version__}, "
                       f"numpy {np.__version__}",
            "load_average": os.getloadavg(), "reps": args.reps, "rows": rows}


def format_table(res: dict[str, Any]) -> str:
    lines = [f"# {res['machine']}; load average {res['load_average'][0]:.2f}; "
             f"median of {res['reps']} round trips",
             "# round-trip GB/s = 2 x payload / RTT; memcpy GB/s = payload / copy time",
             f"{'system':<20} {'MiB':>5} {'median ms':>10} {'best ms':>9} {'GB/s':>7} "
             f"{'x memcpy':>9}"]
    for r in res["rows"]:
        lines.append(f"{r['system']:<20} {r['mib']:>5g} {r['median_ms']:>10.2f} "
                     f"{r['best_ms']:>9.2f} {r['gb_per_s']:>7.2f} {r['ratio_vs_memcpy']:>8.2f}x")
    for r in res["rows"]:
        if r["system"] == "workerpool shm" and r["mib"] == 64:
            met = "met" if r["ratio_vs_memcpy"] >= GOAL_RATIO_64 else "NOT met"
            lines.append(f"# goal: workerpool shm 64 MiB >= {GOAL_RATIO_64}x memcpy: "
                         f"{r['ratio_vs_memcpy']:.2f}x, {met}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,16,64", help="payload sizes in MiB, comma-separated")
    ap.add_argument("--reps", type=int, default=20, help="timed round trips per size and system")
    ap.add_argument("--warmup", type=int, default=3, help="untimed round trips first")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--zmq-echo", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.zmq_echo:
        zmq_echo(args.zmq_echo)
        return 0
    res = run(args)
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
