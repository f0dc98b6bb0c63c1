"""Histograms counted in plain Python, for processes that count on their request path:
an observation is a bisect, a list index and an add, never a prometheus_client metric
with its lock and its loop over the buckets.

The router (router/metrics.py) and the HTTP gateway (workerpool/gateway/metrics.py)
count with ``Histogram`` and render a frozen ``HistogramValues`` through
prometheus_client's custom-collector API when scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass


class Histogram:
    """Counts per bucket (``bounds`` are the upper bounds, plus +Inf) and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to it (Prometheus' ``le``).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def freeze(self) -> HistogramValues:
        return HistogramValues(self.bounds, tuple(self.counts), self.sum)


@dataclass(frozen=True)
class HistogramValues:
    """A histogram at one instant: counts per bucket, not cumulative; the last one
    counts the values above every bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, values <= le)`` for each bound, then ``(inf, count)``."""
        out, total = [], 0
        for le, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((le, total))
        return out
