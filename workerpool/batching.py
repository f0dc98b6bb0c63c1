"""Dynamic batching: a handler method that takes many requests at once.

::

    router --REQUEST a, b, c--> worker backlog --[a, b, c] (same method)--> method(list)
    router <--RESULT a | ERROR b | RESULT c--            <--[ra, exc_b, rc]--

A method decorated with ``@batched(max_batch_size=32, max_delay_ms=2)`` is called with a
``list`` of payloads and must return a list of the same length, one result per payload in
the same order. An exception *object* in a position fails only that caller; an exception
*raised* fails every caller in the batch. ``BatchRunner`` gathers the batch from the
requests the worker holds: it flushes when the batch is full, when the oldest request has
waited ``max_delay_ms``, or at once when the router will send it nothing more (it holds
``max_inflight`` requests). A worker only holds several requests when the service's
``max_inflight`` allows it, so batches hold at most ``max_inflight`` requests. Left unset,
``max_inflight`` is twice the largest ``max_batch_size`` of the handler's batched methods
(``workerpool/worker.py: Worker._capacity``); set explicitly, keep it >= that.
A batch's final replies leave together as one BUNDLE (or a few, past the bundle bounds),
after its STARTED when it sends one (docs/protocol.md 7.1).

The runner takes requests out of the worker's backlog and answers them through its
``Replies``; it reads the socket (through the worker) only while a batch forms, so that a
CANCEL can still take a request out of it. It counts the size of each batch it runs in a
``BatchSizeMeter``, which the heartbeat thread reports to the router (``batches``,
docs/protocol.md 8.3) for ``workerpool status``.
"""

from __future__ import annotations

import inspect
import math
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Mapping
from itertools import accumulate
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ipc import codec
from ipc.protocol import Kind, Message
from workerpool import faults
from workerpool.backlog import Backlog
from workerpool.busy import BusyMeter
from workerpool.context import WorkerStats
from workerpool.errors import PayloadError, RequestTimeoutError, WorkerPoolError
from workerpool.faults import Fate
from workerpool.replies import Replies, UnencodableResult

F = TypeVar("F", bound=Callable[..., Any])
_ATTR = "__workerpool_batch__"


class BatchSpec(BaseModel):
    """How a batched method's batches are formed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(32, ge=1, le=65536,
                                description="Most requests in one call of the method.")
    max_delay_ms: float = Field(2.0, ge=0, le=60_000,
                                description="Longest the oldest request of a partial batch "
                                "waits for more before the batch runs anyway.")


def batched(max_batch_size: int = 32, max_delay_ms: float = 2.0) -> Callable[[F], F]:
    """Declare a handler method batched: it gets ``list[payload]``, returns a list as long.

    Raises ``pydantic.ValidationError`` for bad limits and ``TypeError`` for a generator
    method (a batch cannot stream).
    """
    spec = BatchSpec(max_batch_size=max_batch_size, max_delay_ms=max_delay_ms)

    def mark(fn: F) -> F:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(f"@batched method {fn.__qualname__} is a generator: batched "
                            "methods return one list of results and cannot stream")
        if inspect.iscoroutinefunction(fn):
            raise TypeError(f"@batched method {fn.__qualname__} is async: handler methods "
                            "are plain functions")
        setattr(fn, _ATTR, spec)
        return fn

    return mark


def batch_spec(method: Any) -> BatchSpec | None:
    """The ``BatchSpec`` of a method decorated with ``@batched`` (bound or not), else None."""
    spec = getattr(method, _ATTR, None)
    return spec if isinstance(spec, BatchSpec) else None


def check_results(method: str, results: Any, n: int) -> list:
    """The batch's results as a list, or ``TypeError`` naming the contract it broke."""
    if not isinstance(results, list | tuple):
        raise TypeError(f"batched method {method!r} returned {type(results).__name__}, not a "
                        f"list: it must return one result (or exception) per request, in order")
    if len(results) != n:
        raise TypeError(f"batched method {method!r} returned {len(results)} results for a "
                        f"batch of {n} requests: it must return one result (or exception) "
                        "per request, in order")
    return list(results)


def size_edges(max_batch_size: int) -> tuple[int, ...]:
    """The bucket upper bounds a method's batch sizes are counted into: the powers of two
    below ``max_batch_size``, then ``max_batch_size - 1`` and ``max_batch_size``.

    Powers of two keep the count small (18 at most) and line up across methods and
    workers with different limits, so their histograms merge exactly; the last two bounds
    set full batches apart from the rest, the figure that says whether batches flush on
    size or on ``max_delay_ms``.
    """
    edges = {1 << k for k in range(max_batch_size.bit_length()) if 1 << k < max_batch_size}
    edges.update(e for e in (max_batch_size - 1, max_batch_size) if e >= 1)
    return tuple(sorted(edges))


