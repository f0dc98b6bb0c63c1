#!/usr/bin/env python3
"""Throughput and latency across real network hops, with worker host b's link clean and
then slow and lossy, side by side in one run (needs root: the hosts are network
namespaces, as in tests/test_multihost.py).

::

    host r: workerpool router (CURVE on; the client reaches it through an ipc:// socket)
    host a: workerpool worker --node a   (2 workers)   clean link in both phases
    host b: workerpool worker --node b   (2 workers)   phase 1 clean; phase 2 through
            tests/relay.py (--delay seconds each way) and nftables dropping --loss percent

Each phase: ``--requests`` calls of a handler that sleeps ``--service-ms``, ``--outstanding``
at a time (a new one as soon as any is answered). Printed per phase: req/s, p50 and p99,
the share each host served; and the ratio of the phases.

    .venv/bin/python bench/multihost.py --requests 2000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._pool import BenchError, nearest_rank  # noqa: E402
from ipc.curve import init_keys  # noqa: E402
from tests import netns  # noqa: E402
from tests.conftest import Processes  # noqa: E402


def _phase(name: str, driven: netns.Driven) -> dict:
    lat = sorted(driven.latencies)
    hosts = {h: sum(r.split("/")[1] == h for r in driven.results) for h in ("a", "b")}
    return {"phase": name, "req_s": round(driven.rate, 1),
            "p50_ms": round(nearest_rank(lat, 0.50) * 1000, 2),
            "p99_ms": round(nearest_rank(lat, 0.99) * 1000, 2), "by_host": hosts}


def run(args: argparse.Namespace) -> list[dict]:
    if why := netns.unavailable() or netns.loss_unavailable():
        raise BenchError(why)
    netns.sweep()
    procs = Processes()
    hosts = netns.Hosts(("a", "b"))
    try:
        keys = procs.dir / "keys"
        init_keys(keys)
        toml = "[router]\nheartbeat_interval = 0.5\nheartbeat_liveness = 6\n"
        c = netns.Cluster(procs, hosts, procs.config(toml), str(keys))
        c.start_router()
        c.start_node("a")
        b = c.start_node("b")
        c.router.wait_for(lambda s: sum(w["state"] == "ready" for w in s["workers"]) == 4,
                          what="4 workers on 2 hosts")
        rows = []
        with c.client(timeout=60) as client:
            seconds = args.service_ms / 1000
            netns.drive(client, 100, args.outstanding, seconds)  # warm-up
            rows.append(_phase("clean", netns.drive(client, args.requests, args.outstanding,
                                                    seconds)))
            b.stop()
            c.router.wait_for(lambda s: sum(w["state"] == "ready" for w in s["workers"]) == 2,
                              what="b gone")
            via = c.start_relay("b", args.delay)
            hosts.lose("b", args.loss)
            c.start_node("b", via=via)
            c.router.wait_for(lambda s: sum(w["state"] == "ready" for w in s["workers"]) == 4,
                              what="b back through the relay")
            netns.drive(client, 100, args.outstanding, seconds)
            rows.append(_phase(f"b: {args.delay * 1000:.0f} ms each way, {args.loss}% loss",
                               netns.drive(client, args.requests, args.outstanding, seconds)))
        return rows
    finally:
        procs.cleanup()
        hosts.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--outstanding", type=int, default=8)
    ap.add_argument("--service-ms", type=float, default=5.0)
    ap.add_argument("--delay", type=float, default=0.05, help="seconds each way on b's path")
    ap.add_argument("--loss", type=int, default=2, help="percent of b's packets dropped")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        rows = run(args)
    except BenchError as exc:
        print(f"multihost: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'phase':<34} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>9}  by host")
    for r in rows:
        print(f"{r['phase']:<34} {r['req_s']:>8.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>9.2f}  "
              f"{r['by_host']}")
    print(f"slow, lossy / clean: {rows[1]['req_s'] / rows[0]['req_s']:.2f}x req/s, "
          f"p50 {rows[1]['p50_ms'] / rows[0]['p50_ms']:.2f}x, "
          f"p99 {rows[1]['p99_ms'] / rows[0]['p99_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
