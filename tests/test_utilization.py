"""Utilization: the share of wall time a worker's handler runs (workerpool.busy), carried by
its heartbeats, shown by status per worker and per service, and by the loadtest report."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from router.health import BusySamples
from tests.conftest import _env
from workerpool import Client
from workerpool.busy import BusyMeter


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_busy_meter_counts_handler_time_and_a_run_in_progress():
    clock = _Clock()
    m = BusyMeter(clock)
    clock.t += 2.0
    m.begin()
    clock.t += 1.0
    m.end()
    assert m.sample() == (1.0, 3.0)
    m.begin()
    clock.t += 0.5
    assert m.sample() == (1.5, 3.5)  # read by the heartbeat thread mid-run
    m.end()
    m.end()  # an end without a begin (a handler that raised after end) adds nothing
    clock.t += 0.5
    assert m.sample() == (1.5, 4.0)


def test_busy_samples_give_the_recent_and_overall_fraction():
    s = BusySamples()
    assert s.recent() is None and s.since_start() is None
    s.add([0.5, 1.0])  # its first beat: the fraction since it became ready
    assert s.recent() == 0.5 and s.since_start() == 0.5
    for k in range(2, 12):  # then fully busy
        s.add([0.5 + (k - 1), float(k)])
    assert s.recent() == 1.0  # the window holds only the busy beats
    assert s.since_start() == round(10.5 / 11, 3)


def test_busy_samples_ignore_what_is_not_a_sample():
    s = BusySamples()
    s.add([1.0, 2.0])
    for bad in (None, "x", [1], [1.0, 2.0, 3.0], ["a", 3.0], [True, 3.0],
                [0.5, 3.0],  # busy time going back
                [1.5, 1.5],  # wall time not moving forward
                [9.0, 3.0]):  # busier than the wall time allows
        s.add(bad)
    assert s.since_start() == 0.5 and s.recent() == 0.5


def test_status_shows_utilization_per_worker_and_service(procs):
    pool = procs.pool(workers=1)
    idle = pool.status()
    stop = threading.Event()

    def load() -> None:
        with Client(pool.address, timeout=30) as c:
            while not stop.is_set():
                c.call("sleep", {"seconds": 0.05})

    t = threading.Thread(target=load)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            busy = pool.status()
            if (busy["workers"][0]["utilization"] or 0) > 0:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        t.join(30)
    w = busy["workers"][0]
    assert 0 < w["utilization"] <= 1 and 0 < w["utilization_since_start"] <= 1
    assert busy["services"][0]["utilization"] == w["utilization"]  # its only worker
    assert idle["workers"][0]["utilization"] in (None, 0.0)  # nothing ran yet
    table = subprocess.run([sys.executable, "-m", "workerpool.cli", "status", "--router",
                            pool.address], capture_output=True, text=True, timeout=30,
                           env=_env())
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert "UTILIZATION" in header and "%" in row
    assert "utilization=" in table.stdout
    raw = subprocess.run([sys.executable, "-m", "workerpool.cli", "status", "--json", "--router",
                          pool.address], capture_output=True, text=True, timeout=30,
                         env=_env())
    assert "utilization" in json.loads(raw.stdout)["workers"][0]