class BatchSizeMeter:
    """How many batches of each size every ``@batched`` method ran since the worker became
    ready, counted into the buckets of ``size_edges``.

    The main thread records; the heartbeat thread reads ``report`` and marks what it sent.
    Like ``BusyMeter`` it needs no lock: the methods are fixed at construction, and each
    one's figures are one tuple, replaced whole (an atomic store under the GIL).
    """

    def __init__(self, max_sizes: Mapping[str, int]) -> None:
        self._edges = {m: size_edges(n) for m, n in max_sizes.items()}
        # per method: (batches per bucket, batches, requests)
        self._figures: dict[str, tuple[tuple[int, ...], int, int]] = {
            m: ((0,) * len(edges), 0, 0) for m, edges in self._edges.items()}
        self._reported: dict[str, int] = {}  # the heartbeat thread's: batches last sent

    def record(self, method: str, size: int) -> None:
        """One batch of ``size`` requests of ``method`` ran."""
        counts, n, total = self._figures[method]
        i = min(bisect_left(self._edges[method], size), len(counts) - 1)
        self._figures[method] = ((*counts[:i], counts[i] + 1, *counts[i + 1:]),
                                 n + 1, total + size)

    def report(self) -> dict[str, dict]:
        """The cumulative figures of each method that ran a batch since the last report
        marked ``sent``: ``{method: {"count", "sum", "buckets": [[le, cumulative], ...]}}``
        (``count`` batches holding ``sum`` requests). Empty when nothing changed."""
        out = {}
        for method, (counts, n, total) in self._figures.items():
            if n != self._reported.get(method, 0):
                out[method] = {"count": n, "sum": total,
                               "buckets": [[le, c] for le, c in
                                           zip(self._edges[method], accumulate(counts),
                                               strict=True)]}
        return out

    def sent(self, report: Mapping[str, dict]) -> None:
        """``report`` reached the socket: the next one leaves out what has not moved since."""
        for method, figures in report.items():
            self._reported[method] = figures["count"]

    def resend(self) -> None:
        """The router lost what it was sent (it restarted, or gave up this connection):
        the next report carries every method that ever ran a batch."""
        self._reported.clear()


class BatchHost(Protocol):
    """What a ``BatchRunner`` needs from the worker that holds the requests."""

    backlog: Backlog  # received, not started, oldest first
    stats: WorkerStats
    replies: Replies
    busy: BusyMeter  # the handler's running time, for utilization
    sizes: BatchSizeMeter  # the sizes of the batches run, for status

    def more_may_come(self) -> bool:
        """The router may send more: the worker holds less than it may, and is not stopping."""

    def receive(self, wait_ms: int) -> None:
        """Wait up to ``wait_ms`` for messages and take them in (0: only what is there)."""

    def decode(self, msg: Message) -> tuple[Any, bool]:
        """The request's payload, and whether its reply may use shared memory; raises
        ``codec.PayloadError``."""

    def fail(self, req_ids: list[int], exc: BaseException) -> None:
        """Answer each request with what the handler's ``exc`` means (faults.py); a
        poisoned CUDA context ends the process."""


