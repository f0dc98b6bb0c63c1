"""Dispatch policies: which of a service's workers gets the next request.

A policy returns a worker that is registered and has room (``in_flight < limit``), or
None when every worker is full (the request then waits in the service's queue). A worker
with room to *run* another request (``in_flight < capacity``) always comes before one that
would only hold it ahead (``prefetch``): a request never waits behind another while some
worker could start it. Workers are ordered by slot id. Which to choose:

- ``round-robin``: requests of similar cost, workers of similar speed; the spread is
  exactly even when no worker is full. Blind to how busy a worker is.
- ``least-loaded``: requests of uneven cost (a long generation next to short ones); it
  reads every worker's in-flight count and never sends work to a busy worker while an
  idle one exists. The default.
- ``power-of-two``: many workers, or several routers sharing workers: it samples two
  workers and takes the less loaded, nearly as good as least-loaded at O(1) per pick and
  without herding every router onto the same "least loaded" worker.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.health import Conn


class RoundRobin:
    """Each worker in turn, skipping full ones. Even spread when requests cost the same."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, conns: Sequence[Conn]) -> Conn | None:
        n = len(conns)
        for ahead in (False, True):
            for i in range(n):
                c = conns[(self._next + i) % n]
                if len(c.in_flight) < (c.limit if ahead else c.capacity):
                    self._next = (self._next + i + 1) % n
                    return c
        return None


_AHEAD = 1 << 32  # sorts a worker that could only hold a request ahead after any that runs it


class LeastLoaded:
    """The worker with the fewest requests in flight; ties go to the lowest worker id.
    Follows uneven request costs: a worker stuck on a slow request stops getting more."""

    name = "least-loaded"

    def pick(self, conns: Sequence[Conn]) -> Conn | None:
        best: Conn | None = None
        best_key = 0
        for c in conns:  # conns are sorted by slot id, so the first minimum wins ties
            load = len(c.in_flight)
            if load < c.limit:
                # Room to run first, then the fewest held (an int key: this is per request).
                key = load if load < c.capacity else load + _AHEAD
                if best is None or key < best_key:
                    best, best_key = c, key
        return best


class PowerOfTwo:
    """Two random workers with room; the one with fewer in flight (ties: lower id)."""

    name = "power-of-two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def pick(self, conns: Sequence[Conn]) -> Conn | None:
        room = ([c for c in conns if len(c.in_flight) < c.capacity]
                or [c for c in conns if len(c.in_flight) < c.limit])
        if len(room) < 2:
            return room[0] if room else None
        a, b = self.rng.sample(room, 2)
        if (len(a.in_flight), a.slot.sort_key) <= (len(b.in_flight), b.slot.sort_key):
            return a
        return b


POLICIES = {p.name: p for p in (RoundRobin, LeastLoaded, PowerOfTwo)}


def make_policy(name: str) -> RoundRobin | LeastLoaded | PowerOfTwo:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
