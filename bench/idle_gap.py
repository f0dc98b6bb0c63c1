"""Busy fraction at saturation: how much of its time a worker spends running its handler,
with requests held ahead (``--prefetch 1``, the default) and without (``--prefetch 0``),
side by side in one run.

For each handler time (``--sleep-ms``, default 1 and 5) and each prefetch setting: a pool
of ``--workers`` (2) workers with the default ``max_inflight`` (1) whose handler sleeps
that long (``--method sleep``: it lets go of the GIL and the CPU, as a GPU handler does
when CUDA blocks while it waits), keeps a CPU busy in C without the GIL (``--method
spin_released``: CUDA's default wait, which spins), or computes in Python holding the GIL
(``--method spin``), driven by a
``Client.submit`` loop keeping ``--outstanding`` (64) requests in flight for
``--duration`` seconds after a warm-up. Two figures per run:

- ``busy`` (the issue's measure): requests/s x the handler's own measured service time
  (the mean of one call of the handler's method, timed in this process) / workers;
- ``utilization``: the mean of the workers' own ``utilization`` from ``status`` at the end
  (the share of the last ~5 s their handler ran).

Usage::

    .venv/bin/python bench/idle_gap.py --duration 10
    .venv/bin/python bench/idle_gap.py --duration 10 --json
    .venv/bin/python bench/idle_gap.py --duration 10 --method spin
    .venv/bin/python bench/idle_gap.py --duration 10 --method spin_released --workers 1

A spinning handler keeps a CPU busy: on a 2-core machine, two of them leave the router
and the client none, so ``spin_released`` is measured there with one worker.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _pool import REPO, BenchError, measure, pool

sys.path.insert(0, REPO)
from workerpool import Client
from workerpool.handlers import Echo


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured (10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds before (2)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--outstanding", type=int, default=64)
    ap.add_argument("--sleep-ms", type=float, nargs="+", default=[1.0, 5.0],
                    help="the handler's time per request, ms (1 5)")
    ap.add_argument("--method", choices=("sleep", "spin", "spin_released"), default="sleep",
                    help="sleep: lets go of the GIL and the CPU; spin: holds both; "
                         "spin_released: keeps the CPU, lets go of the GIL (sleep)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    return ap.parse_args()


def service_time(method: str, seconds: float, n: int = 400) -> float:
    """What one call of the handler's ``method`` really takes here: its own service time."""
    fn = getattr(Echo(), method)
    payload = {"seconds": seconds}
    t0 = time.perf_counter()
    for _ in range(n):
        fn(payload)
    return (time.perf_counter() - t0) / n


def drive(address: str, method: str, payload: dict, outstanding: int, warmup: float,
          duration: float) -> int:
    """Requests completed in ``duration`` seconds after ``warmup``, ``outstanding`` kept
    in flight by a closed loop. Raises BenchError if any failed: a failed request costs
    the worker no handler time, so counting it would inflate the busy fraction (a worker
    crashing at once looked 9x busy)."""
    done = 0
    failed: list[BaseException] = []
    counting = False
    lock = threading.Lock()
    slots = threading.Semaphore(outstanding)
    stop = time.monotonic() + warmup + duration
    start_at = time.monotonic() + warmup

    def finished(fut: concurrent.futures.Future) -> None:
        nonlocal done
        if fut.exception() is not None:
            failed.append(fut.exception())
        elif counting:
            with lock:
                done += 1
        slots.release()

    with Client(address, timeout=60) as c:
        while True:
            now = time.monotonic()
            if now >= stop:
                break
            if not counting and now >= start_at:
                counting = True
            slots.acquire()
            c.submit(method, payload).add_done_callback(finished)
        counting = False
        for _ in range(outstanding):
            slots.acquire()
    if failed:
        raise BenchError(f"{len(failed)} requests failed, the first with {failed[0]!r}")
    return done


def run(args: argparse.Namespace, workdir: str) -> list[dict]:
    rows = []
    for ms in args.sleep_ms:
        st = service_time(args.method, ms / 1000)
        for prefetch in (0, 1):
            with pool(workdir, f"p{prefetch}-{ms:g}", workers=args.workers,
                      flags=["--prefetch", str(prefetch)]) as (_, address, _argv):
                n = drive(address, args.method, {"seconds": ms / 1000}, args.outstanding,
                          args.warmup, args.duration)
                with Client(address) as c:
                    workers = c.status()["workers"]
            rps = n / args.duration
            util = [w["utilization"] for w in workers if w["utilization"] is not None]
            rows.append({"method": args.method, "sleep_ms": ms, "prefetch": prefetch, "req_s": round(rps, 1),
                         "service_time_ms": round(st * 1000, 3),
                         "busy": round(rps * st / args.workers, 3),
                         "utilization": round(sum(util) / len(util), 3) if util else None})
    return rows


def main() -> int:
    args = _parse()
    rows, status = measure(lambda wd: run(args, wd), "idle-gap-")
    if rows is None:
        return status
    if args.json:
        print(json.dumps({"workers": args.workers, "outstanding": args.outstanding,
                          "duration_s": args.duration, "rows": rows}, indent=2))
        return 0
    print(f"{args.workers} workers, max_inflight 1, {args.outstanding} outstanding, "
          f"{args.duration:g}s measured, handler method {args.method!r}")
    print(f"{'handler':>8} {'prefetch':>8} {'req/s':>9} {'busy':>6} {'utilization':>11}")
    for r in rows:
        print(f"{r['sleep_ms']:>6g}ms {r['prefetch']:>8} {r['req_s']:>9,.1f} {r['busy']:>6.3f} "
              f"{r['utilization'] if r['utilization'] is not None else '-':>11}")
    for ms in args.sleep_ms:
        off, on = (r for r in rows if r["sleep_ms"] == ms)
        print(f"{ms:g} ms: prefetch 1 / prefetch 0 = {on['req_s'] / off['req_s']:.2f}x req/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
