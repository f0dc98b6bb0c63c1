"""A service: its workers, its dispatch policy, its queue (router.queue), its load figures.

Requests wait in the queue only while every worker of the service is at
``max_inflight``; with ``capacity_policy="reject"`` nothing waits at all. A request
refused for capacity gets ``BackpressureError`` with a ``retry_after`` estimated from the
queue ahead of it and the rate at which the service's workers have been finishing
requests, never a constant (docs/protocol.md, section 5, states the formula).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from router.health import Conn
from router.metrics import ServiceMeter
from router.policy import make_policy
from router.queue import RequestQueue

WINDOW = 1024  # recent requests the percentiles and the completion rate are computed over
RATE_WINDOW = 5.0  # seconds of completions the completion rate looks back over
FALLBACK_SERVICE_TIME = 0.01  # seconds per request assumed before any completed
MIN_RETRY_AFTER, MAX_RETRY_AFTER = 0.001, 60.0
MAX_AHEAD = 64  # requests held ahead at most, as prefetch itself allows
STALL_FACTOR, STALL_MIN = 10, 0.05  # no reply for this many requests' time, and seconds


def ahead_for(prefetch: int, rtt: float | None, per_request: float | None) -> int:
    """How many requests a worker is sent beyond those it runs: ``prefetch``, or, for a
    worker whose round trip to the router (``rtt`` seconds) is longer than the
    ``prefetch`` requests it would run meanwhile (``per_request`` seconds of handler time
    each), as many as it runs in one round trip, at most ``MAX_AHEAD``.

    The next request is sent when a reply arrives, so it reaches the worker a round trip
    after the reply left: a worker that holds fewer than that round trip's worth sits idle
    for the rest of it, every time. That is a worker on a far host, and also one next to
    the router whose requests take less than the router's own turn-around (under a
    millisecond). ``prefetch`` 0 turns holding ahead off, this too; with no round trip or
    handler time known yet, ``prefetch`` stands."""
    if prefetch <= 0 or rtt is None or per_request is None:
        return prefetch
    return max(prefetch, min(MAX_AHEAD, math.ceil(rtt / max(per_request, 1e-6))))


def stalled(conn: Conn, now: float, per_request: float | None) -> bool:
    """Whether ``conn`` has sent no final reply for far longer than its requests take
    (``STALL_FACTOR`` of them, and at least ``STALL_MIN`` seconds) while holding some: a
    long request runs, and what it holds ahead waits behind it. Sized for its round trip,
    that would be many requests, so they are asked back (``size_ahead``)."""
    if not conn.in_flight or per_request is None:
        return False
    return now - conn.busy_since > max(STALL_MIN, STALL_FACTOR * per_request)


@dataclass(frozen=True)
class ServiceSettings:
    """The ServiceConfig fields the router applies (validated by pydantic upstream)."""

    policy: str
    queue_capacity: int
    max_inflight: int | None
    capacity_policy: str
    max_wait: float | None
    exec_timeout: float | None = None
    idempotent: bool = False
    max_attempts: int = 3
    poison_threshold: int = 2
    prefetch: int = 1
    min_per_host: int = 0


class Service:
    def __init__(self, name: str, settings: ServiceSettings) -> None:
        self.name = name
        self.conns: list[Conn] = []  # registered workers, sorted by slot id
        self.configured = False  # True once a supervisor's HELLO has set the settings
        # With --metrics, once a supervisor described it (RouterCore.described): only then
        # is its name a label value (a client may name any service; router.metrics).
        self.meter: ServiceMeter | None = None
        self.configure(settings)
        self.methods: frozenset[str] = frozenset()
        self.queue = RequestQueue()
        self.completed = 0
        self.errored = 0
        self.rejected_backpressure = 0
        self.expired = 0
        self.cancelled = 0
        self.late_results = 0
        self.retried = 0
        self.poisoned = 0
        self._service_times: deque[float] = deque(maxlen=WINDOW)
        self._queue_waits: deque[float] = deque(maxlen=WINDOW)
        self._completions: deque[float] = deque(maxlen=WINDOW)  # when, for the rate
        self._mean_service = 0.0  # EWMA, for retry_after before the rate is known

    def configure(self, settings: ServiceSettings) -> None:
        """(Re)apply settings. Registered workers, spares included, are capped again by the
        router (``RouterCore.service``), which also tells them."""
        self.settings = settings
        self.policy = make_policy(settings.policy)

    def set_capacity(self, conn: Conn, declared: int) -> None:
        """What ``conn`` runs (its declared capacity, capped by ``max_inflight``) and what
        it is sent (``limit``: that plus ``prefetch``, held ahead unstarted, until
        ``size_ahead`` sizes it for the worker's round trip)."""
        cap = self.settings.max_inflight
        conn.capacity = min(declared, cap) if cap else declared
        conn.limit = conn.capacity + self.settings.prefetch

    def size_ahead(self, conn: Conn, rtt: float | None, now: float) -> int:
        """Resize what ``conn`` holds ahead for its round trip (``ahead_for``), from the
        handler time per request its heartbeats show; back to ``prefetch`` while it is
        stalled (``stalled``). Returns how far its limit moved: up, queued requests may go
        to it now; down, it may hold more than it should now."""
        per_request = conn.busy.per_request()
        ahead = ahead_for(self.settings.prefetch, rtt, per_request)
        if ahead > self.settings.prefetch and stalled(conn, now, per_request):
            ahead = self.settings.prefetch
        limit = conn.capacity + ahead
        moved = limit - conn.limit
        conn.limit = limit
        return moved

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
    def queued(self) -> int:
        return self.queue.size

    @property
    def may_queue(self) -> bool:
        """Whether one more request may wait (capacity policy and queue bound)."""
        return (self.settings.capacity_policy == "queue"
                and self.queue.size < self.settings.queue_capacity)

    # -- load figures ------------------------------------------------------------------------
    def observe(self, now: float, service_time: float, queue_wait: float) -> None:
        """A request of this service got its final reply from a worker at ``now``."""
        self._completions.append(now)
        self._service_times.append(service_time)
        self._queue_waits.append(queue_wait)
        m = self._mean_service
        self._mean_service = service_time if not m else 0.9 * m + 0.1 * service_time
        if self.meter is not None:
            self.meter.served(service_time, queue_wait)

    def completion_rate(self, now: float) -> float | None:
        """Final replies per second over the last ``RATE_WINDOW`` seconds (at most the last
        ``WINDOW`` replies), or None with fewer than two in that time."""
        done = self._completions
        lo, hi = 0, len(done)  # the first completion within the window: done is sorted
        while lo < hi:
            mid = (lo + hi) // 2
            if now - done[mid] > RATE_WINDOW:
                lo = mid + 1
            else:
                hi = mid
        n = len(done) - lo
        if n < 2 or now <= done[lo]:
            return None
        return n / (now - done[lo])

    def retry_after(self, now: float, ahead: int | None = None) -> float:
        """Seconds until a request refused now would likely be admitted: the requests queued
        ahead of it, plus itself (or ``ahead``), divided by the rate the workers finish
        them. Before that rate is known: by the mean service time over the workers' total
        capacity."""
        if ahead is None:
            ahead = self.queued + 1
        rate = self.completion_rate(now)
        if rate is not None:
            estimate = ahead / rate
        else:
            capacity = sum(c.capacity for c in self.conns) or 1
            estimate = ahead * (self._mean_service or FALLBACK_SERVICE_TIME) / capacity
        return round(min(max(estimate, MIN_RETRY_AFTER), MAX_RETRY_AFTER), 3)

    def row(self) -> dict:
        st = sorted(self._service_times)
        qw = sorted(self._queue_waits)
        s = self.settings
        return {
            "name": self.name,
            "policy": self.policy.name,
            "capacity_policy": s.capacity_policy,
            "max_inflight": s.max_inflight,
            "prefetch": s.prefetch,
            "max_wait": s.max_wait,
            "exec_timeout": s.exec_timeout,
            "min_per_host": s.min_per_host,
            "workers": len(self.conns),
            "queued": self.queued,
            "queue_capacity": s.queue_capacity,
            "in_flight": sum(len(c.in_flight) for c in self.conns),
            "completed": self.completed,
            "errored": self.errored,
            "rejected_backpressure": self.rejected_backpressure,
            "expired": self.expired,
            "cancelled": self.cancelled,
            "late_results": self.late_results,
            "retried": self.retried,
            "poisoned": self.poisoned,
            "service_time_p50_ms": _pct_ms(st, 0.50),
            "service_time_p99_ms": _pct_ms(st, 0.99),
            "queue_wait_p50_ms": _pct_ms(qw, 0.50),
            "queue_wait_p99_ms": _pct_ms(qw, 0.99),
            "methods": sorted(self.methods),
        }


def _pct_ms(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile in milliseconds, over the last WINDOW requests."""
    if not sorted_values:
        return None
    i = max(0, math.ceil(q * len(sorted_values)) - 1)
    return round(sorted_values[i] * 1000, 3)
