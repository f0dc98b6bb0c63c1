#!/usr/bin/env python3
"""A well-behaved client's latency and the router's memory, quiet and then under a hostile
flood, side by side in one run.

::

    python -m workerpool.cli up --handler workerpool.handlers:Echo --workers 2
        ^ frontend: the measured client (echo, one call at a time, closed loop)
        ^ frontend + backend: --flooders processes sending tests/test_fuzz.py's messages
          (hypothesis batches and their mutants, plus its hand-made cases: 4 GiB length
          prefixes, 10,000-deep nesting, 10,000 frames, metas just under max_meta_bytes)

First each flooder draws its messages (enough for the flood at ``--rate``; 50,000 when
the rate is unlimited, replayed from the start when they run out) and waits. Phase 1,
quiet: ``--warmup`` then ``--duration`` seconds of the client alone. Phase 2, flood: the
flooders send, and after ``--warmup`` the client is measured again for ``--duration``
seconds. Each flooder reads and drops its replies, so none pile up in the router.
Reported: the client's calls, failures, p50 and p99 in each phase and the ratio of the
p99s (issue 12's goal: within 5x); the messages sent per socket; the router's RSS
(``VmRSS`` of ``/proc/<pid>/status``) before the flood, its peak (sampled every 0.1 s,
and ``VmHWM``) and after; the router's counters. ``--pings`` floods with well-formed
client pings instead: the cheapest message any client may send, to read a hostile
flood's figures against.

An attacker's CPU is not the pool's, and here the flooders share a small machine. So they
draw their messages before the measured phases (hypothesis's drawing was most of their
CPU: about 0.2 ms a message), and each runs in a session of its own at ``--nice`` 19.
The session matters: with autogroup scheduling, on by default in many Linux
distributions, the CPU is shared between sessions first, and a niced process in the
bench's session still took its session's full share from the pool. What remains is what
the messages cost the router.

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
from workerpool._proc import die_with_parent  # noqa: E402

CONFIG = "[router]\nmax_message_bytes = 67108864\n"


def _draw(index: int, count: int) -> list:
    """At least ``count`` hostile messages, ``(to the backend?, frames)``: hypothesis batches
    (rounds of 100, each round seeded from ``index``), and after every 20th batch the
    hand-made cases (the same objects each time, so 40 MiB of them are held once)."""
    from hypothesis import HealthCheck, given, seed, settings

    from tests import test_fuzz as tf

    hand_made = [(False, f) for f in tf._hand_made(False)] + \
        [(True, f) for f in tf._hand_made(True)]
    out: list = []
    batches = [0]

    def take(batch) -> None:
        if len(out) >= count:
            return  # the round's remaining examples pass quickly
        out.extend(tf._batch_messages(batch))
        batches[0] += 1
        if batches[0] % 20 == 0:
            out.extend(hand_made)

    rounds = 0
    while len(out) < count:
        seed(index * 1_000_003 + rounds)(settings(
            max_examples=100, deadline=None, database=None,
            suppress_health_check=list(HealthCheck))(given(tf._batches)(take)))()
        rounds += 1
    return out


def _pings(count: int) -> list:
    """``count`` well-formed client pings (HEARTBEAT), the cheapest message a router answers:
    the yardstick a hostile message's cost is read against."""
    from ipc import protocol
    from ipc.protocol import Kind

    return [(False, protocol.encode(Kind.HEARTBEAT, 1 + i, {})) for i in range(count)]


def _flood(frontend: str, backend: str, index: int, count: int, counts, ready, go, stop,
           rate: float, nice: int, pings: bool, parent: int) -> None:
    """One flooder process. It draws ``count`` messages (``_draw``) and sets ``ready``; once
    ``go`` is set it sends them, over again if it runs out, until ``stop`` is set: at most
    ``rate`` messages a second (0: as fast as it can), at scheduling priority ``nice``;
    client pings instead if ``pings``. Drawing first
    keeps hypothesis's own work, most of a flooder's CPU, out of the measured phases.
    ``counts[0]``/``[1]``: messages sent to the frontend/backend. It dies with ``parent``,
    the bench: in a session of its own, nothing else would end it."""
    die_with_parent(parent)
    _own_session(nice)
    from tests import test_fuzz as tf

    messages = _pings(count) if pings else _draw(index, count)
    ready.set()
    go.wait()
    front = tf.Hostile(frontend, 4)
    back = tf.Hostile(backend, 2)
    t0 = time.monotonic()
    i = 0
    try:
        while not stop.is_set():
            for j in range(64):
                to_backend, frames = messages[(i + j) % len(messages)]
                (back if to_backend else front).send(frames, j)
            i += 64
            front.drain()
            back.drain()
            counts[0], counts[1] = front.sent, back.sent
            if rate > 0:
                ahead = (front.sent + back.sent) / rate - (time.monotonic() - t0)
                if ahead > 0:
                    stop.wait(ahead)
    finally:
        counts[0], counts[1] = front.sent, back.sent
        front.close()
        back.close()


def _own_session(nice: int) -> None:
    """Take ``nice`` as a process of a session of its own. With autogroup scheduling (Linux's
    ``kernel.sched_autogroup_enabled``, on by default in many distributions) the CPU is
    shared first between sessions, each at its autogroup's nice, and a process's own nice
    only ranks it within its session: a niced flooder left in the bench's session would
    still take its share from the pool's session at full weight."""
    os.setsid()
    os.nice(nice)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:  # no autogroup in this kernel: the process's nice is what counts
        pass


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
        mp = multiprocessing.get_context("spawn")
        ready = [mp.Event() for _ in range(args.flooders)]
        go, stop = mp.Event(), mp.Event()
        counts = [mp.Array("q", 2) for _ in range(args.flooders)]
        # Enough for the flood phase at --rate, replayed from the start past that (and
        # when the rate is unlimited).
        count = int(args.rate * (args.warmup + args.duration + 10)) if args.rate else 50_000
        flooders = [mp.Process(target=_flood, daemon=True,
                               args=(frontend, backend, k, count, counts[k], ready[k], go,
                                     stop, args.rate, args.nice, args.pings, os.getpid()))
                    for k in range(args.flooders)]
        for p in flooders:
            p.start()
        try:
            for p, r in zip(flooders, ready, strict=True):
                if not r.wait(300) or not p.is_alive():
                    raise BenchError("a flooder did not draw its messages within 300 s")
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
            go.set()
            deadline = time.monotonic() + 60
            while not all(c[0] for c in counts):  # each has sent its first messages
                if time.monotonic() > deadline or not all(p.is_alive() for p in flooders):
                    raise BenchError("a flooder did not start sending within 60 s")
                time.sleep(0.05)
            _calls(client, args.warmup)
            flood = _summary(*_calls(client, args.duration))
        finally:
            stop.set()
            go.set()
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
    ap.add_argument("--pings", action="store_true",
                    help="flood with well-formed client pings instead, at the same rate: what "
                    "any client may send, to read the hostile flood's figures against")
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
        what = "well-formed pings" if args.pings else "hostile messages"
        print(f"{what}: {report['hostile_sent']} (flooders at nice {args.nice})")
        print(f"router RSS MiB: before {r['before']}, peak {r['peak']} (VmHWM {r['hwm']}), "
              f"after {r['after']}")
    return 0 if report["flood"]["failed"] == 0 and report["quiet"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
