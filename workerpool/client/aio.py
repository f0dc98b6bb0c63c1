"""``AsyncClient``: the same client for one asyncio event loop.

::

    submit/call/stream/admin -> _RequestFuture + Pending -> Replies.add
                             -> _out: a loop turn's first message at once, the rest
                                bundled when the turn ends -> DEALER -> router
                                                                      |
    await Future / async-for stream queue <-- Replies.apply <-- _pump <-+
        (loop.add_reader on the DEALER's FD, or call_soon after a send found replies)
    _on_timer (a loop timer, set to the next deadline or ping):
        Replies.expire -> CANCEL each;  RouterWatch ping while requests are outstanding

Everything runs in the loop's thread, so the socket and ``Replies`` are used as the sync
client's I/O thread uses them, with the same raw ``ipc/transport.py`` calls: a request is
sent from ``submit`` itself (or, after the first of a loop turn, in that turn's bundle),
and each wake-up drains every waiting reply. pyzmq's asyncio
socket would cost a Future and a loop round per message each way.

ZeroMQ's FD signals only a change: any send or receive may consume the signal for replies
that are already waiting. So after every send the client asks the socket whether a reply
waits (``transport.readable``) and, if so, drains it soon; a drain goes on until the
socket is empty, or yields to the loop after ``_PUMP_BATCH`` replies and continues.

Deadlines and pings are one ``call_later`` handle, moved only when a new request's
deadline comes before it, instead of a task or a timer per request.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from ipc import curve, protocol, transport
from ipc import shm as segments
from ipc.lifecycle import AdminOp
from ipc.protocol import Kind
from workerpool.client._base import HANDSHAKE_EVENTS, BaseClient
from workerpool.client._replies import Pending
from workerpool.config import DEFAULT_FRONTEND, DEFAULT_MAX_MESSAGE_BYTES
from workerpool.errors import BackpressureError, ClientClosedError

#: Replies handled in one loop callback (a bundle's each); then the drain continues after the loop's other
#: ready callbacks, so a flood of replies cannot starve the application's tasks.
_PUMP_BATCH = 256


class _RequestFuture(asyncio.Future):
    """``AsyncClient.submit``'s Future: a successful ``cancel()`` (also the one asyncio
    makes when a task awaiting it is cancelled) tells the router to forget the request.
    An override, not a done-callback: no callback scheduled per request."""

    def __init__(self, client: AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._client = client
        self.rid = 0  # 0: nothing to cancel at the router (a STATUS or ADMIN call)

    def cancel(self, msg: Any = None) -> bool:
        cancelled = super().cancel(msg)  # False once done: one CANCEL, however often called
        if cancelled and self.rid:
            self._client._cancel(self.rid)
        return cancelled


class AsyncClient(BaseClient):
    """asyncio client; use inside one event loop. Same arguments, operations, deadlines
    and errors as ``Client``, each operation awaitable.

    >>> async with AsyncClient("tcp://127.0.0.1:5555") as c:
    ...     await c.call("echo", {"x": 1})
    """

    def __init__(self, address: str = DEFAULT_FRONTEND, *, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, shm: bool | None = None,
                 shm_pool_bytes: int = segments.POOL_BYTES, key: str | None = None,
                 router_key: str | None = None, keys: str | None = None,
                 role: str = "client") -> None:
        transport.check_endpoint(address)  # before anything is made that must be closed
        super().__init__(address, timeout=timeout, max_message_bytes=max_message_bytes,
                         shm=shm, shm_pool_bytes=shm_pool_bytes, key=key,
                         router_key=router_key, keys=keys, role=role)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        curve.secure_client(self._sock, self._curve)
        # With keys, a refused handshake is reported here (see HandshakeWatch).
        self._monitor = self._sock.get_monitor_socket(HANDSHAKE_EVENTS) \
            if self._curve else None
        self._sock.connect(address)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the first request
        self._fds: list[int] = []  # the loop watches these: the DEALER's, the monitor's
        self._pump_soon = False  # a _pump is scheduled with call_soon
        # Requests a send could not take yet (no keys, no connection yet), sent in order
        # by _pump once the socket can; normally empty, a DEALER queues until it connects.
        self._unsent: collections.deque[list] = collections.deque()
        # The first message of a loop turn goes at once; the rest of that turn's wait here,
        # (request id, frames), and go bundled when the turn ends (_end_turn).
        self._turn_open = False
        self._later: list[tuple[int, list]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # time.monotonic() at which _timer fires
        self._closed = False
        self._error: BaseException | None = None
        self._overruns = 0

    @property
    def unmatched_replies(self) -> int:
        """Replies that matched no outstanding request: after a local timeout or cancel,
        or a duplicate."""
        return self._replies.unmatched

    @property
    def malformed_replies(self) -> int:
        """Messages from the router that did not decode. A malformed reply that names its
        request fails that request with ``ProtocolError`` at once; either way it is counted
        here, and it stays 0 with a healthy router."""
        return self._replies.malformed

    @property
    def streams_overrun(self) -> int:
        """Streams ended because their reader fell ``max_buffered`` items behind."""
        return self._overruns

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- public API -------------------------------------------------------------------------
    async def submit(self, method: str, payload: Any = None, *, service: str | None = None,
                     priority: int = 0, timeout: float | None = None,
                     idempotent: bool | None = None) -> asyncio.Future:
        """Send a request; return an asyncio Future for its result (a list for a streaming
        method). Cancelling the Future cancels the request."""
        return self.submit_nowait(method, payload, service=service, priority=priority,
                                  timeout=timeout, idempotent=idempotent)

    def submit_nowait(self, method: str, payload: Any = None, *, service: str | None = None,
                      priority: int = 0, timeout: float | None = None,
                      idempotent: bool | None = None) -> asyncio.Future:
        """``submit`` for code running in the client's event loop without a coroutine of
        its own (a callback): the request is sent now and its Future returned."""
        fut = _RequestFuture(self, self._start())
        rid, frames, entry = self._new_request(fut, None, method, payload, service, priority,
                                               timeout, idempotent)
        fut.rid = rid
        self._send(rid, entry, frames)
        return fut

    async def call(self, method: str, payload: Any = None, *, service: str | None = None,
                   priority: int = 0, timeout: float | None = None,
                   idempotent: bool | None = None) -> Any:
        """Send a request and await its result. Cancelling the task cancels the request."""
        return await (await self.submit(method, payload, service=service, priority=priority,
                                        timeout=timeout, idempotent=idempotent))

    async def stream(self, method: str, payload: Any = None, *, service: str | None = None,
                     priority: int = 0, timeout: float | None = None,
                     idempotent: bool | None = None,
                     max_buffered: int | None = None) -> AsyncIterator[Any]:
        """Async-iterate a streaming method's items; ``timeout`` bounds the whole stream.
        Leaving the loop early cancels the request.

        Items arrive as fast as the worker makes them, whatever the reader's pace. With
        ``max_buffered``, an item that finds that many received and not yet read ends the
        stream: the request is cancelled at the router, and after the items already
        received the loop raises BackpressureError code ``stream-overrun``. Without it, a
        reader that falls behind holds every item in memory."""
        self._start()
        items: asyncio.Queue = asyncio.Queue()
        put = items.put_nowait
        if max_buffered is not None:
            put = self._bounded_put(items, max_buffered, lambda: rid)
        rid, frames, entry = self._new_request(None, put, method, payload,
                                               service, priority, timeout, idempotent)
        self._send(rid, entry, frames)
        done = False
        try:
            while True:
                kind, value = await items.get()
                if kind is Kind.PARTIAL:
                    yield value
                    continue
                done = True
                if kind is Kind.ERROR:
                    raise value
                if kind is Kind.RESULT:  # a plain method called as a stream: one item
                    yield value
                return
        finally:
            if not done:
                self._cancel(rid)

    def _bounded_put(self, items: asyncio.Queue, limit: int, rid: Any) -> Any:
        """A stream's ``put`` that overruns at ``limit`` unread items (see ``stream``)."""
        def put(pair: tuple) -> None:
            if pair[0] is Kind.PARTIAL and items.qsize() >= limit:
                # Forgotten first, so the error below is the stream's one final outcome.
                self._overruns += 1
                self._cancel(rid())
                items.put_nowait((Kind.ERROR, BackpressureError(
                    f"stream overrun: {limit} items received and not read yet",
                    code="stream-overrun")))
                return
            items.put_nowait(pair)
        return put

    async def status(self, timeout: float = 5.0) -> dict:
        """The router's health table: what ``workerpool status --json`` prints."""
        return await self._admin(Kind.STATUS, None, timeout)

    async def restart_worker(self, worker: str, timeout: float = 5.0) -> dict:
        """Ask the worker's supervisor to restart it (a failed one is reset and started
        again; a running one finishes what it holds first). Raises AdminError for an
        unknown worker."""
        return await self._admin(Kind.ADMIN, {"op": AdminOp.RESTART, "worker": worker}, timeout)

    async def drain_worker(self, worker: str, timeout: float = 5.0) -> dict:
        """Stop sending ``worker`` new requests; it finishes what it holds, then stops and
        is not respawned (``restart_worker`` brings it back). Raises AdminError."""
        return await self._admin(Kind.ADMIN, {"op": AdminOp.DRAIN, "worker": worker}, timeout)

    async def scale(self, service: str, workers: int, timeout: float = 5.0) -> dict:
        """Set how many workers serve ``service``. Up: spares are promoted at once and new
        workers start; down: the idlest workers finish what they hold, then leave. Returns
        ``{"previous", "workers", "retire": [ids], "message"}``; raises AdminError."""
        return await self._admin(Kind.ADMIN, {"op": AdminOp.SCALE, "service": service,
                                              "workers": workers}, timeout)

    async def _admin(self, kind: Kind, meta: dict | None, timeout: float) -> dict:
        fut = _RequestFuture(self, self._start())
        rid, frames, entry = self._control(kind, meta, fut, timeout)
        self._send(rid, entry, frames)
        return await fut

    async def close(self) -> None:
        """Close the socket; outstanding requests fail with ClientClosedError."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._unwatch()
        self._unsent.clear()
        self._later.clear()
        self._replies.fail_all(ClientClosedError("client closed with this request outstanding"))
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()
        self._close_shm()

    # -- plumbing ---------------------------------------------------------------------------
    def _start(self) -> asyncio.AbstractEventLoop:
        """The running loop; on the first request, the loop starts watching the sockets.
        Raises RuntimeError in any other loop: the socket and Futures belong to that one."""
        if self._closed:
            raise ClientClosedError("client is closed")
        if self._error is not None:
            raise ClientClosedError(f"client reader failed: {self._error!r}")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None:
                raise RuntimeError("this AsyncClient belongs to the event loop of its first "
                                   "request; use one client per event loop")
            self._watch_sockets(loop)
        return loop

    def _watch_sockets(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        fd = self._sock.getsockopt(zmq.FD)
        loop.add_reader(fd, self._pump)
        self._fds.append(fd)
        if self._monitor is not None:
            fd = self._monitor.getsockopt(zmq.FD)
            loop.add_reader(fd, self._on_monitor)
            self._fds.append(fd)
            self._on_monitor()  # events from before now; and the FD signals from here on

    def _unwatch(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for fd in self._fds:
                loop.remove_reader(fd)
        self._fds.clear()

    def _send(self, rid: int, entry: Pending, frames: list) -> None:
        """Track the request, make sure the timer covers its deadline, send it."""
        self._replies.add(rid, entry)
        if self._handshake.refused is not None:
            self._replies.fail(rid, self._handshake.refused)
            return
        when = self._watch.next_ping  # once requests are outstanding, pings are due
        if entry.deadline is not None and entry.deadline < when:
            when = entry.deadline
        if when < self._timer_at:
            self._set_timer(when)
        self._out(rid, frames)

    def _out(self, rid: int, frames: list) -> None:
        """Every message to the router goes here, so their order is kept: the first of a
        loop turn is sent now (a lone request does not wait), the others when the turn
        ends, bundled. ``rid`` fails if the message cannot be sent (0: nothing fails)."""
        if self._turn_open:
            self._later.append((rid, frames))
            return
        self._turn_open = True
        self._loop.call_soon(self._end_turn)
        if not self._put(frames) and rid:
            self._replies.fail(rid, self._handshake.refused or self._handshake.unsendable())

    def _end_turn(self) -> None:
        """Send what this loop turn added after its first message, bundled."""
        self._turn_open = False
        if self._later and not self._closed:
            later, self._later = self._later, []
            self._send_batched(later, self._put)

    def _put(self, frames: list) -> bool:
        """Send ``frames`` now, without waiting. False: with keys, there is no connection
        to send on (ZeroMQ drops a refused one for good: a send would wait forever).
        Without keys a DEALER queues until it connects; should it refuse all the same,
        the frames wait in ``_unsent`` for ``_pump``."""
        sock = self._sock
        if self._unsent:
            self._unsent.append(frames)  # behind those already waiting: order is kept
            return True
        try:
            transport.send(sock, frames, transport.NOBLOCK)
        except zmq.Again:
            self._pump_later()  # replies still count; unsent frames: it tries again
            if self._monitor is not None:
                return False
            self._unsent.append(frames)  # and if the socket still refuses, its FD tells when
            return True
        # The send may have consumed the FD's signal for waiting replies (a pump already
        # due drains them anyway).
        if not self._pump_soon and transport.readable(sock):
            self._pump_later()
        return True

    def _cancel(self, rid: int) -> None:
        """The caller gave up on ``rid`` (a cancelled Future, a stream left early)."""
        if self._replies.forget(rid) and not self._closed:
            self._out(0, protocol.encode(Kind.CANCEL, rid))

    def _send_again(self, rid: int, frames: list) -> None:
        self._out(rid, frames)

    def _set_timer(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_later(max(0.0, when - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        """Expire due deadlines, ping the router while requests are outstanding, and set
        the timer again for whichever comes next."""
        self._timer, self._timer_at = None, math.inf
        if self._closed:
            return
        replies = self._replies
        try:
            now = time.monotonic()
            for rid in replies.expire(now):
                self._out(0, protocol.encode(Kind.CANCEL, rid))
            if replies and self._watch.due(now):
                self._out(0, self._watch.ping(replies))
        finally:  # whatever failed, deadlines keep being enforced
            deadline = replies.next_deadline()
            when = math.inf if deadline is None else deadline
            if replies and self._watch.next_ping < when:
                when = self._watch.next_ping
            if when < math.inf:
                self._set_timer(when)

    def _pump_later(self) -> None:
        if not self._pump_soon:
            self._pump_soon = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Send what waits in ``_unsent``, then handle every waiting reply: until the
        socket has none (its FD then signals the next), or ``_PUMP_BATCH`` of them, when
        the rest follow after the loop's other ready callbacks."""
        self._pump_soon = False
        if self._closed:
            return
        sock = self._sock
        try:
            if self._unsent:
                self._flush()
            budget = _PUMP_BATCH
            while budget > 0:
                try:
                    frames = transport.recv(sock, transport.NOBLOCK)
                except zmq.Again:
                    # The socket's FD is edge-triggered, and this receive may have taken
                    # its signal that a connection came up: frames still waiting would
                    # then wait for the next reply, which may never come. Ask instead.
                    if self._unsent and transport.writable(sock):
                        self._pump_later()
                    return
                budget -= self._take(frames)
            self._pump_later()
        except Exception as exc:  # surface to callers instead of dying silently
            self._error = exc
            self._unwatch()
            self._replies.fail_all(ClientClosedError(f"client reader failed: {exc!r}"))
            raise

    def _flush(self) -> None:
        """Send ``_unsent`` in order, as far as the socket takes it now."""
        unsent, sock = self._unsent, self._sock
        while unsent:
            try:
                transport.send(sock, unsent[0], transport.NOBLOCK)
            except zmq.Again:
                return
            unsent.popleft()

    def _on_monitor(self) -> None:
        """The router refused our key: fail what is outstanding now, not at its timeout."""
        while not self._closed:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            refused = self._handshake.on_event(event)
            if refused is not None:
                self._replies.fail_all(refused)
