"""How much of its wall time a worker's handler runs: the figure users watch on a GPU pool.

The worker's main thread marks each handler call (one request, or one ``@batched`` call)
with ``begin``/``end``; its heartbeat thread reads ``sample`` and sends it to the router,
which turns consecutive samples into the busy fraction that ``workerpool status`` shows
(``utilization``). Cumulative seconds travel rather than fractions, so the router can
choose its window and a lost heartbeat loses no time.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class BusyMeter:
    """Cumulative handler time since the worker became ready; safe to read from another
    thread: the state is one tuple, replaced whole (an atomic store under the GIL), so a
    reader never sees a run both finished and still in progress."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self._state: tuple[float, float | None] = (0.0, None)  # (busy seconds, running since)

    def begin(self) -> None:
        self._state = (self._state[0], self._clock())

    def end(self) -> None:
        busy, since = self._state
        if since is not None:
            self._state = (busy + self._clock() - since, None)

    def finished_any(self) -> bool:
        """Whether a handler call has ended: its time is counted."""
        return self._state[0] > 0

    def sample(self) -> tuple[float, float]:
        """(busy seconds, wall seconds) since ``started``, a run in progress included."""
        busy, since = self._state
        now = self._clock()
        if since is not None:
            busy += now - since
        return busy, now - self.started


class CpuShare:
    """Whether the handler computes on the CPU rather than waits (on a device, on I/O): the
    main thread's CPU time against the handler's running time between two looks.

    The worker lends its socket to a thread of its own only while the handler waits
    (workerpool/wire.py): a handler that computes in Python holds the GIL, and the other
    thread would then send each reply only when the interpreter next switches threads.
    Read from the heartbeat thread, so it costs the request path nothing.
    """

    def __init__(self, busy: BusyMeter, thread_id: int, threshold: float = 0.5,
                 least_busy: float = 0.05) -> None:
        self._clock = time.pthread_getcpuclockid(thread_id)
        self._busy = busy
        self._threshold = threshold
        self._least = least_busy  # handler seconds between looks needed to judge
        self._last: tuple[float, float] | None = None
        self.computes = False  # until judged: a GPU handler waits

    def look(self) -> None:
        cpu = time.clock_gettime(self._clock)
        busy = self._busy.sample()[0]
        if self._last is None:
            self._last = (cpu, busy)
            return
        ran = busy - self._last[1]
        if ran < self._least:
            return  # too little handler time to tell: keep the last judgement and its base
        self.computes = cpu - self._last[0] > self._threshold * ran
        self._last = (cpu, busy)