class BatchRunner:
    """Forms and runs the batches of a worker's ``@batched`` methods.

    ``gathering`` holds the requests of the batch being formed and ``running`` counts those
    of the batch running now: both are requests the worker holds (``held``).
    """

    def __init__(self, host: BatchHost) -> None:
        self.host = host
        self.gathering: OrderedDict[int, Message] = OrderedDict()
        self.arrived: dict[int, float] = {}  # when each backlog request arrived (monotonic)
        self.running = 0

    def held(self) -> int:
        return len(self.gathering) + self.running

    def cancel(self, req_id: int) -> bool:
        """Forget ``req_id``; True if it was waiting in the batch being formed."""
        self.arrived.pop(req_id, None)
        return self.gathering.pop(req_id, None) is not None

    def run(self, first: Message, arrived: float | None, spec: BatchSpec,
            method_fn: Callable[[list], Any]) -> None:
        """Gather the requests for ``first``'s method, run the method once, answer each.

        The batch runs when it is full, when ``first`` (the oldest) has waited
        ``max_delay_ms``, when the worker holds all the router will send it, or when the
        worker is stopping. Requests cancelled meanwhile, or whose ``timeout`` has certainly
        passed, are answered and left out.
        """
        host = self.host
        method = first.meta["method"]
        gathering = self.gathering
        gathering[first.req_id] = first
        now = time.monotonic()
        arrived_at = {first.req_id: now if arrived is None else arrived}
        flush_at = arrived_at[first.req_id] + spec.max_delay_ms / 1000
        while True:
            self._take_matching(method, spec.max_batch_size, arrived_at)
            if (not gathering or len(gathering) >= spec.max_batch_size
                    or not host.more_may_come()):
                break
            wait = flush_at - time.monotonic()
            if wait <= 0:
                break
            host.receive(math.ceil(wait * 1000))  # CANCELs drop from the batch, pings answered
        host.receive(0)  # last chance for a CANCEL to overtake the batch
        self._take_matching(method, spec.max_batch_size, arrived_at)
        if not gathering:
            return  # every request was cancelled while the batch formed
        msgs = list(gathering.values())
        gathering.clear()
        self.running = host.stats.running = len(msgs)
        try:
            self._execute(method, method_fn, msgs, arrived_at, first.req_id)
        finally:
            self.running = 0
        host.replies.flush()  # a batch travels, and is answered, as a batch: one BUNDLE

    def _take_matching(self, method: str, limit: int, arrived_at: dict[int, float]) -> None:
        """Move requests for ``method`` from the backlog into the batch, oldest first."""
        room = limit - len(self.gathering)
        if room <= 0:
            return
        for msg in self.host.backlog.take_matching(method, room):
            rid = msg.req_id
            self.gathering[rid] = msg
            arrived_at[rid] = self.arrived.pop(rid, time.monotonic())

    def _execute(self, method: str, method_fn: Callable[[list], Any], msgs: list[Message],
                 arrived_at: dict[int, float], oldest: int) -> None:
        host, replies = self.host, self.host.replies
        now = time.monotonic()
        ids: list[int] = []
        payloads: list[Any] = []
        shm_ok: dict[int, bool] = {}
        for msg in msgs:
            timeout = msg.meta.get("timeout")
            if (isinstance(timeout, int | float) and not isinstance(timeout, bool)
                    and arrived_at[msg.req_id] + timeout <= now):
                # Admitted before it arrived here: its deadline has passed for sure, and the
                # router's CANCEL is on its way. Running it would be wasted work.
                replies.error(msg.req_id, RequestTimeoutError(
                    f"timeout={timeout:g}s passed before its batch ran"))
                continue
            try:
                payload, shm_ok[msg.req_id] = host.decode(msg)
            except codec.PayloadError as exc:
                extra = {"code": exc.code} if exc.code else {}
                replies.error(msg.req_id, PayloadError(str(exc), **extra))
                continue
            payloads.append(payload)
            ids.append(msg.req_id)
        if not ids:
            return
        if ids != [oldest]:
            # The router assumes a worker runs only the oldest request it holds; tell it which
            # ones started (several, or a later one when the oldest was left out), so a
            # crash now is answered as a crash for exactly these.
            replies.send(Kind.STARTED, 0, {"ids": ids})
        host.stats.batches += 1
        host.stats.batched_requests += len(ids)
        host.sizes.record(method, len(ids))
        replies.wait_unsent()  # the handler may reuse memory an earlier reply is still sent from
        busy = host.busy
        busy.begin()
        try:
            results = check_results(method, method_fn(payloads), len(ids))
        except Exception as exc:
            busy.end()
            host.fail(ids, exc)
            return
        busy.end()
        for r in results:
            if (isinstance(r, BaseException) and not isinstance(r, WorkerPoolError)
                    and faults.fate_of(r) is Fate.POISONED):
                host.fail(ids, r)  # one item's fault poisoned the context
                return
        for k, (rid, value) in enumerate(zip(ids, results, strict=True)):
            if isinstance(value, WorkerPoolError):
                replies.error(rid, value)  # a typed error the handler chose for this caller
            elif isinstance(value, BaseException):
                host.fail([rid], value)
            else:
                try:
                    replies.value(Kind.RESULT, rid, value, shm_ok[rid])
                except UnencodableResult as exc:
                    replies.error(rid, PayloadError(str(exc)))
                except Exception as exc:
                    # Encoding copies a CUDA result to the host, where an earlier kernel's
                    # sticky error surfaces: then every caller not yet answered hears it.
                    poisoned = faults.fate_of(exc) is Fate.POISONED
                    host.fail(ids[k:] if poisoned else [rid], exc)
