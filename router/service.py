"""A service: its workers, its dispatch policy and its bounded FIFO queue.

Requests wait here only while every worker of the service is at capacity. The queue is
bounded (``queue_capacity``); past it the router answers ``BackpressureError`` with a
``retry_after`` estimated from the queue depth and the observed service time.
"""

from __future__ import annotations

from collections import deque

from router.health import Conn
from router.policy import make_policy
from router.requests import Phase, Record


class Service:
    def __init__(self, name: str, policy: str, queue_capacity: int,
                 max_inflight: int | None) -> None:
        self.name = name
        self.conns: list[Conn] = []  # registered workers, sorted by slot id
        self.configured = False  # True once a supervisor's HELLO has set the fields below
        self.configure(policy, queue_capacity, max_inflight)
        self.methods: frozenset[str] = frozenset()
        self._queue: deque[Record] = deque()
        self.queued = 0  # live records in _queue (cancelled ones are skipped lazily)
        self.completed = 0
        self.errored = 0
        self.rejected = 0
        self.expired = 0
        self._service_time = 0.0  # EWMA of seconds from dispatch to final reply
        self.slots = 0

    def configure(self, policy: str, queue_capacity: int, max_inflight: int | None) -> None:
        """(Re)apply settings; workers already registered get the new capacity cap."""
        self.policy = make_policy(policy)
        self.queue_capacity = queue_capacity
        self.max_inflight = max_inflight  # router-side cap on a worker's declared capacity
        for c in self.conns:
            c.capacity = self.capacity_for(c.declared)

    def capacity_for(self, declared: int) -> int:
        return min(declared, self.max_inflight) if self.max_inflight else declared

    # -- workers ---------------------------------------------------------------------------
    def add_conn(self, conn: Conn) -> None:
        self.conns.append(conn)
        self.conns.sort(key=lambda c: c.slot.sort_key)
        self.methods = frozenset().union(*(c.methods for c in self.conns))

    def remove_conn(self, conn: Conn) -> None:
        if conn in self.conns:
            self.conns.remove(conn)

    def pick(self) -> Conn | None:
        return self.policy.pick(self.conns) if self.conns else None

    # -- queue -----------------------------------------------------------------------------
    @property
    def full(self) -> bool:
        return self.queued >= self.queue_capacity

    def enqueue(self, rec: Record, front: bool = False) -> None:
        rec.phase = Phase.QUEUED
        if front:
            self._queue.appendleft(rec)
        else:
            self._queue.append(rec)
        self.queued += 1

    def dequeue(self) -> Record | None:
        """Next live queued record (skipping ones finished while queued), or None."""
        while self._queue:
            rec = self._queue.popleft()
            if rec.phase is Phase.QUEUED:
                self.queued -= 1
                return rec
        return None

    def forget_queued(self) -> None:
        """A queued record was finished in place (timeout, cancel): it no longer counts."""
        self.queued -= 1
        if not self.queued:
            self._queue.clear()

    def queued_records(self) -> list[Record]:
        return [r for r in self._queue if r.phase is Phase.QUEUED]

    # -- load estimate -----------------------------------------------------------------------
    def observe(self, seconds: float) -> None:
        self._service_time = seconds if not self._service_time else (
            0.9 * self._service_time + 0.1 * seconds)

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained enough to admit one more request."""
        capacity = sum(c.capacity for c in self.conns) or 1
        est = (self.queued + 1) * (self._service_time or 0.01) / capacity
        return round(min(max(est, 0.01), 60.0), 3)

    def row(self) -> dict:
        return {
            "name": self.name,
            "policy": self.policy.name,
            "workers": len(self.conns),
            "queued": self.queued,
            "queue_capacity": self.queue_capacity,
            "in_flight": sum(len(c.in_flight) for c in self.conns),
            "completed": self.completed,
            "errored": self.errored,
            "rejected": self.rejected,
            "expired": self.expired,
            "service_time_ms": round(self._service_time * 1000, 3),
            "methods": sorted(self.methods),
        }
