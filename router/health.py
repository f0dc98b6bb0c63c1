"""What the router knows about one worker: its ``Slot`` and, while connected, its ``Conn``.

A *slot* (``default/2``) is stable across restarts, owns the counters operators read and
its state, changed only through ``Slot.transition`` (the table is ``ipc.lifecycle``).
An *incarnation* is one process in that slot; while it is connected it is a ``Conn``,
which owns the requests in flight on it and its liveness. Events from an older
incarnation than the slot's current one are stale and are ignored by the caller, never
applied here.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from ipc.lifecycle import WorkerState, check

if TYPE_CHECKING:
    from router.requests import Record

S = WorkerState


class BusySamples:
    """A worker's cumulative (busy, wall) seconds from its last heartbeats (workerpool.busy),
    with the requests it had finished by then, and what they give: the busy fraction over
    the last ``WINDOW`` beats and since it became ready, and its handler time per request.
    A sample that is not two numbers, or goes back in time, is ignored."""

    WINDOW = 5  # beats: about 5 s at the default heartbeat_interval, steady but still live

    __slots__ = ("_per_request", "_samples")

    def __init__(self, done: int = 0) -> None:
        self._samples: deque[tuple[float, float, int]] = deque([(0.0, 0.0, done)],
                                                               maxlen=self.WINDOW + 1)
        self._per_request: float | None = None

    def add(self, sample: object, done: int = 0) -> None:
        """One beat's ``busy`` field; ``done``: the requests the router has had final
        replies for from this worker, as the beat arrives."""
        if not (isinstance(sample, list) and len(sample) == 2
                and all(type(x) in (int, float) for x in sample)):
            return
        busy, wall = float(sample[0]), float(sample[1])
        last_busy, last_wall, _ = self._samples[-1]
        if wall > last_wall and last_busy <= busy <= wall + 1e-3:
            self._samples.append((busy, wall, done))
            (b0, _, d0) = self._samples[0]
            if done > d0 and busy > b0:
                self._per_request = (busy - b0) / (done - d0)

    def recent(self) -> float | None:
        (b0, w0, _), (b1, w1, _) = self._samples[0], self._samples[-1]
        return None if w1 <= w0 else round(min(1.0, (b1 - b0) / (w1 - w0)), 3)

    def since_start(self) -> float | None:
        busy, wall, _ = self._samples[-1]
        return None if wall <= 0 else round(min(1.0, busy / wall), 3)

    def per_request(self) -> float | None:
        """Seconds its handler ran per request finished, over the last window in which it
        finished any: an idle spell keeps the figure from before it. None until requests
        finished and the handler ran between two samples. A batch's time is shared among
        its requests."""
        return self._per_request


class BatchSizes:
    """A worker's batch sizes per ``@batched`` method, from its heartbeats (8.3 ``batches``,
    workerpool.batching.BatchSizeMeter): cumulative since it became ready, so each report
    replaces the method's figures. A beat carries only the methods that moved.

    Bounded, as a worker's bytes must not grow the router: at most ``MAX_METHODS``
    methods, each one the worker announced in its READY, and ``MAX_BUCKETS`` buckets each.
    """

    MAX_METHODS = 32
    MAX_BUCKETS = 32  # a worker sends at most 18 (size_edges)

    __slots__ = ("figures",)

    def __init__(self) -> None:
        # method -> {"count", "sum", "mean", "buckets"}: the STATUS form, replaced whole
        self.figures: dict[str, dict] = {}

    def add(self, report: object, methods: frozenset[str],
            moved: Callable[[str, dict | None, dict], None] | None = None) -> int:
        """Take one beat's ``batches``; returns how many entries it ignored (a field that
        is not a map, or names more than ``MAX_METHODS`` methods, counts once). ``moved``
        is told each method's figures before and after (the metrics count the batches
        in between)."""
        if not isinstance(report, dict) or len(report) > self.MAX_METHODS:
            return 1
        ignored = 0
        for method, entry in report.items():
            kept = self.figures.get(method)
            if kept is None and (method not in methods or len(self.figures) >= self.MAX_METHODS):
                ignored += 1
                continue
            figures = _batch_figures(entry)
            # Cumulative within one incarnation: one going back is not to be believed.
            if figures is None or (kept is not None and figures["count"] < kept["count"]):
                ignored += 1
                continue
            self.figures[method] = figures
            if moved is not None:
                moved(method, kept, figures)
        return ignored


def _batch_figures(entry: object) -> dict | None:
    """One method's figures from a heartbeat in their STATUS form, or None if malformed:
    ``count`` >= 1 batches holding ``sum`` requests, and 1 to ``MAX_BUCKETS`` buckets of
    rising upper bounds with non-decreasing cumulative counts, the last holding them all."""
    if not isinstance(entry, dict):
        return None
    count, total, buckets = entry.get("count"), entry.get("sum"), entry.get("buckets")
    if not (_natural(count) and _natural(total) and 1 <= count <= total
            and isinstance(buckets, list) and 1 <= len(buckets) <= BatchSizes.MAX_BUCKETS):
        return None
    le = cumulative = 0
    for bucket in buckets:
        if not (isinstance(bucket, list) and len(bucket) == 2
                and _natural(bucket[0]) and _natural(bucket[1])
                and bucket[0] > le and bucket[1] >= cumulative):
            return None
        le, cumulative = bucket
    if cumulative != count or total > count * le:  # a batch outside the largest bucket
        return None
    return {"count": count, "sum": total, "mean": round(total / count, 3),
            "buckets": [list(b) for b in buckets]}


def _natural(x: object) -> bool:
    return type(x) is int and x >= 0


class Histogram(NamedTuple):
    """What a Prometheus histogram needs: bucket upper bounds with cumulative counts,
    ending with ``(inf, count)``, the count of observations and their sum."""

    buckets: list[tuple[float, int]]
    count: int
    sum: float


def batch_histogram(figures: Iterable[Mapping]) -> Histogram:
    """One histogram of batch sizes from the figures of one method on any number of
    workers (STATUS ``batches`` entries: ``count``, ``sum``, ``buckets``).

    An upper bound is kept only where it is exact for every worker: one of its own bounds,
    or at least its largest, which holds every batch it ran. Workers of one handler share
    their bounds, so nothing is lost; ones with a different ``max_batch_size`` still
    share the powers of two.
    """
    figures = list(figures)
    bounds = sorted({le for f in figures for le, _ in f["buckets"]})
    out: list[tuple[float, int]] = []
    for le in bounds:
        at = [_cumulative_at(f["buckets"], le) for f in figures]
        if None not in at:
            out.append((float(le), sum(at)))
    count = sum(f["count"] for f in figures)
    out.append((math.inf, count))
    return Histogram(out, count, float(sum(f["sum"] for f in figures)))


def _cumulative_at(buckets: list, le: int) -> int | None:
    """The batches of one worker's figures at most ``le`` long, if its buckets tell."""
    for bound, cumulative in buckets:
        if bound == le:
            return cumulative
    last_bound, last = buckets[-1]
    return last if le >= last_bound else None


