"""A new pool's first seconds: req/s in each half second after ``workerpool ready``.

A pool with the defaults (2 Echo workers, ``max_inflight`` 1, ``prefetch`` 1) is driven
from the moment it says it is ready by a bare ``Client.submit`` loop keeping
``--outstanding`` requests in flight, for ``--seconds``. Each completion is stamped; the
script prints how many completed in each half second, as req/s. What each worker holds
ahead is sized from its node's round trip and its handler time (protocol.md 7.1), so the
first half seconds show how soon that sizing starts.

``--repo`` runs another checkout of workerpool (its pool and its client) with this same
driver, so two trees are compared: run both in turn, alternating, with nothing else
running::

    .venv/bin/python bench/startup.py --rounds 2
    .venv/bin/python bench/startup.py --rounds 2 --repo ../other-checkout
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

BIN = 0.5  # seconds per figure


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds driven (default 4)")
    ap.add_argument("--outstanding", type=int, default=256, help="requests in flight (256)")
    ap.add_argument("--rounds", type=int, default=1, help="fresh pools, one after another (1)")
    ap.add_argument("--repo", default=None, help="the workerpool checkout to run (default: this)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    if args.seconds <= 0 or args.outstanding < 1 or args.rounds < 1:
        ap.error("--seconds must be > 0, --outstanding and --rounds >= 1")
    return args


ARGS = _parse()
REPO = os.path.abspath(ARGS.repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = REPO + (os.pathsep + os.environ["PYTHONPATH"]
                                   if os.environ.get("PYTHONPATH") else "")

import _pool  # noqa: E402  (bench/, beside this script)

from workerpool import Client  # noqa: E402  (from --repo)


def one_pool(workdir: str, n: int) -> list[float]:
    """req/s in each BIN seconds of one fresh pool's first ``--seconds``."""
    with _pool.pool(workdir, f"startup{n}") as (_, frontend, _argv), Client(frontend) as client:
        permits = threading.Semaphore(ARGS.outstanding)
        stamps: list[float] = []

        def finished(_fut: object) -> None:
            stamps.append(time.monotonic())
            permits.release()

        start = time.monotonic()
        end = start + ARGS.seconds
        while time.monotonic() < end:
            if permits.acquire(timeout=0.2):
                client.submit("echo", {"i": 1}).add_done_callback(finished)
        bins = [0] * int(ARGS.seconds / BIN)
        for t in list(stamps):
            k = int((t - start) / BIN)
            if k < len(bins):
                bins[k] += 1
        drained = time.monotonic() + 10  # the last replies, before the client closes
        for _ in range(ARGS.outstanding):
            if not permits.acquire(timeout=max(0.0, drained - time.monotonic())):
                break
    return [b / BIN for b in bins]


def main() -> int:
    rounds, code = _pool.measure(
        lambda workdir: [one_pool(workdir, n) for n in range(ARGS.rounds)], "wp-startup-")
    if rounds is None:
        return code
    medians = [statistics.median(col) for col in zip(*rounds, strict=True)]
    if ARGS.json:
        print(json.dumps({"repo": REPO, "bin_s": BIN, "outstanding": ARGS.outstanding,
                          "rounds": rounds, "median_req_per_s": medians}))
        return 0
    print(f"{REPO}: req/s in each {BIN:g} s after the pool is ready "
          f"({ARGS.outstanding} outstanding, defaults)")
    print("  from s   " + " ".join(f"{k * BIN:>7.1f}" for k in range(len(medians))))
    for n, r in enumerate(rounds):
        print(f"  round {n + 1}  " + " ".join(f"{x:>7,.0f}" for x in r))
    if len(rounds) > 1:
        print("  median   " + " ".join(f"{x:>7,.0f}" for x in medians))
    return 0


if __name__ == "__main__":
    sys.exit(main())
