"""A service's queue: requests waiting while every worker of the service is full.

Ordered by priority (higher first), FIFO within a priority by admission number, so a
request put back after its worker died keeps its original place. Bounded by the
service's ``queue_capacity`` (checked by admission); when it is full, the newest request
of the lowest priority is the one a higher-priority request may displace.

Both heaps delete lazily: a request answered while queued (timeout, cancel) stays in them
until it surfaces, and a heap is rebuilt when stale entries outnumber live ones, so
answered requests are never kept alive by the queue (bounded memory).
"""

from __future__ import annotations

import heapq

from router.requests import Phase, Record

COMPACT_SLACK = 64  # stale entries tolerated beyond twice the live ones


class RequestQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Record]] = []  # (-priority, rid, record): next out
        self._low: list[tuple[int, int, Record]] = []  # (priority, -rid, record): next evicted
        self.size = 0  # live records in the heaps

    def __len__(self) -> int:
        return self.size

    def push(self, rec: Record) -> None:
        """Queue ``rec`` by (priority, admission order)."""
        rec.phase = Phase.QUEUED
        heapq.heappush(self._heap, (-rec.priority, rec.rid, rec))
        heapq.heappush(self._low, (rec.priority, -rec.rid, rec))
        self.size += 1

    def pop(self) -> Record | None:
        """The highest-priority, oldest live record, or None."""
        heap = self._heap
        while heap:
            rec = heapq.heappop(heap)[2]
            if rec.phase is Phase.QUEUED:
                self.size -= 1
                self._compact()
                return rec
        return None

    def forget(self) -> None:
        """A queued record was finished in place (timeout, cancel): it no longer counts."""
        self.size -= 1
        if not self.size:
            self._heap.clear()
            self._low.clear()
        else:
            self._compact()

    def eviction_candidate(self, priority: int) -> Record | None:
        """The newest request of the lowest priority, if that is below ``priority`` (so a
        flood of low-priority work cannot lock out higher)."""
        low = self._low
        while low:
            rec = low[0][2]
            if rec.phase is Phase.QUEUED:
                return rec if rec.priority < priority else None
            heapq.heappop(low)
        return None

    def records(self) -> list[Record]:
        return [r for _, _, r in self._heap if r.phase is Phase.QUEUED]

    def _compact(self) -> None:
        limit = 2 * self.size + COMPACT_SLACK
        if len(self._low) > limit:
            self._low = [e for e in self._low if e[2].phase is Phase.QUEUED]
            heapq.heapify(self._low)
        if len(self._heap) > limit:
            self._heap = [e for e in self._heap if e[2].phase is Phase.QUEUED]
            heapq.heapify(self._heap)