class Conn:
    """One live, registered worker incarnation on the backend socket."""

    __slots__ = ("batches", "busy", "busy_since", "capacity", "declared", "identity", "in_flight",
                 "incarnation", "kill_sent", "last_beat", "limit", "memory", "methods", "pid",
                 "reclaiming", "sent", "slot", "started", "told", "unreachable_until")

    def __init__(self, identity: bytes, slot: Slot, incarnation: int, pid: int,
                 capacity: int, methods: frozenset[str], now: float | None = None) -> None:
        self.identity = identity
        self.slot = slot
        self.incarnation = incarnation
        self.pid = pid
        self.declared = capacity  # what the worker said it can hold
        self.told = capacity  # the capacity the worker knows it has (see WorkerRegistry.tell_capacity)
        self.capacity = capacity  # what it runs at once: min(declared, service max_inflight)
        # What the router sends it: capacity plus what it holds ahead (Service.size_ahead).
        self.limit = capacity
        self.reclaiming: set[int] = set()  # requests asked back (RECLAIM), not answered yet
        self.sent = 0  # REQUESTs sent to it: each carries its number (Record.seq) for RECLAIM
        self.methods = methods
        self.in_flight: dict[int, Record] = {}
        self.started: set[int] = set()  # ids of a batch it said it is running (STARTED)
        now = time.monotonic() if now is None else now
        self.last_beat = now  # last heartbeat (or any message) from this process
        self.busy_since = now  # when its current request started: last progress while busy
        self.kill_sent: float | None = None  # when the router asked for it to be killed
        self.memory: dict[str, int] = {}  # from its last heartbeat (workerpool.memory)
        self.busy = BusySamples(slot.finished)  # from its heartbeats (workerpool.busy)
        self.batches = BatchSizes()  # from its heartbeats (workerpool.batching)
        # Set when a send to it failed: the time its requests are answered anyway if no
        # death notice came by then.
        self.unreachable_until: float | None = None


