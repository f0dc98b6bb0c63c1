"""What the router counts for ``--metrics``, in plain Python: no prometheus_client here.

::

    in the poll loop (Router, RouterCore)                      in the listener thread
    Router._drain_socket ------------> LoopMeter: messages, lag
    RequestTable.finish, refusals ---> ServiceMeter: outcomes, durations
    Service.observe -----------------> ServiceMeter: queue wait, service time
    SLOT died -----------------------> Slot.deaths, by death_cause
    take_snapshot(core, loop) -------> Snapshot (immutable) --> router.exposition: /metrics
                                                            --> its status as JSON: /api/status

Counting happens in the loop, on the request path, so it is a list index and an add:
each histogram is a preallocated list of bucket counts (``Histogram.observe``), never a
prometheus_client metric with its lock. The loop copies the figures into a ``Snapshot``
when the HTTP thread asks for one, and the thread renders only from snapshots, so the two
threads share nothing that changes.

Labels come only from the backend: services a supervisor described (those with a
``ServiceMeter``), the methods their workers registered, slot ids. A request's method that
no worker registered is counted as ``UNKNOWN_METHOD``; a request for a service nobody
described is counted in ``Meters.unknown_service``, without labels. Client bytes never
become a label value.
"""

from __future__ import annotations

import signal
from bisect import bisect_left
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import msgpack

from ipc.errors import WIRE_TYPES
from workerpool._proc import EXIT_POISONED
from workerpool.histogram import Histogram, HistogramValues

if TYPE_CHECKING:
    from router.core import RouterCore
    from router.service import Service

SECONDS_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Upper bounds of the request duration, queue wait and service time buckets: from a
no-op handler's half millisecond to a two-minute generation."""
LAG_BUCKETS: tuple[float, ...] = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
                                  0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
"""Upper bounds of the loop lag buckets: a message costs the router microseconds, and a
pass that holds one for milliseconds is what they show."""
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Upper bounds of the batch size buckets (``@batched`` caps a batch at 65536)."""

OK = "ok"  # a RESULT or END from the worker
CANCELLED = "cancelled"  # its client cancelled it: no final reply was sent
DROPPED = "dropped"  # its client went away or was cut off: no final reply was sent
OTHER_ERROR = "WorkerPoolError"  # an ERROR whose type this version does not know
UNKNOWN_METHOD = ""  # the method label of a request for a method no worker registered
ERROR_KEYS_READ = 8  # keys of an ERROR body read to find its type before giving up


class ListenerError(RuntimeError):
    """The metrics listener cannot start: its address cannot be bound, or
    prometheus-client is not installed."""


def listener_module() -> ModuleType:
    """``router.listener``, imported now (it imports prometheus_client and http.server,
    which a router without ``--metrics`` never loads). Raises ListenerError without
    prometheus-client."""
    try:
        from router import listener
    except ImportError as exc:
        raise ListenerError(f"--metrics needs prometheus-client ({exc}): pip install "
                            "'workerpool[metrics]'") from None
    return listener


class MethodMeter:
    """One method of one service: final outcomes and durations, batch sizes."""

    __slots__ = ("batch_size", "duration", "outcomes")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.duration = Histogram(SECONDS_BUCKETS)  # admission -> final reply
        self.batch_size = Histogram(BATCH_BUCKETS)  # batches as run, when workers say so


class ServiceMeter:
    """The figures of one described service that the status object does not hold."""

    __slots__ = ("methods", "queue_wait", "service_time")

    def __init__(self) -> None:
        self.methods: dict[str, MethodMeter] = {}
        self.queue_wait = Histogram(SECONDS_BUCKETS)
        self.service_time = Histogram(SECONDS_BUCKETS)

    def method(self, name: str) -> MethodMeter:
        m = self.methods.get(name)
        if m is None:
            m = self.methods[name] = MethodMeter()
        return m

    def finished(self, method: str, outcome: str, duration: float | None) -> None:
        """A request of ``method`` (a registered one, or UNKNOWN_METHOD) ended with
        ``outcome``; ``duration``: seconds from admission to its final reply, None when
        none was sent (cancelled, dropped)."""
        m = self.methods.get(method) or self.method(method)
        outcomes = m.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if duration is not None:
            h = m.duration  # Histogram.observe, inlined: this runs for every request
            h.counts[bisect_left(h.bounds, duration)] += 1
            h.sum += duration

    def served(self, service_time: float, queue_wait: float) -> None:
        """A worker's final reply: how long it held the request, how long it queued."""
        h = self.service_time  # Histogram.observe, inlined: this runs for every request
        h.counts[bisect_left(h.bounds, service_time)] += 1
        h.sum += service_time
        h = self.queue_wait
        h.counts[bisect_left(h.bounds, queue_wait)] += 1
        h.sum += queue_wait

    def batches(self, method: str, before: dict | None, after: dict) -> None:
        """A worker's figures for ``method`` moved from ``before`` to ``after`` (cumulative
        STATUS ``batches`` entries of one incarnation, router.health.BatchSizes): the
        batches it ran in between, counted in the bucket of their worker bound. A worker's
        bounds are powers of two up to its ``max_batch_size``, then ``max_batch_size - 1``
        and ``max_batch_size``, so each of its buckets lies within one of BATCH_BUCKETS:
        the counts are exact, and the sum is the sizes' own."""
        h = self.method(method).batch_size
        below_after = below_before = 0
        for le, cumulative in after["buckets"]:
            was = _cumulative_at(before, le) if before else 0
            n = (cumulative - below_after) - (was - below_before)  # new ones in this bucket
            below_after, below_before = cumulative, was
            if n > 0:
                h.counts[bisect_left(h.bounds, le)] += n
        h.sum += after["sum"] - (before["sum"] if before else 0)


