"""Dispatch policies: which of a service's workers gets the next request.

A policy sees only workers that are registered and have room (``in_flight < capacity``)
and returns one of them, or None when every worker is full (the request then waits in
the service's queue). Workers are ordered by slot id.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.health import Conn


class RoundRobin:
    """Each worker in turn, skipping full ones. Even spread when requests cost the same."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, conns: Sequence[Conn]) -> Conn | None:
        n = len(conns)
        for i in range(n):
            c = conns[(self._next + i) % n]
            if len(c.in_flight) < c.capacity:
                self._next = (self._next + i + 1) % n
                return c
        return None


class LeastLoaded:
    """The worker with the fewest requests in flight; ties go to the lowest worker id.
    Follows uneven request costs: a worker stuck on a slow request stops getting more."""

    name = "least-loaded"

    def pick(self, conns: Sequence[Conn]) -> Conn | None:
        best: Conn | None = None
        best_load = 0
        for c in conns:  # conns are sorted by slot id, so the first minimum wins ties
            load = len(c.in_flight)
            if load < c.capacity and (best is None or load < best_load):
                best, best_load = c, load
        return best


POLICIES = {RoundRobin.name: RoundRobin, LeastLoaded.name: LeastLoaded}


def make_policy(name: str) -> RoundRobin | LeastLoaded:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
