"""Request timers: deadlines and max-wait expiries in one heap keyed by monotonic time.

A timer is ``(when, rid, kind)``. Timers of requests that were answered are not removed
when the request ends: they are skipped when due (lazy deletion), since removing one from
a heap costs O(n). With long deadlines at a high rate they would pile up (rate x timeout
entries), so when they outnumber the live requests the heap keeps only the armed ones:
amortized O(1) per timer.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

DEADLINE, MAX_WAIT = 0, 1  # timer kinds
SLACK = 1024  # disarmed timers tolerated before the heap is rebuilt

Timer = tuple[float, int, int]


class TimerHeap:
    """Timers of requests. ``armed(timer)`` says whether a timer still means something."""

    def __init__(self, armed: Callable[[Timer], bool]) -> None:
        self._heap: list[Timer] = []
        self._armed = armed

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, when: float, rid: int, kind: int, live: int) -> None:
        """Arm a timer; ``live`` is how many requests may still have armed ones."""
        heap = self._heap
        heapq.heappush(heap, (when, rid, kind))
        if len(heap) > 2 * live + SLACK:
            heap[:] = [t for t in heap if self._armed(t)]  # in place: pop_due may hold it
            heapq.heapify(heap)

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> Iterator[Timer]:
        """Timers due at ``now``, earliest first; the caller checks each is still armed."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            yield heapq.heappop(heap)