class LoopMeter:
    """The router loop's own figures, kept by ``Router`` as it drains its sockets."""

    __slots__ = ("backend", "frontend", "lag")

    def __init__(self) -> None:
        self.frontend = 0  # messages handled from clients
        self.backend = 0  # ... from workers and supervisors
        self.lag = Histogram(LAG_BUCKETS)  # poll returned -> the loop turned to the message


class Meters:
    """The core's entry for request outcomes, and what no label may describe."""

    __slots__ = ("unknown_service",)

    def __init__(self) -> None:
        self.unknown_service = 0  # requests for a service no supervisor described

    def request_ended(self, svc: Service | None, method: str, outcome: str,
                      duration: float | None) -> None:
        """A request for ``svc`` (None: none matched its name) ended with ``outcome``:
        answered, cancelled, dropped or refused at admission (``duration`` None when it
        was never admitted or got no final reply)."""
        meter = svc.meter if svc is not None else None
        if meter is None:
            self.unknown_service += 1
        else:
            meter.finished(method if method in svc.methods else UNKNOWN_METHOD, outcome,
                           duration)


CAUSES = frozenset({"hung", "restart", "context-poisoned", "exit", "signal",
                    *(s.name for s in signal.Signals)})
"""Every ``cause`` label value: a bounded set, whatever a peer sends."""


def _cumulative_at(figures: dict, le: int) -> int:
    """Batches of at most ``le`` in a worker's figures (all of them past its largest bound;
    bounds do not change within one incarnation, so a miss is only that)."""
    below = 0
    for bound, cumulative in figures["buckets"]:
        if bound > le:
            break
        below = cumulative
    return below


def death_cause(exitcode: object, reason: str, said: object = None) -> str:
    """The ``cause`` label of a worker death from its SLOT ``died``: the supervisor's own
    word (``cause``) when it is one of CAUSES, else one derived from the exit status
    (minus the signal number when killed) and the supervisor's reason: ``hung`` (killed
    on the router's request), ``restart`` (an operator's restart), ``context-poisoned``,
    the signal's name (``SIGKILL``, ``SIGSEGV``; ``signal`` for one Python does not
    know), or ``exit``."""
    if isinstance(said, str) and said in CAUSES:
        return said
    if reason.startswith("was killed (SIGKILL) as hung"):
        return "hung"
    if reason.startswith("restarted ("):
        return "restart"
    if exitcode == EXIT_POISONED:
        return "context-poisoned"
    if isinstance(exitcode, int) and not isinstance(exitcode, bool) and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return "signal"
    return "exit"


def error_type(body: bytes) -> str:
    """The ``type`` of an ERROR body from a worker, if it is one this version knows, else
    OTHER_ERROR. Reads only the first few keys (a traceback is skipped, not decoded)."""
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(body), 1))
        unpacker.feed(body)
        for _ in range(min(unpacker.read_map_header(), ERROR_KEYS_READ)):
            if unpacker.unpack() == "type":
                value = unpacker.unpack()
                return value if isinstance(value, str) and value in WIRE_TYPES else OTHER_ERROR
            unpacker.skip()
    except Exception:  # any bytes at all: the request was still answered
        pass
    return OTHER_ERROR


@dataclass(frozen=True)
class ServiceFigures:
    """One described service's counters in a snapshot."""

    name: str
    requests: tuple[tuple[str, str, int], ...]  # (method, outcome, count)
    durations: tuple[tuple[str, HistogramValues], ...]  # (method, histogram), if any
    batch_sizes: tuple[tuple[str, HistogramValues], ...]  # methods with batches only
    queue_wait: HistogramValues
    service_time: HistogramValues


@dataclass(frozen=True)
class Snapshot:
    """Everything one scrape shows, copied out of the loop at one instant. Nothing in it
    is touched again by the loop: the HTTP thread reads it without a lock."""

    taken_at: float  # time.monotonic() when the loop copied it
    status: dict  # the STATUS body (docs/protocol.md, section 6)
    services: tuple[ServiceFigures, ...]  # described services only, by name
    restarts: tuple[tuple[str, str, str, int], ...]  # (service, worker, cause, count)
    frontend_messages: int
    backend_messages: int
    loop_lag: HistogramValues
    unknown_service: int


def take_snapshot(core: RouterCore, loop: LoopMeter, taken_at: float) -> Snapshot:
    """Copy the figures out of the core and the loop (called on the loop's thread)."""
    status = core.status()
    for row in status["workers"]:
        row["memory"] = dict(row["memory"])  # the connection's own map otherwise
    services = []
    for name in sorted(core.services):
        meter = core.services[name].meter
        if meter is None:
            continue
        methods = sorted(meter.methods.items())
        services.append(ServiceFigures(
            name,
            tuple((m, outcome, n) for m, mm in methods for outcome, n in sorted(mm.outcomes.items())),
            tuple((m, mm.duration.freeze()) for m, mm in methods if any(mm.duration.counts)),
            tuple((m, mm.batch_size.freeze()) for m, mm in methods if any(mm.batch_size.counts)),
            meter.queue_wait.freeze(), meter.service_time.freeze()))
    restarts = tuple((slot.service, slot.id, cause, n)
                     for slot in sorted(core.registry.slots.values(), key=lambda s: s.sort_key)
                     for cause, n in sorted(slot.deaths.items()))
    meters = core.meters
    return Snapshot(taken_at, status, tuple(services), restarts, loop.frontend, loop.backend,
                    loop.lag.freeze(), meters.unknown_service if meters is not None else 0)
