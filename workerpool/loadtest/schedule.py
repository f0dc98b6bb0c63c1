"""When each request is meant to be sent, and to which method: fixed before the run.

::

    LoadSpec + Share(index, procs) --> arrivals(): intended offsets 0.000, 0.005, ...
                                   --> MethodPicker: echo, echo, sleep, ...

Open loop: the intended send times are a constant or Poisson process at this process's
part of ``rate``, whatever the server does; latency is measured from them, so a server
that stalls cannot slow the arrivals down and hide its stall (no coordinated omission).
Closed loop has no schedule: each reply lets one more request go.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

from workerpool.loadtest.spec import LoadSpec, MethodMix


@dataclass(frozen=True)
class Share:
    """Process ``index`` of ``procs`` load generators; it offers 1/procs of the load."""

    index: int = 0
    procs: int = 1

    def split(self, total: int) -> int:
        """This process's part of ``total`` (requests, concurrency): as even as possible."""
        return total // self.procs + (1 if self.index < total % self.procs else 0)


def arrivals(spec: LoadSpec, share: Share, seed: int) -> Iterator[float]:
    """Intended send offsets in seconds from the start of the run, in order.

    The processes' constant schedules interleave (process i sends at i/R, (i+P)/R, ...),
    so together they are one constant schedule at ``rate``; independent Poisson processes
    at rate/P add up to a Poisson process at ``rate``.
    """
    assert spec.rate is not None, "closed loop has no arrival schedule"
    if spec.arrival == "constant":
        step = share.procs / spec.rate
        times: Iterator[float] = (share.index / spec.rate + k * step for k in itertools.count())
    else:
        times = _poisson(spec.rate / share.procs, random.Random(f"{seed}/{share.index}/arrivals"))
    if spec.requests is not None:
        return itertools.islice(times, share.split(spec.requests))
    end = spec.warmup + spec.duration
    return itertools.takewhile(lambda t: t < end, times)


def _poisson(rate: float, rng: random.Random) -> Iterator[float]:
    t = rng.expovariate(rate)
    while True:
        yield t
        t += rng.expovariate(rate)


class MethodPicker:
    """Draws each request's method from the mix by weight (seeded: runs repeat)."""

    def __init__(self, mix: list[MethodMix], seed: int, share: Share) -> None:
        self.mix = mix
        self._rng = random.Random(f"{seed}/{share.index}/methods")
        self._weights = list(itertools.accumulate(m.weight for m in mix))

    def __call__(self) -> int:
        """Index into ``mix`` of the next request's method."""
        if len(self.mix) == 1:
            return 0
        return self._rng.choices(range(len(self.mix)), cum_weights=self._weights)[0]
