"""Client library: ``Client`` (threads, ``concurrent.futures``) and ``AsyncClient`` (asyncio).

::

    user threads --submit--> outbox deque + wake fd --> [I/O thread] DEALER --> router
    Future / stream queue <--------- replies by request id <---------------------+

``_BaseClient`` holds everything that needs no I/O: request ids, encoding requests,
turning replies into values or typed errors. ``Client`` owns one socket in one
background thread (ZeroMQ sockets are not thread-safe, so user threads never touch it)
and is safe to share between threads. ``AsyncClient`` owns one socket in one event loop.

Every request carries a client-unique id, so one connection can have thousands in
flight. A timeout travels with the request (the router answers at the deadline) and is
also enforced locally, so a call returns even when the router is unreachable.

numpy arrays and torch tensors anywhere in a payload or a reply travel as raw bytes
(ipc/codec.py). When the router is on this host, large ones go through shared memory: the
client owns a ``SegmentPool`` for its requests and a ``SegmentMapper`` for the replies.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import queue
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import zmq
import zmq.asyncio

from ipc import codec, protocol, transport
from ipc import shm as segments
from ipc.protocol import FINAL_REPLY_KINDS, FrameError, Kind
from workerpool.config import DEFAULT_FRONTEND, MAX_PRIORITY, MAX_TIMEOUT, MIN_PRIORITY, TIMINGS
from workerpool.errors import (
    ClientClosedError,
    PayloadError,
    ProtocolError,
    RequestTimeoutError,
    RouterRestartedError,
    WorkerPoolError,
    from_wire,
)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20  # body plus every array's bytes, wherever they travel

MAX_PING_IDS = 65536  # request ids one ping asks the router about
_PONG_PREFIX = protocol.MAGIC + bytes([protocol.VERSION, Kind.HEARTBEAT])

_TIMER_SLACK = 1024  # disarmed local deadlines tolerated before the heap is rebuilt
_META_CACHE_SIZE = 256  # distinct (method, service, timeout, priority, idempotent) kept packed


def is_local(address: str) -> bool:
    """Whether a router at ``address`` runs on this host (ipc://, inproc://, loopback tcp)."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


class _BaseClient:
    """I/O-free half of both clients: ids, request frames, reply interpretation."""

    def __init__(self, address: str, *, timeout: float | None, max_message_bytes: int,
                 shm_enabled: bool | None, shm_pool_bytes: int) -> None:
        self.address = address
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._ids = itertools.count(1)
        use_shm = is_local(address) if shm_enabled is None else shm_enabled
        #: This host's shared-memory identity, sent as meta "shm" on every request: workers
        #: on the same host answer with segments. None: shared memory is not used.
        self.shm_host = segments.host_id() if use_shm else None
        self._shm = segments.ShmEndpoint(shm_pool_bytes) if self.shm_host else None
        self._pool = self._shm.pool if self._shm else None  # lends the requests' arrays
        self._mapper = self._shm.mapper if self._shm else None  # maps the replies' arrays
        # Services that answered "shm-unreachable" (a worker on another host): their
        # requests carry arrays in frames from then on. Replies still use shm when they can.
        self._frames_only: set[str | None] = set()
        self._metas: dict[tuple, bytes] = {}  # see _meta_frame

    def _request_frames(self, method: str, payload: Any, service: str | None, priority: int,
                        timeout: float | None, idempotent: bool | None = None,
                        rid: int | None = None) -> tuple[int, list]:
        if not isinstance(method, str) or not method:
            raise ValueError("method must be a non-empty string")
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be in (0, {MAX_TIMEOUT}] seconds, got {timeout!r}")
        if (isinstance(priority, bool) or not isinstance(priority, int)
                or not MIN_PRIORITY <= priority <= MAX_PRIORITY):
            raise ValueError(f"priority must be an integer in [{MIN_PRIORITY}, {MAX_PRIORITY}], "
                             f"got {priority!r}")
        if rid is None:
            rid = next(self._ids)
        self._trim_shm()
        pool = self._pool if service not in self._frames_only else None
        try:
            body, buffers = codec.dumps(payload, pool=pool, tag=rid,
                                        max_bytes=self.max_message_bytes)
        except codec.PayloadError as exc:
            if exc.code == codec.TOO_LARGE:
                raise PayloadError(f"request is {exc}") from None
            raise PayloadError(f"payload cannot be sent: {exc}") from None
        meta = self._meta_frame(method, service, timeout, priority, idempotent)
        frames = [protocol.pack_header(Kind.REQUEST, rid), meta, body, *buffers]
        size = protocol.HEADER_SIZE + len(meta) + len(body)
        if buffers:
            size += sum(len(b) for b in buffers)
        if size > self.max_message_bytes:
            self._finished(rid)
            raise PayloadError(f"request is {size} bytes, over max_message_bytes="
                               f"{self.max_message_bytes}")
        return rid, frames

    def _meta_frame(self, method: str, service: str | None, timeout: float | None,
                    priority: int, idempotent: bool | None) -> bytes:
        """The packed meta frame. A caller sends the same few combinations over and over,
        so each is packed once (bounded like ``protocol.MetaCache``)."""
        key: tuple | None = (method, service, timeout, priority, idempotent)
        try:
            frame = self._metas.get(key)
        except TypeError:  # an unhashable service: sent as given, for the router to refuse
            frame = key = None
        if frame is None:
            meta: dict[str, Any] = {"method": method}
            if self.shm_host is not None:
                meta["shm"] = self.shm_host
            if service is not None:
                meta["service"] = service
            if timeout is not None:
                meta["timeout"] = float(timeout)
            if priority:
                meta["priority"] = priority
            if idempotent is not None:
                meta["idempotent"] = bool(idempotent)
            frame = protocol.pack_meta(meta)
            if key is not None:
                if len(self._metas) >= _META_CACHE_SIZE:
                    self._metas.clear()
                self._metas[key] = frame
        return frame

    def _finished(self, rid: int) -> None:
        """Request ``rid`` has had its final reply or was given up: its segments may be
        reused once the worker has let go of them."""
        if self._pool is not None:
            self._pool.finish(rid)

    def _in_shm(self, rid: int) -> bool:
        return self._pool is not None and self._pool.has(rid)

    def _resend_frames(self, rid: int, value: Any, request: tuple | None) -> list | None:
        """The request again with its arrays in frames, when ``value`` (its error) says the
        worker cannot map our segments: it runs on another host. Same id: the router has
        answered the first one. None: ``value`` is some other outcome."""
        if (request is None or not isinstance(value, PayloadError)
                or value.extra.get("code") != codec.SHM_UNREACHABLE):
            return None
        self._frames_only.add(request[2])
        self._finished(rid)
        try:
            return self._request_frames(*request, rid=rid)[1]
        except (PayloadError, ValueError):
            return None

    def _close_shm(self) -> None:
        if self._shm is not None:
            self._shm.close()

    def _trim_shm(self) -> None:
        """At most once a second: give back idle segments and stale mappings."""
        if self._shm is not None:
            self._shm.maybe_trim()

    def _effective_timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _parse_reply(self, frames: list) -> tuple[Kind, int, Any]:
        """(kind, request id, value-or-error). Raises FrameError on a malformed reply."""
        if len(frames) < 3:
            raise FrameError("too-few-frames", f"reply has {len(frames)} frames")
        kind, rid = protocol.unpack_header(frames[0])  # replies' meta is not needed here
        if kind not in protocol.REPLY_KINDS:
            raise FrameError("bad-kind", f"unexpected {kind.name} from router", rid)
        body, buffers = frames[2], frames[3:]
        if kind is Kind.ERROR:
            try:
                err = codec.loads(body, buffers)
            except codec.PayloadError as exc:
                return kind, rid, ProtocolError(f"undecodable error reply: {exc}")
            return kind, rid, from_wire(err)
        try:
            return kind, rid, codec.loads(body, buffers, mapper=self._mapper,
                                          max_bytes=self.max_message_bytes)
        except codec.PayloadError as exc:
            return Kind.ERROR, rid, PayloadError(f"undecodable reply: {exc}")


class _RequestFuture(concurrent.futures.Future):
    """``Client.submit``'s Future: a successful ``cancel()`` tells the router to forget the
    request (an override, not a done-callback: one less callback per request)."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client
        self.rid = 0

    def cancel(self) -> bool:
        was_cancelled = self.cancelled()
        cancelled = super().cancel()
        if cancelled and not was_cancelled and self.rid:  # one CANCEL, however often called
            self._client._cancel(self.rid)
        return cancelled


class _Pending:
    """One outstanding request in ``Client``: a Future, or a queue for a stream."""

    __slots__ = ("deadline", "future", "items", "partials", "request", "sent_at", "stream")

    def __init__(self, future: concurrent.futures.Future | None,
                 stream: queue.SimpleQueue | None, deadline: float | None) -> None:
        self.future = future
        self.stream = stream
        self.deadline = deadline
        self.partials: list | None = None  # call() on a streaming method collects here
        self.sent_at = 0.0
        self.request: tuple | None = None  # its arguments, while its arrays are in shm


class _RouterWatch:
    """Notices a router restart: while requests are outstanding the client pings the
    router, whose answer names its process instance. A new name means the old router and
    every request it held are gone: those requests fail with RouterRestartedError instead
    of waiting for their timeouts (or forever). Shared by both clients."""

    def __init__(self) -> None:
        self.instance: str | None = None
        self.next_ping = 0.0

    @staticmethod
    def ping(held: Iterable[int]) -> list:
        """The HEARTBEAT asking the router which of ``held`` it does not know."""
        return protocol.encode(Kind.HEARTBEAT, 0, {"held": list(itertools.islice(held,
                                                                                  MAX_PING_IDS))})

    @staticmethod
    def is_pong(frames: list) -> bool:
        return len(frames) >= 3 and frames[0][:4] == _PONG_PREFIX

    def lost(self, body: bytes) -> list[int]:
        """From a pong: the request ids lost with an old router (none if it is the same)."""
        try:
            info = codec.loads(body)
            instance = str(info["router"])
            unknown = [int(r) for r in info.get("unknown", ())]
        except (codec.PayloadError, KeyError, TypeError, ValueError):
            return []
        changed = self.instance is not None and instance != self.instance
        self.instance = instance
        # The router lists the requests of the ping that it does not hold. Replies travel
        # ahead of the pong, so one still pending here was lost with the old router; one
        # that reached the new router (queued in our socket while it was down) is held
        # there and keeps waiting for its real reply.
        return unknown if changed else []


def _router_restarted() -> RouterRestartedError:
    return RouterRestartedError("the router restarted while it held this request; it was "
                                "lost with it and can be sent again")


class Client(_BaseClient):
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
                 shm_pool_bytes: int = segments.POOL_BYTES) -> None:
        super().__init__(address, timeout=timeout, max_message_bytes=max_message_bytes,
                         shm_enabled=shm, shm_pool_bytes=shm_pool_bytes)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.connect(address)
        self._pending: dict[int, _Pending] = {}
        self._outbox: collections.deque = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = True  # the I/O thread is not polling yet: no wake-up byte needed
        #: Replies that matched no outstanding request: after a local timeout or cancel,
        #: or a duplicate. With neither, it must stay 0 (the chaos test checks it).
        self.unmatched_replies = 0
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=_io_loop, args=(weakref.ref(self), self._sock, self._wake_r, self._close_shm),
            name=f"workerpool-client-{address}", daemon=True)
        self._thread.start()

    # -- public API -------------------------------------------------------------------------
    def submit(self, method: str, payload: Any = None, *, service: str | None = None,
               priority: int = 0, timeout: float | None = None,
               idempotent: bool | None = None) -> concurrent.futures.Future:
        """Send a request; return a Future for its result (a list for a streaming method).

        The Future raises a ``WorkerPoolError`` subclass on failure. ``Future.cancel()``
        tells the router to forget the request.
        """
        timeout = self._effective_timeout(timeout)
        fut = _RequestFuture(self)
        fut.rid = self._enqueue(method, payload, service, priority, timeout, idempotent,
                                _Pending(fut, None, None))
        return fut

    def call(self, method: str, payload: Any = None, *, service: str | None = None,
             priority: int = 0, timeout: float | None = None,
             idempotent: bool | None = None) -> Any:
        """Send a request and wait for its result."""
        timeout = self._effective_timeout(timeout)
        fut = self.submit(method, payload, service=service, priority=priority, timeout=timeout,
                          idempotent=idempotent)
        # The I/O thread enforces the deadline; the margin only guards against its death.
        return fut.result(None if timeout is None else timeout + TIMINGS.local_grace + 5)

    def stream(self, method: str, payload: Any = None, *, service: str | None = None,
               priority: int = 0, timeout: float | None = None,
               idempotent: bool | None = None) -> Iterator[Any]:
        """Yield a streaming method's items as they arrive; ``timeout`` bounds the whole
        stream. Leaving the loop early cancels the request."""
        timeout = self._effective_timeout(timeout)
        items: queue.SimpleQueue = queue.SimpleQueue()
        rid = self._enqueue(method, payload, service, priority, timeout, idempotent,
                            _Pending(None, items, None))
        return self._iterate(rid, items)

    def _iterate(self, rid: int, items: queue.SimpleQueue) -> Iterator[Any]:
        done = False
        try:
            while True:
                kind, value = items.get()
                if kind is Kind.PARTIAL:
                    yield value
                elif kind is Kind.RESULT:  # a plain method called as a stream: one item
                    done = True
                    yield value
                    return
                elif kind is Kind.END:
                    done = True
                    return
                else:
                    done = True
                    raise value
        finally:
            if not done:
                self._cancel(rid)

    def status(self, timeout: float = 5.0) -> dict:
        """The router's health table: what ``workerpool status --json`` prints."""
        return self._control(Kind.STATUS, None, timeout)

    def restart_worker(self, worker: str, timeout: float = 5.0) -> dict:
        """Ask the worker's supervisor to restart it (a failed one is reset and started
        again; a running one finishes what it holds first). Raises AdminError for an
        unknown worker."""
        return self._control(Kind.ADMIN, {"op": "restart", "worker": worker}, timeout)

    def drain_worker(self, worker: str, timeout: float = 5.0) -> dict:
        """Stop sending ``worker`` new requests; it finishes what it holds, then stops and
        is not respawned (``restart_worker`` brings it back). Raises AdminError."""
        return self._control(Kind.ADMIN, {"op": "drain", "worker": worker}, timeout)

    def scale(self, service: str, workers: int, timeout: float = 5.0) -> dict:
        """Set how many workers serve ``service``. Up: spares are promoted at once and new
        workers start; down: the idlest workers finish what they hold, then leave. Returns
        ``{"previous", "workers", "retire": [ids], "message"}``; raises AdminError."""
        return self._control(Kind.ADMIN, {"op": "scale", "service": service,
                                          "workers": workers}, timeout)

    def _control(self, kind: Kind, meta: dict | None, timeout: float) -> dict:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        rid = next(self._ids)
        pending = _Pending(fut, None, time.monotonic() + timeout)
        self._push(rid, pending, protocol.encode(kind, rid, meta))
        return fut.result(timeout + 5)

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

    # -- plumbing -------------------------------------------------------------------------------
    def _enqueue(self, method: str, payload: Any, service: str | None, priority: int,
                 timeout: float | None, idempotent: bool | None, pending: _Pending) -> int:
        rid, frames = self._request_frames(method, payload, service, priority, timeout,
                                           idempotent)
        if self._in_shm(rid):
            pending.request = (method, payload, service, priority, timeout, idempotent)
        if timeout is not None:
            pending.deadline = time.monotonic() + timeout + TIMINGS.local_grace
        try:
            self._push(rid, pending, frames)
        except ClientClosedError:
            self._finished(rid)
            raise
        return rid

    def _push(self, rid: int, pending: _Pending, frames: list) -> None:
        if self._closed:
            raise ClientClosedError("client is closed")
        if self._error is not None:
            raise ClientClosedError(f"client I/O thread failed: {self._error!r}")
        self._outbox.append((rid, pending, frames))
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


def _io_loop(ref: weakref.ref, sock: zmq.Socket, wake_r: socket.socket,
             close_shm: Any) -> None:
    """The I/O thread. Holds only a weak reference, so a dropped Client is collected; its
    segments are unlinked here (``close_shm``) when it is closed or collected."""
    client = ref()
    if client is None:
        return
    pending = client._pending
    outbox = client._outbox
    timers: list[tuple[float, int]] = []
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(wake_r, zmq.POLLIN)
    watch = _RouterWatch()
    try:
        while True:
            timeout = 1000
            if timers:
                timeout = max(0, int((timers[0][0] - time.monotonic()) * 1000) + 1)
            if pending:
                timeout = min(timeout, int(TIMINGS.ping_interval * 1000))
            # From here until the poll returns, a submit must write a wake-up byte. The
            # outbox is checked after clearing the flag, so a submit that saw the flag
            # still set is in the outbox now and the poll does not wait.
            client._woken = False
            if outbox:
                timeout = 0
            del client
            events = dict(poller.poll(timeout))
            client = ref()
            if client is None or client._closed:
                break
            client._woken = True  # awake: submits until the next poll need no syscall
            if wake_r.fileno() in events:
                try:
                    wake_r.recv(65536)  # one read empties it: at most one byte per wake-up
                except BlockingIOError:
                    pass
            while outbox:
                rid, entry, frames = outbox.popleft()
                if entry is None:  # a CANCEL
                    if pending.pop(rid, None) is not None:
                        client._finished(rid)
                        transport.send(sock, frames)
                    continue
                pending[rid] = entry
                entry.sent_at = time.monotonic()
                if entry.deadline is not None:
                    _arm(timers, pending, entry.deadline, rid)
                transport.send(sock, frames)
            if sock in events:
                _read_replies(client, sock, pending, watch)
            if pending:
                now = time.monotonic()
                if now >= watch.next_ping:
                    watch.next_ping = now + TIMINGS.ping_interval
                    transport.send(sock, watch.ping(pending))
            if timers:
                _expire(client, sock, pending, timers)
            client._trim_shm()
    except Exception as exc:  # surface to callers instead of dying silently
        client = ref()
        if client is not None:
            client._error = exc
        _fail_all(pending, ClientClosedError(f"client I/O thread failed: {exc!r}"))
        raise
    finally:
        _fail_all(pending, ClientClosedError("client closed with this request outstanding"))
        outbox.clear()
        sock.close(linger=0)
        sock.context.term()
        wake_r.close()
        close_shm()


def _read_replies(client: Client, sock: zmq.Socket, pending: dict[int, _Pending],
                  watch: _RouterWatch) -> None:
    for _ in range(4096):
        try:
            frames = transport.recv(sock, transport.NOBLOCK)
        except zmq.Again:
            return
        if watch.is_pong(frames):
            for rid in watch.lost(frames[2]):
                entry = pending.pop(rid, None)
                if entry is None:
                    continue
                client._finished(rid)
                if entry.stream is not None:
                    entry.stream.put((Kind.ERROR, _router_restarted()))
                else:
                    _settle(entry.future, exc=_router_restarted())
            continue
        try:
            kind, rid, value = client._parse_reply(frames)
        except FrameError:
            continue  # a reply we cannot attribute to any request
        entry = pending.get(rid)
        if entry is None:
            # Timed out or cancelled here already; otherwise a second reply (a bug).
            client.unmatched_replies += 1
            continue
        if kind is Kind.PARTIAL:
            if entry.stream is not None:
                entry.stream.put((kind, value))
            else:
                if entry.partials is None:
                    entry.partials = []
                entry.partials.append(value)
            continue
        if kind is Kind.ERROR and entry.request is not None:
            again = client._resend_frames(rid, value, entry.request)
            entry.request = None
            if again is not None:
                transport.send(sock, again)
                continue
        del pending[rid]
        client._finished(rid)
        if entry.stream is not None:
            entry.stream.put((kind, value))
            continue
        # Kept undecoded: only reply_meta() reads it, and most callers never do.
        entry.future._wp_reply_meta = frames[1]
        if kind is Kind.ERROR:
            _settle(entry.future, exc=value)
        elif kind is Kind.END:
            _settle(entry.future, result=entry.partials or [])
        else:
            _settle(entry.future, result=value)


_reply_metas = protocol.MetaCache(256)  # a worker's replies all carry the same meta bytes


def reply_meta(fut: concurrent.futures.Future) -> dict | None:
    """The meta map of the router's final reply to a ``Client.submit`` Future, or None when
    no reply arrived (a local deadline, a cancel, a router restart, a closed client).

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


def _arm(timers: list, pending: dict[int, _Pending], deadline: float, rid: int) -> None:
    """Add ``rid``'s local deadline. Timers of answered requests are skipped when due, not
    removed; with long timeouts at a high rate they would pile up, so when they outnumber
    the pending requests the heap keeps only the armed ones (amortized O(1))."""
    heapq.heappush(timers, (deadline, rid))
    if len(timers) > 2 * len(pending) + _TIMER_SLACK:
        timers[:] = [t for t in timers
                     if (p := pending.get(t[1])) is not None and p.deadline == t[0]]
        heapq.heapify(timers)


def _expire(client: Client, sock: zmq.Socket, pending: dict[int, _Pending],
            timers: list) -> None:
    now = time.monotonic()
    while timers and timers[0][0] <= now:
        deadline, rid = heapq.heappop(timers)
        entry = pending.get(rid)
        if entry is None or entry.deadline != deadline:
            continue
        del pending[rid]
        client._finished(rid)
        err = RequestTimeoutError("no reply before the deadline (router unreachable or slow)")
        if entry.stream is not None:
            entry.stream.put((Kind.ERROR, err))
        else:
            _settle(entry.future, exc=err)
        transport.send(sock, protocol.encode(Kind.CANCEL, rid))


def _settle(fut: concurrent.futures.Future | None, result: Any = None,
            exc: BaseException | None = None) -> None:
    if fut is None:
        return
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by the user between the check and the set


def _fail_all(pending: dict[int, _Pending], err: WorkerPoolError) -> None:
    for entry in pending.values():
        if entry.stream is not None:
            entry.stream.put((Kind.ERROR, err))
        else:
            _settle(entry.future, exc=err)
    pending.clear()


class AsyncClient(_BaseClient):
    """asyncio client; use inside one event loop.

    >>> async with AsyncClient("tcp://127.0.0.1:5555") as c:
    ...     await c.call("echo", {"x": 1})
    """

    def __init__(self, address: str = DEFAULT_FRONTEND, *, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, shm: bool | None = None,
                 shm_pool_bytes: int = segments.POOL_BYTES) -> None:
        super().__init__(address, timeout=timeout, max_message_bytes=max_message_bytes,
                         shm_enabled=shm, shm_pool_bytes=shm_pool_bytes)
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.connect(address)
        self._pending: dict[int, asyncio.Future | asyncio.Queue] = {}
        self._partials: dict[int, list] = {}
        self._requests: dict[int, tuple] = {}  # arguments of requests whose arrays are in shm
        self._reader: asyncio.Task | None = None
        self._pinger: asyncio.Task | None = None
        self._watch = _RouterWatch()
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ensure_reader(self) -> None:
        if self._closed:
            raise ClientClosedError("client is closed")
        if self._reader is None:
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read_loop())
            self._pinger = loop.create_task(self._ping_loop())

    async def _ping_loop(self) -> None:
        """While requests are outstanding, ask the router which of them it holds: a
        restarted router has lost them (see ``_RouterWatch``)."""
        while True:
            if self._pending:
                await self._sock.send_multipart(self._watch.ping(self._pending))
            # Until a first pong names the router, a restart could not be told apart.
            await asyncio.sleep(TIMINGS.ping_interval if self._watch.instance else 0.05)

    async def _read_loop(self) -> None:
        try:
            while True:
                parts = await self._sock.recv_multipart(copy=False)
                # Buffer frames stay zmq.Frame (no copy, writable), as in transport.recv.
                frames = [p.bytes for p in parts[:3]] + parts[3:]
                if self._watch.is_pong(frames):
                    for rid in self._watch.lost(frames[2]):
                        if rid in self._pending:
                            self._fail(rid, _router_restarted())
                    continue
                try:
                    kind, rid, value = self._parse_reply(frames)
                except FrameError:
                    continue
                waiter = self._pending.get(rid)
                if waiter is None:
                    continue
                if kind is Kind.ERROR and rid in self._requests:
                    again = self._resend_frames(rid, value, self._requests.pop(rid))
                    if again is not None:
                        await self._sock.send_multipart(again, copy=False)
                        continue
                if kind in FINAL_REPLY_KINDS:
                    self._requests.pop(rid, None)
                    self._finished(rid)
                if isinstance(waiter, asyncio.Queue):
                    if kind in FINAL_REPLY_KINDS:
                        del self._pending[rid]
                    waiter.put_nowait((kind, value))
                    continue
                if kind is Kind.PARTIAL:
                    self._partials.setdefault(rid, []).append(value)
                    continue
                del self._pending[rid]
                partials = self._partials.pop(rid, [])
                if waiter.done():
                    continue
                if kind is Kind.ERROR:
                    waiter.set_exception(value)
                else:
                    waiter.set_result(partials if kind is Kind.END else value)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail_all(ClientClosedError(f"client reader failed: {exc!r}"))
            raise

    def _fail(self, rid: int, err: WorkerPoolError) -> None:
        waiter = self._pending.pop(rid)
        self._partials.pop(rid, None)
        self._requests.pop(rid, None)
        self._finished(rid)
        if isinstance(waiter, asyncio.Queue):
            waiter.put_nowait((Kind.ERROR, err))
        elif not waiter.done():
            waiter.set_exception(err)

    def _fail_all(self, err: WorkerPoolError) -> None:
        for rid in list(self._pending):
            self._fail(rid, err)

    async def _send_cancel(self, rid: int) -> None:
        self._pending.pop(rid, None)
        self._partials.pop(rid, None)
        self._requests.pop(rid, None)
        self._finished(rid)
        if not self._closed:
            await self._sock.send_multipart(protocol.encode(Kind.CANCEL, rid))

    async def _send_request(self, waiter: asyncio.Future | asyncio.Queue, method: str,
                            payload: Any, service: str | None, priority: int,
                            timeout: float | None, idempotent: bool | None
                            ) -> tuple[int, float | None]:
        """Encode and send one request whose replies go to ``waiter``; returns its id and
        its effective timeout. The one send path of submit, call and stream."""
        self._ensure_reader()
        timeout = self._effective_timeout(timeout)
        rid, frames = self._request_frames(method, payload, service, priority, timeout,
                                           idempotent)
        if self._in_shm(rid):  # kept to send again in frames if the worker cannot map it
            self._requests[rid] = (method, payload, service, priority, timeout, idempotent)
        self._pending[rid] = waiter
        await self._sock.send_multipart(frames, copy=False)
        return rid, timeout

    async def submit(self, method: str, payload: Any = None, *, service: str | None = None,
                     priority: int = 0, timeout: float | None = None,
                     idempotent: bool | None = None) -> asyncio.Future:
        """Send a request; return an asyncio Future for its result. Cancelling the Future
        cancels the request."""
        fut = asyncio.get_running_loop().create_future()
        rid, _ = await self._send_request(fut, method, payload, service, priority, timeout,
                                          idempotent)
        fut.add_done_callback(
            lambda f: f.cancelled() and not self._closed
            and asyncio.ensure_future(self._send_cancel(rid)))
        return fut

    async def call(self, method: str, payload: Any = None, *, service: str | None = None,
                   priority: int = 0, timeout: float | None = None,
                   idempotent: bool | None = None) -> Any:
        """Send a request and await its result. Cancelling the task cancels the request."""
        fut = asyncio.get_running_loop().create_future()
        rid, timeout = await self._send_request(fut, method, payload, service, priority,
                                                timeout, idempotent)
        try:
            if timeout is None:
                return await fut
            return await asyncio.wait_for(asyncio.shield(fut), timeout + TIMINGS.local_grace)
        except TimeoutError:
            await self._send_cancel(rid)
            raise RequestTimeoutError(
                "no reply before the deadline (router unreachable or slow)") from None
        except asyncio.CancelledError:
            await asyncio.shield(self._send_cancel(rid))
            raise

    async def stream(self, method: str, payload: Any = None, *, service: str | None = None,
                     priority: int = 0, timeout: float | None = None,
                     idempotent: bool | None = None) -> AsyncIterator[Any]:
        """Async-iterate a streaming method's items; ``timeout`` bounds the whole stream."""
        items: asyncio.Queue = asyncio.Queue()
        rid, timeout = await self._send_request(items, method, payload, service, priority,
                                                timeout, idempotent)
        deadline = None if timeout is None else time.monotonic() + timeout + TIMINGS.local_grace
        done = False
        try:
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    kind, value = await asyncio.wait_for(items.get(), remaining)
                except TimeoutError:
                    raise RequestTimeoutError("stream did not finish before the deadline") from None
                if kind is Kind.PARTIAL:
                    yield value
                    continue
                done = True
                if kind is Kind.ERROR:
                    raise value
                if kind is Kind.RESULT:
                    yield value
                return
        finally:
            if not done:
                await self._send_cancel(rid)

    async def status(self, timeout: float = 5.0) -> dict:
        """The router's health table."""
        self._ensure_reader()
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        await self._sock.send_multipart(protocol.encode(Kind.STATUS, rid))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._pending.pop(rid, None)
            raise RequestTimeoutError("router did not answer STATUS") from None

    async def close(self) -> None:
        """Close the socket; outstanding requests fail with ClientClosedError."""
        if self._closed:
            return
        self._closed = True
        for task in (self._reader, self._pinger):
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._fail_all(ClientClosedError("client closed with this request outstanding"))
        self._sock.close(linger=0)
        self._ctx.term()
        self._close_shm()
