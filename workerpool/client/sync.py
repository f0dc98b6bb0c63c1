"""``Client``: thread-safe, ``concurrent.futures``, one background I/O thread.

::

    user threads                                   I/O thread (_io_loop)
      submit -> _RequestFuture + Pending   outbox              all at once, batched:
             -> (rid, Pending, frames) ---> deque --> Replies.add --> DEALER --> router
      (wake-up byte only while it polls)                BUNDLEs                    |
      Future.result() / stream queue <--- Replies.apply(each reply) <---- DEALER <-+
                                          Replies.expire / RouterWatch pings, each pass

ZeroMQ sockets are not thread-safe: the socket and the ``Replies`` table belong to
whoever holds ``_io_lock``. That is the I/O thread while anything is outstanding. A
``call`` made while nothing is (one request at a time, the common case of a sequential
caller) takes the lock itself, sends, and reads its own reply for up to ``DIRECT_WAIT``,
then hands whatever is left to the I/O thread: that saves two thread wake-ups per call,
about a third of a no-op call's time. The I/O thread, when idle, polls only its wake-up
socket. It holds only a weak reference to the ``Client``, so a dropped client is
collected and its thread ends.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from ipc import curve, protocol, transport
from ipc import shm as segments
from ipc.lifecycle import AdminOp
from ipc.protocol import Kind
from workerpool.client._base import HANDSHAKE_EVENTS, BaseClient
from workerpool.client._replies import Pending, Replies
from workerpool.config import DEFAULT_FRONTEND, DEFAULT_MAX_MESSAGE_BYTES, TIMINGS
from workerpool.errors import ClientClosedError

DIRECT_WAIT = 0.05
"""How long a ``call`` made while nothing is outstanding waits for its reply on the
socket itself before the I/O thread takes over (pings and deadlines are the I/O
thread's, and it waits for the lock meanwhile)."""


class _RequestFuture(concurrent.futures.Future):
    """``Client.submit``'s Future: a successful ``cancel()`` tells the router to forget the
    request (an override, not a done-callback: one less callback per request)."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client
        self.rid = 0  # 0: nothing to cancel at the router (a STATUS or ADMIN call)

    def cancel(self) -> bool:
        was_cancelled = self.cancelled()
        cancelled = super().cancel()
        if cancelled and not was_cancelled and self.rid:  # one CANCEL, however often called
            self._client._cancel(self.rid)
        return cancelled


class Client(BaseClient):
    """Thread-safe synchronous client.

    >>> with Client("tcp://127.0.0.1:5555") as c:
    ...     c.call("echo", {"x": 1}, timeout=5)

    ``timeout`` is the default per-request deadline in seconds (None: wait forever).
    ``max_message_bytes`` bounds a request's and a reply's body plus array bytes. ``shm``:
    large arrays go through shared memory (None: when the router is on this host, see
    ``is_local``); ``shm_pool_bytes`` bounds the segments this client keeps.
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
        self._io_lock = threading.Lock()  # the socket and self._replies are its holder's
        self._direct_calls = 0  # calls answered without the I/O thread (tests read it)
        self._outbox: collections.deque = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._direct_poller = zmq.Poller()  # a direct call's: its reply, or work pushed
        self._direct_poller.register(self._sock, zmq.POLLIN)
        self._direct_poller.register(self._wake_r, zmq.POLLIN)
        self._woken = True  # the I/O thread is not polling yet: no wake-up byte needed
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=_io_loop,
            args=(weakref.ref(self), self._replies, self._sock, self._wake_r, self._close_shm,
                  self._monitor),
            name=f"workerpool-client-{address}", daemon=True)
        self._thread.start()

    @property
    def unmatched_replies(self) -> int:
        """Replies that matched no outstanding request: after a local timeout or cancel,
        or a duplicate. With neither, it stays 0 (the chaos test checks it)."""
        return self._replies.unmatched

    @property
    def malformed_replies(self) -> int:
        """Messages from the router that did not decode. A malformed reply that names its
        request fails that request with ``ProtocolError`` at once; either way it is counted
        here, and it stays 0 with a healthy router."""
        return self._replies.malformed

    # -- public API -------------------------------------------------------------------------
    def submit(self, method: str, payload: Any = None, *, service: str | None = None,
               priority: int = 0, timeout: float | None = None,
               idempotent: bool | None = None) -> concurrent.futures.Future:
        """Send a request; return a Future for its result (a list for a streaming method).

        The Future raises a ``WorkerPoolError`` subclass on failure. ``Future.cancel()``
        tells the router to forget the request.
        """
        fut = _RequestFuture(self)
        rid, frames, entry = self._new_request(fut, None, method, payload, service, priority,
                                               timeout, idempotent)
        fut.rid = rid
        self._push(rid, entry, frames)
        return fut

    def call(self, method: str, payload: Any = None, *, service: str | None = None,
             priority: int = 0, timeout: float | None = None,
             idempotent: bool | None = None) -> Any:
        """Send a request and wait for its result."""
        timeout = self.timeout if timeout is None else timeout
        fut = _RequestFuture(self)
        rid, frames, entry = self._new_request(fut, None, method, payload, service, priority,
                                               timeout, idempotent)
        fut.rid = rid
        if not self._call_directly(rid, entry, frames, fut):
            self._push(rid, entry, frames)
        # The I/O thread enforces the deadline; the margin only guards against its death.
        return fut.result(None if timeout is None else timeout + TIMINGS.local_grace + 5)

    def _call_directly(self, rid: int, entry: Pending, frames: list,
                       fut: concurrent.futures.Future) -> bool:
        """Send ``frames`` and read the reply on this thread, if nothing else is
        outstanding and the I/O thread is not using the socket; False otherwise (the
        caller pushes the request as usual). Past DIRECT_WAIT, or as soon as another
        thread pushes work, the request is the I/O thread's like any other."""
        lock = self._io_lock
        if self._outbox or self._replies or not lock.acquire(blocking=False):
            return False
        replies, sock = self._replies, self._sock
        try:
            if self._outbox or replies or self._closed or self._error is not None \
                    or self._handshake.refused is not None:
                return False
            send = _send_or_refuse if self._monitor is not None else transport.send
            replies.add(rid, entry)
            if send(sock, frames) is None:  # no connection (keys): the I/O thread says why
                replies.fail(rid, self._handshake.refused or self._handshake.unsendable())
                return True
            poller = self._direct_poller
            end = time.monotonic() + DIRECT_WAIT
            if entry.deadline is not None and entry.deadline < end:
                end = entry.deadline
            while not fut.done():
                left = end - time.monotonic()
                if left <= 0:
                    break
                events = dict(poller.poll(left * 1000))
                if sock in events:
                    _read_replies(self, sock)
                if self._wake_r.fileno() in events:
                    break  # another thread pushed work: the I/O thread takes over now
            if fut.done():
                self._direct_calls += 1
            return True
        finally:
            lock.release()
            if not fut.done():
                self._wake()  # the I/O thread polls the socket from now on

    def stream(self, method: str, payload: Any = None, *, service: str | None = None,
               priority: int = 0, timeout: float | None = None,
               idempotent: bool | None = None) -> Iterator[Any]:
        """Yield a streaming method's items as they arrive; ``timeout`` bounds the whole
        stream. Leaving the loop early cancels the request."""
        items: queue.SimpleQueue = queue.SimpleQueue()
        rid, frames, entry = self._new_request(None, items.put, method, payload, service,
                                               priority, timeout, idempotent)
        self._push(rid, entry, frames)
        return self._iterate(rid, items)

    def _iterate(self, rid: int, items: queue.SimpleQueue) -> Iterator[Any]:
        done = False
        try:
            while True:
                kind, value = items.get()
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

    def status(self, timeout: float = 5.0) -> dict:
        """The router's health table: what ``workerpool status --json`` prints."""
        return self._admin(Kind.STATUS, None, timeout)

    def restart_worker(self, worker: str, timeout: float = 5.0) -> dict:
        """Ask the worker's supervisor to restart it (a failed one is reset and started
        again; a running one finishes what it holds first). Raises AdminError for an
        unknown worker."""
        return self._admin(Kind.ADMIN, {"op": AdminOp.RESTART, "worker": worker}, timeout)

    def drain_worker(self, worker: str, timeout: float = 5.0) -> dict:
        """Stop sending ``worker`` new requests; it finishes what it holds, then stops and
        is not respawned (``restart_worker`` brings it back). Raises AdminError."""
        return self._admin(Kind.ADMIN, {"op": AdminOp.DRAIN, "worker": worker}, timeout)

    def scale(self, service: str, workers: int, timeout: float = 5.0) -> dict:
        """Set how many workers serve ``service``. Up: spares are promoted at once and new
        workers start; down: the idlest workers finish what they hold, then leave. Returns
        ``{"previous", "workers", "retire": [ids], "message"}``; raises AdminError."""
        return self._admin(Kind.ADMIN, {"op": AdminOp.SCALE, "service": service,
                                        "workers": workers}, timeout)

    def _admin(self, kind: Kind, meta: dict | None, timeout: float) -> dict:
        fut = _RequestFuture(self)
        rid, frames, entry = self._control(kind, meta, fut, timeout)
        self._push(rid, entry, frames)
        return fut.result(timeout + 5)  # the margin only guards against the thread's death

    def close(self) -> None:
        """Stop the I/O thread; outstanding requests fail with ClientClosedError."""
        if self._closed:
            return
        self._closed = True
        try:
            self._wake_w.send(b"\0")  # unconditionally: the I/O thread may be about to poll
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(5)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass

    def _send_again(self, rid: int, frames: list) -> None:
        transport.send(self._sock, frames)  # by the socket's holder, reading replies

    # -- handing work to the I/O thread ------------------------------------------------------
    def _push(self, rid: int, entry: Pending, frames: list) -> None:
        if self._closed or self._error is not None:
            self._finished(rid)
            if self._closed:
                raise ClientClosedError("client is closed")
            raise ClientClosedError(f"client I/O thread failed: {self._error!r}")
        self._outbox.append((rid, entry, frames))
        self._wake()

    def _cancel(self, rid: int) -> None:
        if not self._closed:
            self._outbox.append((rid, None, protocol.encode(Kind.CANCEL, rid)))
            self._wake()

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass


def _io_loop(ref: weakref.ref, replies: Replies, sock: zmq.Socket, wake_r: socket.socket,
             close_shm: Any, monitor: zmq.Socket | None = None) -> None:
    """The I/O thread. Holds only a weak reference, so a dropped Client is collected; its
    segments are unlinked here (``close_shm``) when it is closed or collected."""
    client = ref()
    if client is None:
        return
    outbox = client._outbox
    lock = client._io_lock
    poller = zmq.Poller()  # with requests outstanding: replies, pushed work, the monitor
    poller.register(sock, zmq.POLLIN)
    poller.register(wake_r, zmq.POLLIN)
    idle = zmq.Poller()  # with none: the socket is left to a direct call (Client.call)
    idle.register(wake_r, zmq.POLLIN)
    if monitor is not None:
        poller.register(monitor, zmq.POLLIN)
        idle.register(monitor, zmq.POLLIN)
    handshake = client._handshake
    # With keys, ZeroMQ drops the connection for good once the router refuses the key,
    # and a blocking send on a DEALER with no connection would wait forever: sends do
    # not wait then, and a request that cannot be sent fails with the refusal.
    send = _send_or_refuse if monitor is not None else transport.send

    def put(frames: list) -> bool:
        return send(sock, frames) is not None

    watch = client._watch
    ping_ms = int(TIMINGS.ping_interval * 1000)
    lock.acquire()
    try:
        while True:
            timeout = 1000
            deadline = replies.next_deadline()
            if deadline is not None:
                timeout = max(0, int((deadline - time.monotonic()) * 1000) + 1)
            if replies:
                timeout = min(timeout, ping_ms)
            # From here until the poll returns, a submit must write a wake-up byte. The
            # outbox is checked after clearing the flag, so a submit that saw the flag
            # still set is in the outbox now and the poll does not wait.
            client._woken = False
            if outbox:
                timeout = 0
            busy = bool(replies) or bool(outbox)
            del client
            if busy:
                events = dict(poller.poll(timeout))
            else:  # the socket is free for a direct call until this thread wakes
                lock.release()
                try:
                    events = dict(idle.poll(timeout))
                finally:
                    lock.acquire()
            client = ref()
            if client is None or client._closed:
                break
            client._woken = True  # awake: submits until the next poll need no syscall
            if wake_r.fileno() in events:
                try:
                    wake_r.recv(65536)  # one read empties it: at most one byte per wake-up
                except BlockingIOError:
                    pass
            if outbox:
                # Everything pushed since the last pass goes now, bundled (protocol 2.6).
                ready = []
                while outbox:
                    rid, entry, frames = outbox.popleft()
                    if entry is None:  # a CANCEL: sent only if the request is still ours
                        if replies.forget(rid):
                            ready.append((0, frames))
                        continue
                    replies.add(rid, entry)
                    if handshake.refused is not None:
                        replies.fail(rid, handshake.refused)
                        continue
                    ready.append((rid, frames))
                client._send_batched(ready, put)
            if sock in events:
                _read_replies(client, sock)
            if monitor is not None and monitor in events:
                refused = handshake.on_event(recv_monitor_message(monitor)["event"])
                if refused is not None:
                    replies.fail_all(refused)
            now = time.monotonic()
            ready = [(0, watch.ping(replies))] if replies and watch.due(now) else []
            for rid in replies.expire(now):
                ready.append((0, protocol.encode(Kind.CANCEL, rid)))
            if ready:
                client._send_batched(ready, put)
            client._trim_shm()
    except Exception as exc:  # surface to callers instead of dying silently
        client = ref()
        if client is not None:
            client._error = exc
        replies.fail_all(ClientClosedError(f"client I/O thread failed: {exc!r}"))
        raise
    finally:
        replies.fail_all(ClientClosedError("client closed with this request outstanding"))
        outbox.clear()
        lock.release()
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)
        sock.context.term()
        wake_r.close()
        close_shm()


def _send_or_refuse(sock: zmq.Socket, frames: list) -> list | None:
    """``transport.send`` without waiting; None when there is no connection to send on."""
    try:
        return transport.send(sock, frames, transport.NOBLOCK)
    except zmq.Again:
        return None


def _read_replies(client: Client, sock: zmq.Socket) -> None:
    budget = 4096  # messages, a bundle's each; then time for the outbox, pings, deadlines
    while budget > 0:
        if not transport.readable(sock):  # cheaper than the zmq.Again of an empty recv
            return
        try:
            frames = transport.recv(sock, transport.NOBLOCK)
        except zmq.Again:
            return
        budget -= client._take(frames)
