"""Large payloads: workerpool against a raw zmq echo and ProcessPoolExecutor, per size.

For each ``--sizes`` entry (default 1 MiB and 16 MiB) the three systems of
bench/throughput.py (``wp64``, ``direct``, ``ppe``; the broker baseline speaks only small
maps) echo that many random bytes, closed loop with ``--outstanding`` (default 4)
requests in flight, and the script prints req/s, MiB/s (payload bytes echoed per
second, each request carries them both ways), latency and the ratios.

    .venv/bin/python bench/large_payload.py --duration 5
    .venv/bin/python bench/large_payload.py --sizes 65536,1048576 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import _pool
import throughput

DEFAULT_SIZES = "1048576,16777216"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"payload sizes in bytes "
                    f"(default {DEFAULT_SIZES})")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per system")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    ap.add_argument("--outstanding", type=int, default=4, help="requests kept in flight")
    ap.add_argument("--systems", default="wp64,wp64np,direct,ppe",
                    help="comma-separated subset of wp1,wp64,wp64np,direct,ppe (default "
                         "wp64,wp64np,direct,ppe; wp64np sends the bytes as a numpy array)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes {args.sizes!r}: comma-separated byte counts")
    if not sizes or min(sizes) <= 0 or args.duration <= 0 or args.outstanding < 1:
        ap.error("--sizes must be > 0, --duration > 0, --outstanding >= 1")
    keys = throughput.parse_systems(ap, args.systems)
    if "broker" in keys:
        ap.error("the broker baseline speaks {'i': n} maps only")

    def measure_sizes(workdir: str) -> dict:
        runs = {}
        for size in sizes:
            ns = argparse.Namespace(duration=args.duration, warmup=args.warmup,
                                    outstanding=args.outstanding, payload_size=size)
            results = throughput.run_systems(keys, ns, args.json, workdir)
            # The throughput issue's goals are for small requests: no verdicts here.
            rats = [{**r, "goal": None, "met": None} for r in throughput.ratios(results)]
            runs[size] = (results, rats)
        return runs

    runs, code = _pool.measure(measure_sizes, "wp-large-")
    if runs is None:
        return code

    if args.json:
        print(json.dumps({
            "config": {"duration_s": args.duration, "warmup_s": args.warmup,
                       "outstanding": args.outstanding, **throughput.environment()},
            "sizes": {str(size): {"results": {n: asdict(r) for n, r in res.items()},
                                  "mib_per_s": {n: round(r.req_per_s * size / 2**20, 1)
                                                for n, r in res.items()},
                                  "ratios": rats}
                      for size, (res, rats) in runs.items()},
        }, indent=2))
        return 0
    print(f"closed loop, {args.outstanding} outstanding, echo of random bytes, "
          f"{throughput.WORKERS} workers, {args.duration:g}s measured after {args.warmup:g}s "
          f"warm-up, {os.cpu_count()} CPUs, load average now {os.getloadavg()[0]:.2f}")
    for size, (res, rats) in runs.items():
        print(f"\n== {size:,} bytes ({size / 2**20:g} MiB) ==")
        print(throughput.format_table(res, rats, size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
