"""A service's queue: requests waiting while every worker of the service is full.

Ordered by priority (higher first). Within a priority, clients take turns: each client
connection with requests waiting has its own FIFO (by admission number, so a request put
back after its worker died keeps its original place among its client's), and the
clients sit in a ring that ``pop`` walks one request at a time. A client with 10,000
requests queued therefore delays another client's one request by about one request, not
by 10,000::

    priority 5:  ring [A, B]      A: 7 8 9      B: 12
    priority 0:  ring [C]         C: 3 4
    pop order:   7 12 8 9 3 4

Bounded by the service's ``queue_capacity`` (checked by admission); when it is full, the
newest request of the lowest priority is the one a higher-priority request may displace.

Every structure deletes lazily: a request answered while queued (timeout, cancel, its
client gone) stays in them until it surfaces, and they are rebuilt when stale entries
outnumber live ones, so answered requests are never kept alive by the queue (bounded
memory). Push and pop are O(log n).
"""

from __future__ import annotations

import heapq
from collections import deque

from router.requests import Phase, Record

COMPACT_SLACK = 64  # stale entries tolerated beyond twice the live ones


class _Level:
    """The requests of one priority: a ring of clients, each with its own FIFO."""

    __slots__ = ("fifos", "ring")

    def __init__(self) -> None:
        self.ring: deque[bytes] = deque()  # clients in turn order; the front goes next
        self.fifos: dict[bytes, list[tuple[int, Record]]] = {}  # client -> heap of (rid, rec)

    def push(self, rec: Record, front: bool) -> None:
        fifo = self.fifos.get(rec.client)
        if fifo is None:
            fifo = self.fifos[rec.client] = []
            if front:
                self.ring.appendleft(rec.client)
            else:
                self.ring.append(rec.client)
        heapq.heappush(fifo, (rec.rid, rec))

    def pop(self) -> tuple[Record | None, int]:
        """The next client's oldest live record (or None), and the stale entries passed."""
        ring, fifos = self.ring, self.fifos
        stale = 0
        while ring:
            client = ring[0]
            fifo = fifos[client]
            while fifo:
                rec = heapq.heappop(fifo)[1]
                if rec.phase is Phase.QUEUED:
                    if fifo:
                        ring.rotate(-1)  # its turn is over: to the back of the ring
                    else:
                        ring.popleft()
                        del fifos[client]
                    return rec, stale
                stale += 1
            ring.popleft()
            del fifos[client]
        return None, stale


class RequestQueue:
    def __init__(self) -> None:
        self._levels: dict[int, _Level] = {}
        self._prios: list[int] = []  # -priority of each level: the next level out is first
        self._low: list[tuple[int, int, Record]] = []  # (priority, -rid, record): next evicted
        self._entries = 0  # entries in the levels' fifos, live and stale
        self.size = 0  # live records

    def __len__(self) -> int:
        return self.size

    def push(self, rec: Record, front: bool = False) -> None:
        """Queue ``rec`` by (priority, its client's turn, admission order). ``front``: it is
        back after its worker died, so if its client has nothing else waiting, the client
        goes next instead of at the back of the ring."""
        rec.phase = Phase.QUEUED
        level = self._levels.get(rec.priority)
        if level is None:
            level = self._levels[rec.priority] = _Level()
            heapq.heappush(self._prios, -rec.priority)
        level.push(rec, front)
        heapq.heappush(self._low, (rec.priority, -rec.rid, rec))
        self._entries += 1
        self.size += 1

    def pop(self) -> Record | None:
        """The next live record: highest priority first, clients in turn within it."""
        prios, levels = self._prios, self._levels
        while prios:
            priority = -prios[0]
            level = levels[priority]
            rec, stale = level.pop()
            self._entries -= stale
            if rec is not None:
                self._entries -= 1
                self.size -= 1
                self._compact()
                return rec
            heapq.heappop(prios)
            del levels[priority]
        return None

    def forget(self) -> None:
        """A queued record was finished in place (timeout, cancel): it no longer counts."""
        self.size -= 1
        if not self.size:
            self._levels.clear()
            self._prios.clear()
            self._low.clear()
            self._entries = 0
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
        """The live records, highest priority first, oldest first within one."""
        return sorted((r for level in self._levels.values() for fifo in level.fifos.values()
                       for _, r in fifo if r.phase is Phase.QUEUED),
                      key=lambda r: (-r.priority, r.rid))

    def clients(self) -> int:
        """Client connections with requests waiting (stale ones may count until compaction)."""
        return len({c for level in self._levels.values() for c in level.fifos})

    def _compact(self) -> None:
        limit = 2 * self.size + COMPACT_SLACK
        if len(self._low) > limit:
            self._low = [e for e in self._low if e[2].phase is Phase.QUEUED]
            heapq.heapify(self._low)
        if self._entries > limit:
            self._rebuild()

    def _rebuild(self) -> None:
        """Drop the stale entries, keeping each level's ring order."""
        entries = 0
        for priority, level in list(self._levels.items()):
            for client in list(level.ring):
                fifo = [e for e in level.fifos[client] if e[1].phase is Phase.QUEUED]
                if fifo:
                    heapq.heapify(fifo)
                    level.fifos[client] = fifo
                    entries += len(fifo)
                else:
                    del level.fifos[client]
            level.ring = deque(c for c in level.ring if c in level.fifos)
            if not level.ring:
                del self._levels[priority]
        self._prios = [-p for p in self._levels]
        heapq.heapify(self._prios)
        self._entries = entries
