"""When a worker that is ahead of its work holds its replies, to send several as one BUNDLE.

::

    quick requests waiting --plan()--> a group: STARTED(ids) --run each--> Replies.held
    before each one of it: keep(held, their bytes, the oldest's age)?
        no, or the group is done: protocol.pack(held) --one message per bundle--> router

Every message costs the router and the client a receive, a wake-up and (with CURVE) an
encryption, whatever its size; a worker that answers sub-millisecond requests back to
back spends most of what it sends on those costs. So a worker with several quick
requests received and ready runs them as a *group*: it tells the router they started
(STARTED, as for a batch: a crash then answers each of them as started, docs/protocol.md
4.6), holds their final replies, and sends them together. Only requests whose method
recently ran quickly join a group, and a reply is held a bounded time
(docs/protocol.md 7.1). This module decides, with plain values; ``Replies`` holds and
sends, and the worker's loop asks. No I/O, no clock: the caller passes ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

from ipc.protocol import BUNDLE_BYTES, BUNDLE_MAX


@dataclass(frozen=True)
class HoldLimits:
    """How far a worker may hold its replies back."""

    quick: float = 200e-6
    """A request whose method recently took under this many seconds is quick: it may join
    a group. A method not yet measured, and a ``@batched`` one, counts as slow."""
    max_wait: float = 1e-3
    """A group is planned to take under this many seconds, and once the oldest held reply
    has waited this long, everything held is sent before the next request starts: a reply
    is late by at most this plus one request."""
    max_held: int = BUNDLE_MAX
    """Replies held at most: one full bundle."""
    max_bytes: int = BUNDLE_BYTES
    """Bytes held at most: past one bundle's worth, holding more saves no message."""
    smoothing: float = 0.25
    """The weight of the newest measurement in a method's average handler time: a few
    slow calls make it slow, and a few quick ones make it quick again."""


DEFAULT_LIMITS = HoldLimits()


class HandlerTimes:
    """Each plain method's recent time per request in seconds, an exponentially weighted
    average: from the request's start to its reply, so decoding and encoding count too,
    which for a quick handler are most of what the replies held before it wait for."""

    def __init__(self, smoothing: float = DEFAULT_LIMITS.smoothing) -> None:
        self._weight = smoothing
        self._avg: dict[str, float] = {}  # only the handler's own methods: bounded

    def record(self, method: str, seconds: float) -> None:
        """One call of ``method`` ran its handler for ``seconds``."""
        avg = self._avg.get(method)
        self._avg[method] = seconds if avg is None else avg + self._weight * (seconds - avg)

    def get(self, method: object) -> float | None:
        """The average, or None for a method never measured (or not a method name)."""
        return self._avg.get(method) if isinstance(method, str) else None


class ReplyHold:
    """The worker's rule for grouping quick requests and holding their replies
    (docs/protocol.md 7.1)."""

    def __init__(self, limits: HoldLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.times = HandlerTimes(limits.smoothing)

    def quick(self, method: object) -> bool:
        """Whether a request for ``method`` is expected to finish within ``quick``."""
        took = self.times.get(method)
        return took is not None and took < self.limits.quick

    def plan(self, methods: Iterable[object], most: int = BUNDLE_MAX) -> int:
        """How many of the requests ready now, oldest first (``methods``: theirs, the first
        about to start), run as one group whose replies are held: the longest run of quick
        ones, at most ``max_held`` and ``most``, expected to take under ``max_wait``
        together. At least 1: the first starts anyway, and a group of one holds nothing
        for long."""
        limits = self.limits
        total = 0.0
        n = 0
        for method in islice(methods, min(limits.max_held, most)):  # only as far as needed
            took = self.times.get(method)
            if took is None or took >= limits.quick:
                break
            total += took
            if n and total >= limits.max_wait:
                break
            n += 1
        return max(n, 1)

    def keep(self, held: int, held_bytes: int, since: float, now: float) -> bool:
        """Whether ``held`` replies (``held_bytes`` bytes, the oldest held at ``since``)
        may wait while the next request of their group runs. False: send them first."""
        limits = self.limits
        return (held < limits.max_held and held_bytes < limits.max_bytes
                and now - since < limits.max_wait)
