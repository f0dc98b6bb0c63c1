"""The outstanding requests of one client and what each reply does to them; no I/O.

::

    client: add(rid, Pending(future | stream put, deadline))   --> table {rid: Pending}
                                                                    + deadline heap
    reader: apply(kind, rid, value, meta)  PARTIAL --> stream put, or kept for the future
                                           RESULT / END / ERROR --> settle, drop, shm freed
    router watch: fail(rid, RouterRestartedError)
    timer:  expire(now) --> RequestTimeoutError for each due request; returns their ids
    cancel: forget(rid);  close / broken loop: fail_all(ClientClosedError)

Both clients drive one ``Replies`` from one thread each (``Client``'s I/O thread,
``AsyncClient``'s event loop), so nothing here takes a lock. A request has exactly one
outcome: whatever settles it first removes it from the table, and a later reply for its id
finds nothing and is only counted (``unmatched``). That is how a reply arriving after a
local timeout, a cancel or a router restart is dropped.

A Future here is ``concurrent.futures.Future`` (``Client``) or ``asyncio.Future``
(``AsyncClient``); a stream is the ``put`` of a ``queue.SimpleQueue`` or an
``asyncio.Queue`` receiving ``(kind, value)`` pairs. Their methods have the same names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ipc import codec, protocol
from ipc.protocol import FrameError, Kind
from workerpool.errors import PayloadError, RequestTimeoutError, WorkerPoolError

_TIMER_SLACK = 1024  # disarmed local deadlines tolerated before the heap is rebuilt
# A future may be cancelled by its owner (another thread, for Client) between the table
# lookup and the set: the set then raises, and the reply is simply not needed any more.
_INVALID_STATE = (concurrent.futures.InvalidStateError, asyncio.InvalidStateError)


class Pending:
    """One outstanding request: a Future, or a stream's ``put``."""

    __slots__ = ("deadline", "future", "partials", "put", "request")

    def __init__(self, future: Any, put: Callable[[tuple], Any] | None,
                 deadline: float | None) -> None:
        self.future = future
        self.put = put
        self.deadline = deadline  # time.monotonic() at which it fails locally; None: never
        self.partials: list | None = None  # a Future for a streaming method collects here
        self.request: tuple | None = None  # its arguments, while its arrays are in shm


