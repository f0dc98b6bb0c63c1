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
