"""What CURVE costs: a no-op pool with and without keys, side by side in one run.

Each round starts ``workerpool up`` (2 Echo workers, ``max_inflight`` 64) twice, once
plain and once with ``--keys`` (the client, the supervisor and the workers then all
speak CURVE, and the router checks every message's key), in alternating order. For each:

- throughput: a bare ``Client.submit`` loop keeps ``--outstanding`` requests in flight
  for ``--duration`` seconds; completed requests per second;
- latency: one request at a time for ``--duration`` seconds; p50 and p99 of ``call``.

Figures are the median over ``--rounds``; the ratios are keyed over plain (throughput
below 1 and latency above 1 are the cost). Run it with nothing else on the machine::

    .venv/bin/python bench/curve.py --rounds 3 --duration 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _pool import measure, nearest_rank, pool

from ipc.curve import init_keys
from workerpool import Client

SYSTEMS = ("plain", "curve")


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per phase (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds first (default 1)")
    ap.add_argument("--outstanding", type=int, default=256, help="requests in flight (256)")
    ap.add_argument("--rounds", type=int, default=3, help="plain/curve pairs (default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap.parse_args()


def _throughput(c: Client, outstanding: int, seconds: float) -> float:
    """Completed requests per second with ``outstanding`` kept in flight."""
    slots = threading.Semaphore(outstanding)
    done = [0]
    lock = threading.Lock()

    def finished(_fut: object) -> None:
        with lock:
            done[0] += 1
        slots.release()

    end = time.monotonic() + seconds
    with lock:
        start_count = done[0]
    start = time.monotonic()
    while time.monotonic() < end:
        slots.acquire()
        c.submit("echo", None, timeout=60).add_done_callback(finished)
    for _ in range(outstanding):  # let the last ones finish
        slots.acquire()
    elapsed = time.monotonic() - start
    return (done[0] - start_count) / elapsed


def _latency(c: Client, seconds: float) -> tuple[float, float, int]:
    """p50 and p99 of one call at a time, in milliseconds, and how many calls."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        c.call("echo", None, timeout=60)
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return nearest_rank(samples, 0.5), nearest_rank(samples, 0.99), len(samples)


def _run_one(workdir: str, system: str, keys: str, args: argparse.Namespace) -> dict:
    flags = ["--max-inflight", "64"] + (["--keys", keys] if system == "curve" else [])
    with pool(workdir, system, flags=flags) as (_, frontend, _argv):
        client_keys = {"keys": keys} if system == "curve" else {}
        with Client(frontend, **client_keys) as c:
            _throughput(c, args.outstanding, args.warmup)
            rps = _throughput(c, args.outstanding, args.duration)
            p50, p99, n = _latency(c, args.duration)
    return {"throughput_rps": rps, "p50_ms": p50, "p99_ms": p99, "calls": n}


def _work(args: argparse.Namespace):
    def run(workdir: str) -> dict:
        keys = os.path.join(workdir, "keys")
        init_keys(keys)
        rounds: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
        for i in range(args.rounds):
            order = SYSTEMS if i % 2 == 0 else tuple(reversed(SYSTEMS))
            for system in order:
                rounds[system].append(_run_one(workdir, system, keys, args))
        out: dict = {"rounds": rounds, "median": {}}
        for system in SYSTEMS:
            out["median"][system] = {k: statistics.median(r[k] for r in rounds[system])
                                     for k in ("throughput_rps", "p50_ms", "p99_ms")}
        plain, curve = out["median"]["plain"], out["median"]["curve"]
        out["ratio"] = {k: curve[k] / plain[k] for k in plain}
        return out
    return run


def main() -> int:
    args = _parse()
    result, code = measure(_work(args), "wp-curve-")
    if result is None:
        return code
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'':8} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9}")
    for system in SYSTEMS:
        m = result["median"][system]
        print(f"{system:8} {m['throughput_rps']:>10.0f} {m['p50_ms']:>9.3f} {m['p99_ms']:>9.3f}")
    r = result["ratio"]
    print(f"{'curve/plain':8} {r['throughput_rps']:>7.3f} {r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f}")
    print(f"(median of {args.rounds} rounds; throughput with {args.outstanding} outstanding, "
          f"latency one at a time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
