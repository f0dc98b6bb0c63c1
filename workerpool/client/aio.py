"""``AsyncClient``: the same client for one asyncio event loop.

::

    submit/call/stream/admin -> _RequestFuture + Pending -> Replies.add -> DEALER -> router
                                                                                       |
    await Future / async-for stream queue <-- Replies.apply <-- _read_loop <-- DEALER <-+
    _on_timer (a loop timer, set to the next deadline or ping):
        Replies.expire -> CANCEL each;  RouterWatch ping while requests are outstanding

Everything runs in the loop's thread, so ``Replies`` is used as the sync client's I/O
thread uses it. Deadlines and pings are one ``call_later`` handle, moved only when a new
request's deadline comes before it, instead of a task or a timer per request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from ipc import curve, protocol
from ipc import shm as segments
from ipc.lifecycle import AdminOp
from ipc.protocol import FrameError, Kind
from workerpool.client._base import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HANDSHAKE_EVENTS,
    BaseClient,
    HandshakeWatch,
    RouterWatch,
    router_restarted,
)
from workerpool.client._replies import Pending, Replies
from workerpool.config import DEFAULT_FRONTEND
from workerpool.errors import ClientClosedError


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
        super().__init__(address, timeout=timeout, max_message_bytes=max_message_bytes,
                         shm=shm, shm_pool_bytes=shm_pool_bytes, key=key,
                         router_key=router_key, keys=keys, role=role)
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        curve.secure_client(self._sock, self._curve)
        # With keys, a refused handshake is reported here (see HandshakeWatch).
        self._monitor = self._sock.get_monitor_socket(HANDSHAKE_EVENTS) \
            if self._curve else None
        self._sock.connect(address)
        self._replies = Replies(self._pool)
        self._watch = RouterWatch()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the first request
        self._reader: asyncio.Task | None = None
        self._handshakes: asyncio.Task | None = None  # reads self._monitor, with keys
        self._handshake = HandshakeWatch(address)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # time.monotonic() at which _timer fires
        self._closed = False
        self._error: BaseException | None = None

    @property
    def unmatched_replies(self) -> int:
        """Replies that matched no outstanding request: after a local timeout or cancel,
        or a duplicate."""
        return self._replies.unmatched

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
        fut = _RequestFuture(self, self._start())
        rid, frames, entry = self._new_request(fut, None, method, payload, service, priority,
                                               timeout, idempotent)
        fut.rid = rid
        await self._send(rid, entry, frames)
        return fut

    async def call(self, method: str, payload: Any = None, *, service: str | None = None,
                   priority: int = 0, timeout: float | None = None,
                   idempotent: bool | None = None) -> Any:
        """Send a request and await its result. Cancelling the task cancels the request."""
        return await (await self.submit(method, payload, service=service, priority=priority,
                                        timeout=timeout, idempotent=idempotent))

    async def stream(self, method: str, payload: Any = None, *, service: str | None = None,
                     priority: int = 0, timeout: float | None = None,
                     idempotent: bool | None = None) -> AsyncIterator[Any]:
        """Async-iterate a streaming method's items; ``timeout`` bounds the whole stream.
        Leaving the loop early cancels the request."""
        self._start()
        items: asyncio.Queue = asyncio.Queue()
        rid, frames, entry = self._new_request(None, items.put_nowait, method, payload,
                                               service, priority, timeout, idempotent)
        await self._send(rid, entry, frames)
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
        await self._send(rid, entry, frames)
        return await fut

    async def close(self) -> None:
        """Close the socket; outstanding requests fail with ClientClosedError."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for task in (self._reader, self._handshakes):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._replies.fail_all(ClientClosedError("client closed with this request outstanding"))
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()
        self._close_shm()

    # -- plumbing ---------------------------------------------------------------------------
    def _start(self) -> asyncio.AbstractEventLoop:
        """The running loop; on the first request, start reading replies in it."""
        if self._closed:
            raise ClientClosedError("client is closed")
        if self._error is not None:
            raise ClientClosedError(f"client reader failed: {self._error!r}")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._reader = self._loop.create_task(self._read_loop())
            if self._monitor is not None:
                self._handshakes = self._loop.create_task(self._watch_handshakes())
        return self._loop

    async def _send(self, rid: int, entry: Pending, frames: list) -> None:
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
        if self._monitor is None:
            await self._sock.send_multipart(frames, copy=False)
            return
        # ZeroMQ drops a refused connection for good: a send would wait forever.
        try:
            await self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._replies.fail(rid, self._handshake.refused or self._handshake.unsendable())

    def _cancel(self, rid: int) -> None:
        """The caller gave up on ``rid`` (a cancelled Future, a stream left early)."""
        if self._replies.forget(rid) and not self._closed:
            self._send_nowait(protocol.encode(Kind.CANCEL, rid))

    def _send_nowait(self, frames: list) -> None:
        """Send from plain code (a cancel, the timer). The DEALER has no send limit, so
        this normally completes at once; otherwise pyzmq finishes it from the loop."""
        fut = self._sock.send_multipart(frames)
        fut.add_done_callback(_retrieve)

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
                self._send_nowait(protocol.encode(Kind.CANCEL, rid))
            if replies and self._watch.due(now):
                self._send_nowait(self._watch.ping(replies))
        finally:  # whatever failed, deadlines keep being enforced
            deadline = replies.next_deadline()
            when = math.inf if deadline is None else deadline
            if replies and self._watch.next_ping < when:
                when = self._watch.next_ping
            if when < math.inf:
                self._set_timer(when)

    async def _read_loop(self) -> None:
        replies, watch = self._replies, self._watch
        try:
            while True:
                parts = await self._sock.recv_multipart(copy=False)
                # Buffer frames stay zmq.Frame (no copy, writable), as in transport.recv.
                frames = [parts[0].bytes, *parts[1:]]
                if (pong := watch.pong_body(frames)) is not None:
                    for rid in watch.lost(pong, time.monotonic()):
                        replies.fail(rid, router_restarted())
                    continue
                try:
                    kind, rid, value, meta = self._parse_reply(frames)
                except FrameError:
                    continue  # a reply we cannot attribute to any request
                request = replies.apply(kind, rid, value, meta)
                if request is not None:  # its worker cannot map our segments: send frames
                    again = self._resend_frames(rid, request)
                    if again is None:
                        replies.apply(kind, rid, value, meta)
                    else:
                        await self._sock.send_multipart(again, copy=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surface to callers instead of dying silently
            self._error = exc
            replies.fail_all(ClientClosedError(f"client reader failed: {exc!r}"))
            raise


    async def _watch_handshakes(self) -> None:
        """The router refused our key: fail what is outstanding now, not at its timeout."""
        while True:
            event = (await recv_monitor_message(self._monitor))["event"]
            refused = self._handshake.on_event(event)
            if refused is not None:
                self._replies.fail_all(refused)


def _retrieve(fut: asyncio.Future) -> None:
    """A send nobody awaits: read its outcome, so a failed one is not logged as an
    exception never retrieved (the request's own deadline still ends it)."""
    if not fut.cancelled():
        fut.exception()
