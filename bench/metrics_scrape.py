"""What ``--metrics`` costs: a no-op pool without it, with it, and with it scraped every second.

Each round starts ``workerpool up`` (2 Echo workers, ``max_inflight`` 64) three times, in an
order that turns each round:

- ``off``: no ``--metrics``;
- ``on``: ``--metrics`` (the router counts every request and message), nobody scrapes;
- ``scraped``: ``--metrics``, and a thread GETs ``--pages`` (``/metrics``: what Prometheus
  fetches; add ``/api/status`` for what the dashboard fetches too) every
  ``--scrape-interval`` seconds (1).

For each, a bare ``Client.submit`` loop keeps ``--outstanding`` requests in flight for
``--duration`` seconds (after ``--warmup``); the figure is completed requests per second,
the median over ``--rounds``. The ratios are over ``off`` (below 1 is the cost).

Separate pools differ by several per cent from one start to the next on a small machine,
more than a scrape costs. So ``scraped`` is also measured paired: in its own pool,
``--window``-second windows alternate between scraping and not, and ``scrape cost`` is the
ratio of the two sums (the same pool, the same minutes). Run it with nothing else on the
machine::

    .venv/bin/python bench/metrics_scrape.py --rounds 5 --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _pool import BenchError, measure, pool
from curve import _throughput

from workerpool import Client

SYSTEMS = ("off", "on", "scraped")


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds measured (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds first (default 1)")
    ap.add_argument("--outstanding", type=int, default=256, help="requests in flight (256)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the three (default 3)")
    ap.add_argument("--scrape-interval", type=float, default=1.0,
                    help="seconds between scrapes in 'scraped' (default 1)")
    ap.add_argument("--window", type=float, default=1.0,
                    help="seconds per paired window in the scraped pool (default 1)")
    ap.add_argument("--pages", default="/metrics",
                    help="comma-separated pages each scrape GETs (default /metrics)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap.parse_args()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scraper:
    """GET ``pages`` every ``interval`` seconds on its own thread."""

    def __init__(self, port: int, interval: float, pages: list[str]) -> None:
        self.urls = [f"http://127.0.0.1:{port}{page}" for page in pages]
        self.interval = interval
        self.scrapes = 0
        self.seconds = 0.0  # spent waiting for answers, in all
        self.error: Exception | None = None
        self.active = threading.Event()  # scrapes only while set
        self.active.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise BenchError(f"a scrape failed: {self.error!r}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.active.is_set():
                continue
            t = time.perf_counter()
            try:
                for url in self.urls:
                    with urllib.request.urlopen(url, timeout=10) as resp:
                        resp.read()
            except OSError as exc:
                self.error = exc
                return
            self.seconds += time.perf_counter() - t
            self.scrapes += 1


def _run_one(workdir: str, system: str, args: argparse.Namespace) -> dict:
    port = _free_port()
    flags = ["--max-inflight", "64"] + (["--metrics", str(port)] if system != "off" else [])
    with pool(workdir, system, flags=flags) as (_, frontend, _argv), Client(frontend) as c:
        _throughput(c, args.outstanding, args.warmup)
        if system != "scraped":
            return {"throughput_rps": _throughput(c, args.outstanding, args.duration)}
        with Scraper(port, args.scrape_interval, args.pages.split(",")) as scraper:
            rps = _throughput(c, args.outstanding, args.duration)
            paired = {True: [], False: []}  # scraping -> req/s of each window
            for i in range(2 * max(1, round(args.duration / args.window))):
                scraping = i % 4 in (1, 2)  # off, on, on, off: neither side always first
                if scraping:
                    scraper.active.set()
                else:
                    scraper.active.clear()
                paired[scraping].append(_throughput(c, args.outstanding, args.window))
        return {"throughput_rps": rps, "scrapes": scraper.scrapes,
                "scrape_ms": 1000 * scraper.seconds / max(1, scraper.scrapes),
                "paired_ratio": sum(paired[True]) / sum(paired[False])}


def _work(args: argparse.Namespace):
    def run(workdir: str) -> dict:
        rounds: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
        for i in range(args.rounds):
            k = i % len(SYSTEMS)
            for system in SYSTEMS[k:] + SYSTEMS[:k]:
                rounds[system].append(_run_one(workdir, system, args))
        median = {s: statistics.median(r["throughput_rps"] for r in rounds[s]) for s in SYSTEMS}
        return {"rounds": rounds, "median_rps": median,
                "ratio": {s: median[s] / median["off"] for s in SYSTEMS if s != "off"},
                "scrape_cost": statistics.median(r["paired_ratio"] for r in rounds["scraped"])}
    return run


def main() -> int:
    args = _parse()
    result, code = measure(_work(args), "wp-metrics-")
    if result is None:
        return code
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'':8} {'req/s':>10} {'/off':>7}")
    for system in SYSTEMS:
        rps = result["median_rps"][system]
        print(f"{system:8} {rps:>10.0f} {rps / result['median_rps']['off']:>7.3f}")
    scraped = result["rounds"]["scraped"]
    ms = statistics.median(r["scrape_ms"] for r in scraped)
    print(f"scrape cost, paired in one pool: req/s scraped / not scraped = "
          f"{result['scrape_cost']:.3f}")
    print(f"(median of {args.rounds} rounds, {args.outstanding} outstanding; a scrape of "
          f"{' and '.join(args.pages.split(','))} took {ms:.1f} ms, every "
          f"{args.scrape_interval:g}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