class Slot:
    """Health of one worker slot, as ``workerpool status`` shows it."""

    def __init__(self, slot_id: str, service: str, device: str = "?") -> None:
        self.id = slot_id
        self.service = service
        self.device = device
        self.state = WorkerState.STARTING
        self.incarnation = 0
        self.pid: int | None = None
        self.conn: Conn | None = None
        self.completed = 0
        self.errored = 0
        self.restarts = 0
        self.deaths: dict[str, int] = {}  # SLOT died reports, by cause (router.metrics.death_cause)
        self.last_error: str | None = None
        self.ready_at: float | None = None  # monotonic time the current incarnation registered
        self.setup_error: str | None = None  # traceback from a worker whose setup() failed
        self.leave_reason: str | None = None  # what the current incarnation said as it left
        self.restart_pending = False  # an operator restart is under way
        self.owner: bytes | None = None  # the supervisor that runs it, from its HELLO
        self.left_cleanly = False  # its current incarnation said GOODBYE: its exit is no error
        self.retiring = False  # scaled away: drains, then leaves the table for good
        # (incarnation, what became of the requests it held) from its last loss, for the
        # death line; and the incarnation whose death was logged, so it is logged once.
        self.lost: tuple[int, dict] | None = None
        self.death_logged = 0
        self.sort_key = _sort_key(slot_id)

    @property
    def finished(self) -> int:
        """Requests its workers answered (completed or errored)."""
        return self.completed + self.errored

    def transition(self, new: WorkerState) -> None:
        """Move to ``new``; raises IllegalTransition for a move the table forbids."""
        self.state = check(self.id, self.state, new)

    def refresh_busy(self) -> None:
        """READY <-> BUSY follows the in-flight count (a move the table always allows)."""
        state = self.state
        if (state is S.READY or state is S.BUSY) and self.conn is not None:
            new = S.BUSY if self.conn.in_flight else S.READY
            if new is not state:  # on the hot path: most calls change nothing
                self.state = new

    def row(self, now: float) -> dict:
        return {
            "id": self.id,
            "pid": self.pid,
            "service": self.service,
            "device": self.device,
            "state": str(self.state),
            "in_flight": len(self.conn.in_flight) if self.conn else 0,
            "capacity": self.conn.capacity if self.conn else None,
            "prefetch": self.conn.limit - self.conn.capacity if self.conn else None,
            "started": len(self.conn.started) if self.conn else 0,
            "completed": self.completed,
            "errored": self.errored,
            "restarts": self.restarts,
            "incarnation": self.incarnation,
            "last_error": self.last_error,
            "memory": self.conn.memory if self.conn else {},
            "utilization": self.conn.busy.recent() if self.conn else None,
            "utilization_since_start": self.conn.busy.since_start() if self.conn else None,
            "batches": dict(self.conn.batches.figures) if self.conn else {},
            "uptime": round(now - self.ready_at, 3) if self.ready_at and self.conn else 0.0,
        }


def _sort_key(slot_id: str) -> tuple:
    """``svc/10`` sorts after ``svc/9``: ties in least-loaded go to the lower worker id."""
    name, _, index = slot_id.rpartition("/")
    return (name, int(index)) if index.isdigit() else (slot_id, -1)