class Replies:
    """The table of outstanding requests by id, their local deadlines, and every way one
    of them ends. ``pool`` is the client's ``SegmentPool`` (None without shared memory):
    it may reuse a request's segments once the request has ended."""

    def __init__(self, pool: Any = None) -> None:
        self._table: dict[int, Pending] = {}
        self._timers: list[tuple[float, int]] = []  # (deadline, rid), a heap
        self._pool = pool
        #: Replies that matched no outstanding request: after a local timeout or cancel,
        #: or a duplicate. With neither, it must stay 0 (the chaos test checks it).
        self.unmatched = 0
        #: Messages from the router that did not decode (a malformed reply or BUNDLE).
        self.malformed = 0

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[int]:
        return iter(self._table)

    def __contains__(self, rid: int) -> bool:
        return rid in self._table

    def add(self, rid: int, entry: Pending) -> None:
        """Track a request that is being sent, and arm its local deadline.

        Timers of answered requests are skipped when due, not removed; with long timeouts
        at a high rate they would pile up, so when they outnumber the outstanding requests
        the heap keeps only the armed ones (amortized O(1))."""
        table = self._table
        table[rid] = entry
        if entry.deadline is not None:
            timers = self._timers
            heapq.heappush(timers, (entry.deadline, rid))
            if len(timers) > 2 * len(table) + _TIMER_SLACK:
                timers[:] = [t for t in timers
                             if (p := table.get(t[1])) is not None and p.deadline == t[0]]
                heapq.heapify(timers)

    def apply(self, kind: Kind, rid: int, value: Any, meta: bytes) -> tuple | None:
        """Apply one decoded reply (``value`` is the error for ERROR); ``meta`` is its meta
        frame, kept undecoded on the Future for ``reply_meta``.

        Returns the request's arguments when its worker could not map our segments: the
        caller sends it again in frames under the same id (``BaseClient._resend_frames``),
        and the entry waits for that answer. If the caller cannot, it applies the same
        reply once more, which then settles the request with it.
        """
        entry = self._table.get(rid)
        if entry is None:
            # Timed out or cancelled here already; otherwise a second reply (a bug).
            self.unmatched += 1
            return None
        if kind is Kind.PARTIAL:
            if entry.put is not None:
                entry.put((kind, value))
            elif entry.partials is None:
                entry.partials = [value]
            else:
                entry.partials.append(value)
            return None
        if kind is Kind.ERROR and entry.request is not None:
            request, entry.request = entry.request, None
            if isinstance(value, PayloadError) and value.extra.get("code") == codec.SHM_UNREACHABLE:
                return request
        del self._table[rid]
        if self._pool is not None:
            self._pool.finish(rid)
        if entry.put is not None:
            entry.put((kind, value))
            return None
        fut = entry.future
        # Kept undecoded: only reply_meta() reads it, and most callers never do.
        fut._wp_reply_meta = meta
        try:
            if kind is Kind.ERROR:
                fut.set_exception(value)
            elif kind is Kind.END:
                fut.set_result(entry.partials or [])
            else:
                fut.set_result(value)
        except _INVALID_STATE:
            pass
        return None

    def fail(self, rid: int, err: WorkerPoolError) -> bool:
        """End request ``rid`` with ``err`` raised locally (no reply came). False: it was
        not outstanding."""
        entry = self._table.pop(rid, None)
        if entry is None:
            return False
        if self._pool is not None:
            self._pool.finish(rid)
        _raise_in(entry, err)
        return True

    def forget(self, rid: int) -> bool:
        """Drop request ``rid`` without answering it: its caller cancelled it. False: it
        was not outstanding (already answered, or cancelled twice)."""
        if self._table.pop(rid, None) is None:
            return False
        if self._pool is not None:
            self._pool.finish(rid)
        return True

    def fail_all(self, err: WorkerPoolError) -> None:
        """End every outstanding request with ``err`` (the client closed or broke)."""
        table, self._table = self._table, {}
        self._timers.clear()
        for rid, entry in table.items():
            if self._pool is not None:
                self._pool.finish(rid)
            _raise_in(entry, err)

    def expire(self, now: float) -> Sequence[int]:
        """Fail each request whose local deadline is at or before ``now`` with
        RequestTimeoutError; returns their ids (the caller tells the router to forget
        them). Timers of requests that have ended are skipped."""
        timers = self._timers
        if not timers or timers[0][0] > now:
            return ()
        expired = []
        while timers and timers[0][0] <= now:
            deadline, rid = heapq.heappop(timers)
            entry = self._table.get(rid)
            if entry is None or entry.deadline != deadline:
                continue
            self.fail(rid, RequestTimeoutError(
                "no reply before the deadline (router unreachable or slow)"))
            expired.append(rid)
        return expired

    def next_deadline(self) -> float | None:
        """The earliest local deadline of an outstanding request, or None: when to call
        ``expire`` next. Timers of requests that have ended are dropped from the top on
        the way, so the caller's poll or loop timer wakes only for a live deadline (each
        timer is popped once, here or in ``expire``)."""
        timers, table = self._timers, self._table
        while timers:
            deadline, rid = timers[0]
            entry = table.get(rid)
            if entry is not None and entry.deadline == deadline:
                return deadline
            heapq.heappop(timers)
        return None


def _raise_in(entry: Pending, err: WorkerPoolError) -> None:
    if entry.put is not None:
        entry.put((Kind.ERROR, err))
        return
    try:
        entry.future.set_exception(err)
    except _INVALID_STATE:
        pass


_reply_metas = protocol.MetaCache(256)  # a worker's replies all carry the same meta bytes


def reply_meta(fut: Any) -> dict | None:
    """The meta map of the router's final reply to a ``submit`` Future, or None when no
    reply arrived (a local deadline, a cancel, a router restart, a closed client).

    A reply a worker produced carries ``{"worker": slot}``; one the router made itself
    (a timeout, backpressure, a crash) carries ``{}``. ``workerpool loadtest`` uses it to
    tell answered requests from unanswered ones and to count each worker's share.
    """
    frame = getattr(fut, "_wp_reply_meta", None)
    if frame is None:
        return None
    try:
        return _reply_metas.unpack(frame)
    except FrameError:
        return {}
