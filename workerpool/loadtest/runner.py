"""One load test from start to report.

::

    probe the router (STATUS) --> sources: this process, or --procs generator processes
        --> all start at one t0 --> every TICK: progress bar, Ctrl-C stops the load
        --> Monitor: status samples, faults injected at their offsets
        --> recordings merged --> report.build() --> the report dict

Ctrl-C stops sending; what is outstanding still gets its replies and the report covers
what ran. A second Ctrl-C abandons the run.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

from workerpool.client import Client
from workerpool.errors import WorkerPoolError
from workerpool.loadtest import report as reports
from workerpool.loadtest.driver import Progress
from workerpool.loadtest.inject import STATUS_TIMEOUT, Monitor
from workerpool.loadtest.payload import LoadTestError, make_payload
from workerpool.loadtest.progress import ProgressDisplay
from workerpool.loadtest.schedule import Share
from workerpool.loadtest.sources import TICK, ChildSource, LocalSource
from workerpool.loadtest.spec import LoadSpec

PROBE_TIMEOUT = 5.0
START_MARGIN = 0.05  # seconds between the go and t0, so every source starts on time
START_MARGIN_PROCS = 0.3


def run(spec: LoadSpec, *, progress: bool | None = None) -> dict[str, Any]:
    """Run ``spec`` against its router and return the report (see report.py).

    ``progress``: show the live bar (None: when stderr is a terminal). Raises
    LoadTestError when the run cannot start or a generator fails.
    """
    seed = spec.seed if spec.seed is not None else int.from_bytes(os.urandom(4), "big")
    make_payload(spec, seed)  # a payload that cannot be sent fails before anything starts
    status = probe(spec.router, spec.client_keys())
    services = None if any(m.service is None for m in spec.methods) else frozenset(
        m.service for m in spec.methods)
    known = [w["id"] for w in status.get("workers", [])
             if services is None or w.get("service") in services]
    notes = []
    if not any(w.get("state") in ("ready", "busy") for w in status.get("workers", [])):
        notes.append("no worker was serving when the run started")
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    sources: list[Any] = []
    monitor = Monitor(spec.router, spec.faults, seed, services, spec.client_keys(admin=True))
    interrupted = False
    try:
        if spec.procs == 1:
            sources.append(LocalSource(spec, seed))
        else:
            sources.extend(ChildSource(spec, Share(i, spec.procs), seed) for i in range(spec.procs))
        for s in sources:
            s.wait_ready()
        t0 = time.monotonic() + (START_MARGIN if spec.procs == 1 else START_MARGIN_PROCS)
        monitor.start(t0)
        for s in sources:
            s.start(t0)
        with ProgressDisplay(spec, progress) as bar:
            while True:
                try:
                    time.sleep(TICK)
                    parts = [s.progress() for s in sources]
                    p = parts[0] if len(parts) == 1 else Progress.combine(parts)
                    bar.update(p, monitor.serving)
                    if p.done:
                        break
                except KeyboardInterrupt:
                    if interrupted:
                        raise
                    interrupted = True
                    for s in sources:
                        s.stop()
        elapsed = time.monotonic() - t0
        recs = [s.result() for s in sources]
    finally:
        monitor.stop()
        for s in sources:
            s.close()
    rec = recs[0]
    for other in recs[1:]:
        rec.merge(other)
    if monitor.error is not None:
        notes.append(f"the status monitor failed: {monitor.error!r}")
    if monitor.poll_errors:
        notes.append(f"{monitor.poll_errors} status poll(s) got no answer within "
                     f"{STATUS_TIMEOUT:g}s")
    return reports.build(spec, seed, rec, faults=[r.to_dict() for r in monitor.results],
                         serving=monitor.samples, known_workers=known, started_at=started_at,
                         elapsed=elapsed, interrupted=interrupted, notes=notes)


def probe(router: str, keys: dict | None = None) -> dict:
    """The router's status, or LoadTestError when it does not answer."""
    with Client(router, **(keys or {})) as c:
        try:
            return c.status(timeout=PROBE_TIMEOUT)
        except WorkerPoolError as exc:
            raise LoadTestError(f"no router answered at {router} within {PROBE_TIMEOUT:g}s "
                                f"({exc.type}); is the pool up?") from None

