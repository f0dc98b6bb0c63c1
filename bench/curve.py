"""What CURVE costs: a no-op pool with and without keys, side by side in one run.

Each round starts ``workerpool up`` (2 Echo workers, ``max_inflight`` 64) twice and keeps
both running: once plain and once with ``--keys`` (the client, the supervisor and the
workers then all speak CURVE, and the router checks every message's key). Then:

- throughput: a bare ``Client.submit`` loop keeps ``--outstanding`` requests in flight
  for ``--duration`` seconds on one pool, then on the other (the order alternates over
  rounds); completed requests per second;
- latency: one request at a time for ``--duration`` seconds, alternating call by call
  between the two pools, so that both see the same moments of the machine; p50 and p99
  of ``call``.

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


def _latency(clients: dict[str, Client], seconds: float) -> dict[str, tuple]:
    """p50 and p99 of one call at a time, in milliseconds, and how many calls, for each
    client, calling them in turn."""
    samples: dict[str, list[float]] = {name: [] for name in clients}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, c in clients.items():
            t = time.perf_counter()
            c.call("echo", None, timeout=60)
            samples[name].append((time.perf_counter() - t) * 1000)
    out = {}
    for name, values in samples.items():
        values.sort()
        out[name] = nearest_rank(values, 0.5), nearest_rank(values, 0.99), len(values)
    return out


def _round(workdir: str, keys: str, args: argparse.Namespace, order: tuple) -> dict:
    flags = ["--max-inflight", "64"]
    with pool(workdir, "plain", flags=flags) as (_, plain_front, _a), \
            pool(workdir, "curve", flags=[*flags, "--keys", keys]) as (_, curve_front, _b), \
            Client(plain_front) as plain, Client(curve_front, keys=keys) as curve:
        clients = {"plain": plain, "curve": curve}
        out: dict[str, dict] = {name: {} for name in clients}
        for name in order:
            _throughput(clients[name], args.outstanding, args.warmup)
            out[name]["throughput_rps"] = _throughput(clients[name], args.outstanding,
                                                      args.duration)
        for name, (p50, p99, n) in _latency(clients, args.duration).items():
            out[name].update(p50_ms=p50, p99_ms=p99, calls=n)
    return out


def _work(args: argparse.Namespace):
    def run(workdir: str) -> dict:
        keys = os.path.join(workdir, "keys")
        init_keys(keys)
        rounds: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
        for i in range(args.rounds):
            order = SYSTEMS if i % 2 == 0 else tuple(reversed(SYSTEMS))
            for system, figures in _round(workdir, keys, args, order).items():
                rounds[system].append(figures)
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
          f"latency one at a time, alternating between the pools)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
