"""Sequential calls before and after a burst, on a pool with the defaults: whether a worker
that lent its socket to its wire thread during the burst takes it back once requests come
one at a time again (workerpool/lending.py); kept lent, every such call pays two more
thread wake-ups.

For each handler time (``--sleep-ms``, default 0 and 1): a fresh pool of ``--workers`` (2)
Echo workers; the p50 of ``--calls`` (1500) sequential ``Client.call`` of its ``sleep``
method; then ``--burst`` (3000) requests submitted at once, each sleeping 1 ms, so that the
workers hold requests ahead and lend their sockets; then the p50 of ``--calls`` sequential
calls again. Run it from another checkout's folder (with this checkout's interpreter) to
measure that tree beside this one.

Usage::

    .venv/bin/python bench/after_burst.py
    .venv/bin/python bench/after_burst.py --sleep-ms 0 --calls 3000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _pool import REPO, measure, pool

sys.path.insert(0, REPO)
from workerpool import Client


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sleep-ms", type=float, nargs="+", default=[0.0, 1.0],
                    help="the sequential calls' handler time, ms (0 1)")
    ap.add_argument("--calls", type=int, default=1500, help="sequential calls each time (1500)")
    ap.add_argument("--burst", type=int, default=3000, help="requests in the burst (3000)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    return ap.parse_args()


def _p50_us(client: Client, seconds: float, calls: int) -> float:
    took = []
    for _ in range(calls):
        t0 = time.perf_counter()
        client.call("sleep", {"seconds": seconds})
        took.append(time.perf_counter() - t0)
    return statistics.median(took) * 1e6


def run(args: argparse.Namespace, workdir: str) -> list[dict]:
    rows = []
    for ms in args.sleep_ms:
        with pool(workdir, f"burst{ms:g}", workers=args.workers) as (_, front, _argv), \
                Client(front, timeout=60) as client:
            before = _p50_us(client, ms / 1000, args.calls)
            futures = [client.submit("sleep", {"seconds": 0.001}) for _ in range(args.burst)]
            for fut in futures:
                fut.result()
            after = _p50_us(client, ms / 1000, args.calls)
        rows.append({"sleep_ms": ms, "p50_before_us": round(before, 1),
                     "p50_after_us": round(after, 1)})
    return rows


def main() -> int:
    args = _parse()
    rows, status = measure(lambda wd: run(args, wd), "after-burst-")
    if rows is None:
        return status
    if args.json:
        print(json.dumps({"repo": REPO, "workers": args.workers, "rows": rows}, indent=2))
        return 0
    print(f"{REPO}: {args.workers} workers, defaults, {args.calls} sequential calls, "
          f"a burst of {args.burst} between")
    print(f"{'handler':>8} {'p50 before':>11} {'p50 after':>10} {'after/before':>13}")
    for r in rows:
        print(f"{r['sleep_ms']:>6g}ms {r['p50_before_us']:>9.0f}us {r['p50_after_us']:>8.0f}us "
              f"{r['p50_after_us'] / r['p50_before_us']:>12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
