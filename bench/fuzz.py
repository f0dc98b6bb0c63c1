#!/usr/bin/env python3
"""A well-behaved client's latency and the router's memory, quiet and then under a hostile
flood, side by side in one run.

::

    python -m workerpool.cli up --handler workerpool.handlers:Echo --workers 2
        ^ frontend: the measured client (echo, one call at a time, closed loop)
        ^ frontend + backend: --flooders processes sending tests/test_fuzz.py's messages
          (hypothesis batches and their mutants, plus its hand-made cases: 4 GiB length
          prefixes, 10,000-deep nesting, 10,000 frames, metas just under max_meta_bytes)

Phase 1, quiet: ``--warmup`` then ``--duration`` seconds of the client alone. Phase 2,
flood: the flooders start, and after ``--warmup`` the client is measured again for
``--duration`` seconds. Each flooder reads and drops its replies, so none pile up in the
router. Reported: the client's calls, failures, p50 and p99 in each phase and the ratio of
the p99s (issue 12's goal: within 5x); the hostile messages sent per socket; the router's
RSS (``VmRSS`` of ``/proc/<pid>/status``) before the flood, its peak (sampled every 0.1 s,
and ``VmHWM``) and after; the router's counters.

An attacker's CPU is not the pool's. Here the flooders share the machine, so they run at
``--nice`` 19 by default: what remains is what their messages cost the router. At
``--nice 0`` on a machine with fewer cores than the flooders, router, workers and client
need, the ratio measures that contention too (a flood of well-formed pings at the same
rate took the p99 to 3.2x on 2 cores). ``--rate`` caps the flood.

    .venv/bin/python bench/fuzz.py --duration 15 --flooders 1 --rate 2000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._pool import BenchError, measure, nearest_rank, pool  # noqa: E402
from workerpool import Client  # noqa: E402

CONFIG = "[router]\nmax_message_bytes = 67108864\n"


def _flood(frontend: str, backend: str, index: int, counts, stop, rate: float,
           nice: int) -> None:
    """One flooder process: hypothesis batches (seeded by ``index``), and every 20th batch
    the hand-made cases, until ``stop`` is set; at most ``rate`` messages a second (0: as
    fast as it can), at scheduling priority ``nice``. ``counts[0]``/``[1]``: messages sent
    to the frontend/backend."""
    os.nice(nice)
    from hypothesis import HealthCheck, given, seed, settings

    from tests import test_fuzz as tf

    front = tf.Hostile(frontend, 4)
    back = tf.Hostile(backend, 2)
    hand_made = [(False, f) for f in tf._hand_made(False)] + \
        [(True, f) for f in tf._hand_made(True)]
    batches = [0]
    t0 = time.monotonic()

    def send_batch(batch):
        if stop.is_set():
            return  # the round's remaining examples pass quickly
        messages = list(tf._batch_messages(batch))
        batches[0] += 1
        if batches[0] % 20 == 0:
            messages += hand_made
        for j, (to_backend, frames) in enumerate(messages):
            (back if to_backend else front).send(frames, j)
            if j % 64 == 63:
                front.drain()
                back.drain()
        front.drain()
        back.drain()
        counts[0], counts[1] = front.sent, back.sent
        if rate > 0:
            ahead = (front.sent + back.sent) / rate - (time.monotonic() - t0)
            if ahead > 0:
                stop.wait(ahead)

    try:
        rounds = 0
        while not stop.is_set():  # rounds of 100 batches, each round with its own seed
            seed(index * 1_000_003 + rounds)(settings(
                max_examples=100, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))(given(tf._batches)(send_batch)))()
            rounds += 1
    finally:
        counts[0], counts[1] = front.sent, back.sent
        front.close()
        back.close()


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _calls(client: Client, seconds: float) -> tuple[list[float], int]:
    """Echo calls one at a time for ``seconds``: (latencies in seconds, failures)."""
    latencies, failures, i = [], 0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            if client.call("echo", i) != i:
                failures += 1
        except Exception:  # a failed call is what is counted here
            failures += 1
        latencies.append(time.perf_counter() - t0)
        i += 1
    return latencies, failures


def _summary(latencies: list[float], failures: int) -> dict:
    lat = sorted(latencies)
    return {"calls": len(lat), "failed": failures,
            "p50_ms": round(nearest_rank(lat, 0.50) * 1000, 3) if lat else None,
            "p99_ms": round(nearest_rank(lat, 0.99) * 1000, 3) if lat else None}


def run(args: argparse.Namespace, workdir: str) -> dict:
    with pool(workdir, "fuzz", workers=args.workers, config=CONFIG) as (_, frontend, _argv):
        return _phases(frontend, args)


def _phases(frontend: str, args: argparse.Namespace) -> dict:
    with Client(frontend, timeout=30) as client:
        st = client.status()
        pid, backend = st["router"]["pid"], st["router"]["backend"]
        _calls(client, args.warmup)
        quiet = _summary(*_calls(client, args.duration))
        rss_before = _rss_kib(pid)
        peak = [rss_before]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.1):
                peak[0] = max(peak[0], _rss_kib(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        mp = multiprocessing.get_context("spawn")
        stop = mp.Event()
        counts = [mp.Array("q", 2) for _ in range(args.flooders)]
        flooders = [mp.Process(target=_flood, daemon=True,
                               args=(frontend, backend, k, counts[k], stop, args.rate,
                                     args.nice))
                    for k in range(args.flooders)]
        for p in flooders:
            p.start()
        try:
            deadline = time.monotonic() + 60
            while not all(c[0] for c in counts):  # each has sent its first batch
                if time.monotonic() > deadline or not all(p.is_alive() for p in flooders):
                    raise BenchError("a flooder did not start sending within 60 s")
                time.sleep(0.05)
            _calls(client, args.warmup)
            flood = _summary(*_calls(client, args.duration))
        finally:
            stop.set()
            for p in flooders:
                p.join(30)
                if p.is_alive():
                    p.terminate()
                    p.join(5)
        time.sleep(1.0)  # the router finishes what the flooders left queued
        sampling.set()
        sampler.join()
        counters = client.status()["router"]["counters"]
        rss_after = _rss_kib(pid)
        hwm = _rss_kib(pid, "VmHWM")
    ratio = (flood["p99_ms"] / quiet["p99_ms"]) if quiet["p99_ms"] and flood["p99_ms"] else None
    return {
        "quiet": quiet, "flood": flood,
        "p99_ratio": round(ratio, 2) if ratio else None,
        "hostile_sent": {"frontend": sum(c[0] for c in counts),
                         "backend": sum(c[1] for c in counts)},
        "router_rss_mib": {"before": round(rss_before / 1024, 1),
                           "peak": round(peak[0] / 1024, 1),
                           "hwm": round(hwm / 1024, 1),
                           "after": round(rss_after / 1024, 1)},
        "router_counters": counters,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds measured per phase")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds before each measurement")
    ap.add_argument("--flooders", type=int, default=2, help="hostile processes")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="messages a second per flooder (0: as fast as it can)")
    ap.add_argument("--nice", type=int, default=19,
                    help="the flooders' niceness: an attacker's CPU is its own machine's; on one "
                    "small machine, at 0 the flooders' own work (drawing examples) takes CPU "
                    "from the router, workers and client, and the ratio measures that too")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()
    report, status = measure(lambda workdir: run(args, workdir), "wp-fuzz-")
    if report is None:
        return status
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        q, f, r = report["quiet"], report["flood"], report["router_rss_mib"]
        print(f"quiet:   {q['calls']} calls, {q['failed']} failed, p50 {q['p50_ms']} ms, "
              f"p99 {q['p99_ms']} ms")
        print(f"flood:   {f['calls']} calls, {f['failed']} failed, p50 {f['p50_ms']} ms, "
              f"p99 {f['p99_ms']} ms")
        print(f"p99 flood / quiet: {report['p99_ratio']} (goal: <= 5)")
        print(f"hostile messages: {report['hostile_sent']} (flooders at nice {args.nice})")
        print(f"router RSS MiB: before {r['before']}, peak {r['peak']} (VmHWM {r['hwm']}), "
              f"after {r['after']}")
    return 0 if report["flood"]["failed"] == 0 and report["quiet"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
