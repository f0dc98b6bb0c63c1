"""Make the dashboard screenshot of docs/operations.md: a pool of 4 workers with
``--metrics``, two clients whose load rises and falls with a burst now and then (a few
requests failing), one worker killed with SIGKILL near the end, and the page at 1280x900.

    python -m tests.dashboard_screenshot [--seconds 150] [docs/img/dashboard.png]

Needs chromium (bin/system-packages); takes about ``--seconds``.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path

from tests.chromium import CHROMIUM, Chromium
from tests.conftest import Processes
from workerpool import Client

BURST_EVERY = 45.0  # seconds between bursts that fill the queue


def _load(address: str, seconds: float, stop: threading.Event) -> None:
    start = time.monotonic()
    with Client(address, timeout=30) as c:
        bursts = 0
        while not stop.is_set():
            elapsed = time.monotonic() - start
            # 4 to 28 requests at a time, in a slow wave; work of 2 to 12 ms.
            width = 16 + 12 * math.sin(2 * math.pi * elapsed / (seconds / 1.5))
            futures = [c.submit("sleep", {"seconds": 0.002 + 0.01 * (i % 4) / 3})
                       for i in range(max(4, int(width)))]
            if int(elapsed) % 7 == 0:
                futures.append(c.submit("raise_error"))
            if elapsed > (bursts + 1) * BURST_EVERY:
                bursts += 1
                futures += [c.submit("sleep", {"seconds": 0.01}) for _ in range(300)]
            for f in futures:
                f.exception(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="docs/img/dashboard.png")
    parser.add_argument("--seconds", type=float, default=150.0)
    args = parser.parse_args()
    if CHROMIUM is None:
        raise SystemExit("no chromium program (bin/system-packages installs Debian's)")
    procs = Processes()
    stop = threading.Event()
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        pool = procs.pool("--metrics", f"127.0.0.1:{port}", workers=4)
        # Two clients, so that one's requests run while the other waits for its last ones.
        loads = [threading.Thread(target=_load, args=(pool.address, args.seconds, stop),
                                  daemon=True) for _ in range(2)]
        for load in loads:
            load.start()
        time.sleep(args.seconds * 0.8)
        os.kill(pool.workers()["default/2"]["pid"], signal.SIGKILL)
        time.sleep(args.seconds * 0.2)
        browser = Chromium(procs.dir)
        try:
            browser.open(f"http://127.0.0.1:{port}/")
            browser.wait_for("document.querySelector('.death') !== null", what="the marker")
            browser.screenshot(Path(args.path))
            assert browser.exceptions == [], browser.exceptions
        finally:
            browser.close()
        stop.set()
        for load in loads:
            load.join(30)
    finally:
        stop.set()
        procs.cleanup()
    print(f"wrote {args.path}")


if __name__ == "__main__":
    main()
