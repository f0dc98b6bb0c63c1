"""Watching the pool during a run, and injecting faults into it the way an operator would.

::

    [monitor thread] --Client.status()--> router: workers' states and pids, every 0.25 s
         |                                 (every 0.05 s while a fault has not recovered)
         +-- at each fault's offset: pick a random serving worker from the status table
               (one holding requests, when there is one)
               kill    -> os.kill(pid, SIGKILL)     (`kill -9 PID`)
               stop    -> os.kill(pid, SIGSTOP)     (`kill -STOP PID`)
               restart -> Client.restart_worker()   (`workerpool restart WORKER`)

``kill`` and ``stop`` signal the pid from the status table, so they need the loadtest on
the workers' host; the pid is checked to be a local workerpool worker first, so no other
process is ever signalled. ``restart`` goes through the router and works from anywhere.
A stopped worker is left to the pool's own hang detection (missed heartbeats); one still
stopped when the run ends is resumed (SIGCONT), so nothing is left frozen.

For each fault the monitor reports, from the status polls (resolution: one poll):

- ``detected_s``: injection -> the first poll where the victim's slot is no longer serving
  with the victim pid (it is dead, restarting, or serving as a new process);
- ``pool_recovered_s``: injection -> the first poll where the victim's slot serves again
  (state ready or busy) as a new process, and its service has as many serving workers as
  just before the fault (back at full strength).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from workerpool.client import Client
from workerpool.errors import WorkerPoolError
from workerpool.loadtest.spec import Fault

SERVING = frozenset({"ready", "busy"})
POLL = 0.25  # seconds between status polls
FAST_POLL = 0.05  # while an injected fault has not recovered
STATUS_TIMEOUT = 2.0
_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


@dataclass
class FaultResult:
    """One fault: what was planned, what was done, and how the pool came back."""

    kind: str
    at_s: float  # planned offset into the run
    injected_at_s: float | None = None  # when it was done (None: not done, see error)
    worker: str | None = None
    pid: int | None = None
    service: str | None = None
    serving_before: int | None = None  # serving workers of the service just before
    detected_s: float | None = None
    pool_recovered_s: float | None = None
    cause: str | None = None  # the victim slot's last_error as the router recorded it
    error: str | None = None  # why it could not be injected

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Monitor:
    """Polls the router's status through a run; injects ``faults`` at their offsets."""

    def __init__(self, router: str, faults: list[Fault], seed: int,
                 services: frozenset[str] | None, keys: dict | None = None) -> None:
        self.results = [FaultResult(f.kind, f.at) for f in faults]
        # (offset, serving, slots, utilization): the last is the mean busy fraction of the
        # serving workers that reported one (None before any did).
        self.samples: list[tuple[float, int, int, float | None]] = []
        self.poll_errors = 0
        self._services = services
        self._rng = random.Random(f"{seed}/faults")
        self._client = Client(router, **(keys or {}))
        self._stop = threading.Event()
        self._stopped: list[tuple[int, str]] = []  # (pid, /proc start time) we SIGSTOPped
        self._t0 = 0.0
        self._thread = threading.Thread(target=self._loop, name="loadtest-monitor", daemon=True)
        self.error: BaseException | None = None

    def start(self, t0: float) -> None:
        self._t0 = t0
        self._thread.start()

    def stop(self) -> None:
        """End the polling; resume any worker still stopped by a ``stop`` fault."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(STATUS_TIMEOUT + 5)
        for pid, started in self._stopped:
            if _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        self._client.close()

    @property
    def serving(self) -> tuple[int, int] | None:
        """(serving workers, slots) at the last poll."""
        return self.samples[-1][1:3] if self.samples else None

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            pending = list(self.results)
            if self._stop.wait(max(0.0, self._t0 - time.monotonic())):
                return
            while not self._stop.is_set():
                while pending and pending[0].at_s <= self._now():
                    self._inject(pending.pop(0))
                st = self._status()
                if st is not None:
                    self._observe(st, self._now())
                fast = any(r.injected_at_s is not None and r.pool_recovered_s is None
                           for r in self.results)
                wait = FAST_POLL if fast else POLL
                if pending:
                    wait = min(wait, max(0.0, pending[0].at_s - self._now()))
                self._stop.wait(wait)
        except BaseException as exc:  # reported by the runner, never silently lost
            self.error = exc

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _status(self) -> dict | None:
        try:
            return self._client.status(timeout=STATUS_TIMEOUT)
        except WorkerPoolError:
            self.poll_errors += 1
            return None

    def _observe(self, st: dict, now: float) -> None:
        workers = st.get("workers", [])
        serving = [w for w in workers if w["state"] in SERVING]
        busy = [u for w in serving if (u := w.get("utilization")) is not None]
        util = round(sum(busy) / len(busy), 3) if busy else None
        self.samples.append((round(now, 3), len(serving), len(workers), util))
        rows = {w["id"]: w for w in workers}
        for r in self.results:
            if r.injected_at_s is None or r.pool_recovered_s is not None or r.error:
                continue
            w = rows.get(r.worker or "")
            if w is None:
                continue
            same = w["state"] in SERVING and w.get("pid") == r.pid
            if r.detected_s is None and not same:
                r.detected_s = round(now - r.injected_at_s, 3)
            if w["state"] in SERVING and w.get("pid") != r.pid:
                back = sum(1 for x in serving if x["service"] == r.service)
                if back >= (r.serving_before or 0):
                    r.pool_recovered_s = round(now - r.injected_at_s, 3)
                    last = (w.get("last_error") or "").strip().splitlines()
                    r.cause = last[-1] if last else None

    def _inject(self, r: FaultResult) -> None:
        st = self._status()
        if st is None:
            r.error = "the router did not answer STATUS, so no worker could be picked"
            return
        workers = st.get("workers", [])
        candidates = sorted((w for w in workers if w["state"] in SERVING and w.get("pid")
                             and (self._services is None or w["service"] in self._services)),
                            key=lambda w: w["id"])
        if not candidates:
            r.error = "no serving worker to inject into"
            return
        # A worker that holds requests, when one does: the fault then hits work in flight.
        w = self._rng.choice([w for w in candidates if w.get("in_flight")] or candidates)
        r.worker, r.pid, r.service = w["id"], int(w["pid"]), w["service"]
        r.serving_before = sum(1 for x in workers
                               if x["state"] in SERVING and x["service"] == r.service)
        if r.kind in _SIGNALS:
            if not _is_local_worker(r.pid):
                r.error = (f"pid {r.pid} of {r.worker} is not a workerpool worker on this host: "
                           f"{r.kind} needs the loadtest on the workers' host (restart works "
                           f"from anywhere)")
                return
            started = _start_time(r.pid)
            r.injected_at_s = round(self._now(), 3)
            try:
                os.kill(r.pid, _SIGNALS[r.kind])
            except ProcessLookupError:
                r.injected_at_s, r.error = None, f"pid {r.pid} exited before the signal"
                return
            if r.kind == "stop" and started is not None:
                self._stopped.append((r.pid, started))
        else:
            r.injected_at_s = round(self._now(), 3)
            try:
                self._client.restart_worker(r.worker, timeout=STATUS_TIMEOUT)
            except WorkerPoolError as exc:
                r.injected_at_s, r.error = None, f"{exc.type}: {exc.message}"


def _is_local_worker(pid: int) -> bool:
    """Whether ``pid`` is a workerpool worker process on this host."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"workerpool.worker" in f.read()
    except OSError:
        return False


def _start_time(pid: int) -> str | None:
    """The process's start time from /proc (field 22): tells a pid's reuse apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None
