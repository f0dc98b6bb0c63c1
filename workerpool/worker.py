"""The worker process: one handler, one device, one DEALER socket to the router.

Data flow::

    router --REQUEST(id, meta, body)--> [DEALER] worker --method(payload)--> handler
    router <--RESULT | ERROR | PARTIAL* END--            <--value / generator / raise--

The worker is started by the supervisor as a fresh interpreter
(``python -m workerpool.worker``) with its ``WorkerSpec`` in the environment and
``CUDA_VISIBLE_DEVICES`` already set, so nothing CUDA-related is inherited. It handles
one request at a time, in order; the router decides how many it may hold (``capacity``).
A method declared ``@batched`` instead runs once for the requests of that method the
worker holds, up to its ``max_batch_size`` (``BatchRunner``, workerpool/batching.py);
replies are built and sent by ``Replies`` (workerpool/replies.py). A worker ahead of its
work runs the quick requests waiting as a group and sends their replies as one BUNDLE
(``ReplyHold``, workerpool/holding.py; docs/protocol.md 7.1); the router's bundles are
taken apart by ``inbox.messages``. While requests come back to back, the socket is lent
to a thread of its own (``Wire``, workerpool/wire.py), so the reply of one and the next
one's arrival are moved while the handler runs. A handler's exception is a
domain error: it is answered as ``HandlerError`` and the worker keeps serving. If
``setup()`` fails the worker reports why and exits with ``EXIT_SETUP_FAILED`` so the
supervisor does not respawn it in a loop.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from functools import partial
from itertools import chain
from typing import Any

import zmq
from pydantic import BaseModel, ConfigDict

from ipc import codec, curve, protocol, shm, transport
from ipc.lifecycle import GoodbyeReason
from ipc.protocol import FrameError, Kind
from workerpool import faults
from workerpool._proc import EXIT_POISONED, EXIT_SETUP_FAILED, die_with_parent
from workerpool.backlog import Backlog
from workerpool.batching import BatchRunner, BatchSizeMeter, BatchSpec, batch_spec
from workerpool.busy import BusyMeter
from workerpool.config import DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_MAX_MESSAGE_BYTES
from workerpool.context import WorkerContext, WorkerStats
from workerpool.devices import CPU, device_label
from workerpool.errors import (
    HandlerError,
    PayloadError,
    ProtocolError,
    RequestCancelledError,
    ResourceExhaustedError,
    UnknownMethodError,
    WorkerCrashedError,
)
from workerpool.faults import Fate
from workerpool.holding import ReplyHold
from workerpool.inbox import messages
from workerpool.lending import Lending
from workerpool.logs import setup_logging, slot_logger
from workerpool.memory import memory_use
from workerpool.replies import Replies, UnencodableResult
from workerpool.wire import Wire

log = logging.getLogger("workerpool.worker")

SPEC_ENV = "WORKERPOOL_WORKER_SPEC"
_RESERVED = frozenset({"setup", "teardown", "context"})
SETUP_FAILED_LINGER_MS = 5000  # how long a setup() failure waits to reach the router
FIRST_WORK_BEAT = 0.05
"""Seconds after its first handler call ended that a worker beats once out of turn: the router
sizes what it holds ahead from its handler time per request (protocol.md 7.1), which
otherwise would wait for the next beat, up to ``heartbeat_interval`` into the load."""


class WorkerSpec(BaseModel):
    """Everything one worker process needs, passed from the supervisor as JSON."""

    model_config = ConfigDict(extra="forbid")

    slot: str
    service: str
    incarnation: int
    handler: str
    device: str
    backend: str
    capacity: int | None = None  # the service's max_inflight; None: see Worker._capacity
    options: dict[str, Any] = {}
    parent_pid: int | None = None
    supervisor: str | None = None  # the routing id of the supervisor that started it
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # the router drops bigger: refuse here
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL  # between its heartbeat thread's beats
    key: str | None = None  # path of this worker's .key_secret (CURVE); None: no keys
    router_key: str | None = None  # path of the router's public .key

    def curve_keys(self) -> curve.PeerKeys | None:
        """The CURVE credentials both of this worker's sockets use."""
        return curve.peer_keys(key=self.key, router_key=self.router_key)

    @property
    def identity(self) -> bytes:
        """Routing id on the backend: unique per incarnation, so a dead process's bytes
        can never be mistaken for its replacement's."""
        return f"{self.slot}#{self.incarnation}".encode()


def load_handler(path: str) -> type:
    """Import ``module:Class``; raises ImportError/AttributeError with a clear message."""
    module_name, _, attr = path.partition(":")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise TypeError(f"{path} is a {type(obj).__name__}, not a class")
    return obj


def public_methods(handler: object) -> dict[str, Any]:
    """The handler's remotely callable methods: public, callable, not lifecycle hooks."""
    out = {}
    for name in dir(type(handler)):
        if name.startswith("_") or name in _RESERVED:
            continue
        fn = getattr(handler, name, None)
        if callable(fn):
            out[name] = fn
    return out


class Worker:
    """Serves one handler over one backend connection until told to stop."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self._stopping = False
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, spec.identity)
        self._sock.setsockopt(zmq.LINGER, 2000)  # let the last replies/GOODBYE flush on exit
        self.keys = spec.curve_keys()
        curve.secure_client(self._sock, self.keys)
        self._sock.connect(spec.backend)
        self._log = slot_logger(log, spec.slot)
        self._methods: dict[str, Any] = {}
        self._batched: dict[str, BatchSpec] = {}  # the methods declared @batched
        self.capacity = spec.capacity or 1  # settled once setup() has shown the methods
        self.declared = self.capacity  # what it tells the router; capacity: what the router allows
        self._meta_cache = protocol.MetaCache()
        self.backlog = Backlog()  # received, not run; shared with the heartbeat thread
        self._batches = BatchRunner(self)  # the requests of @batched methods, as batches form
        self._running = 0  # 1 while a request of a plain method runs
        self._poller = zmq.Poller()  # the socket, while the main thread holds it
        self._wire: Wire | None = None  # the thread the socket is lent to, once ready
        self._lending = Lending()  # when the socket is lent to the wire thread
        self._ahead = False  # the next request was here as the last handler call ended
        # Calls the wire thread leaves to the main thread, which owns the state they touch
        # (CANCEL, a capacity, an error owed): made at each turn, before a request starts.
        self._control: deque[Callable[[], None]] = deque()
        self._current: int | None = None  # request id running now (not batched)
        self._hold = ReplyHold()  # which quick requests run as a group, replies held
        self._group: OrderedDict[int, protocol.Message] = OrderedDict()  # started, not run
        self._cancel_current = False
        self._heart: _Heartbeat | None = None
        self.stats = WorkerStats()
        self.busy = BusyMeter()  # restarted when the worker is ready (see run)
        self.sizes = BatchSizeMeter({})  # made for the @batched methods once they are known
        self._handler: Any = None
        # Shared memory with clients on this host: requests whose meta "shm" names our host
        # may carry segment handles, and get their large arrays back the same way.
        self._host = shm.host_id()
        self._shm = shm.ShmEndpoint() if self._host else None
        self._mapper = self._shm.mapper if self._shm else None  # maps the requests' arrays
        self.replies = Replies(self._sock, spec.slot, spec.max_message_bytes,
                               self._shm.pool if self._shm else None)  # lends replies' arrays

    # -- lifecycle -----------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
        signal.signal(signal.SIGTERM, self._on_sigterm)
        began = time.monotonic()
        try:
            self._setup()
        except Exception:
            tb = traceback.format_exc()
            self._log.error("setup failed:", exc_info=True, extra={"event": "setup-failed"})
            self._send(Kind.GOODBYE, 0, {"reason": GoodbyeReason.SETUP_FAILED,
                                         "error": tb[-4000:], "slot": self.spec.slot,
                                         "service": self.spec.service})
            # The traceback is what the operator will read (status `last_error`), and a
            # setup() that fails at once may beat the connection to the router: worth
            # waiting for, where a stopping worker's GOODBYE is not.
            self._close(linger=SETUP_FAILED_LINGER_MS)
            return EXIT_SETUP_FAILED
        took = time.monotonic() - began
        self._log.info("set up in %.2fs: %s on %s, holding up to %d request(s)", took,
                       self.spec.handler, device_label(self.spec.device), self.capacity,
                       extra={"event": "worker-setup", "seconds": round(took, 3),
                              "handler": self.spec.handler,
                              "device": device_label(self.spec.device),
                              "incarnation": self.spec.incarnation,
                              "capacity": self.capacity})
        self._send(Kind.READY, 0, self._ready_meta())
        self._wire = Wire(self._sock, self._on_wire)
        self.replies.send_through(self._wire.send)
        self._wire.start()
        self.busy = BusyMeter()  # its wall time counts from here: setup() is not idle time
        self.sizes = BatchSizeMeter({name: spec.max_batch_size
                                     for name, spec in self._batched.items()})
        self._heart = _Heartbeat(self._ctx, self.spec, self.busy, self.sizes, self.backlog)
        self._heart.start()
        stopped = False
        try:
            self._serve()
            stopped = True
        finally:
            self.replies.flush()  # what it answered leaves before a teardown that may be slow
            self._teardown()  # still beating: a slow teardown is not a hang
            self._heart.stop()
            if stopped:
                # Only a clean stop says so: after an exception of the runtime itself the
                # router must learn of a crash (from the supervisor), not of a stop that
                # would leave the slot STOPPED and never answer what we held as crashed.
                self._send(Kind.GOODBYE, 0, {"reason": GoodbyeReason.STOPPED})
            self._close()
        return 0

    def _setup(self) -> None:
        cls = load_handler(self.spec.handler)
        self._handler = cls()
        dev = self.spec.device
        ctx = WorkerContext(
            slot=self.spec.slot,
            service=self.spec.service,
            incarnation=self.spec.incarnation,
            device=CPU if dev == CPU else "cuda:0",
            physical_device=dev,
            options=dict(self.spec.options),
            stats=self.stats,
        )
        self._handler.context = ctx
        setup = getattr(self._handler, "setup", None)
        if callable(setup):
            setup(ctx)
        self._methods = public_methods(self._handler)
        self._batched = {name: spec for name, fn in self._methods.items()
                         if (spec := batch_spec(fn)) is not None}
        self.declared = self.capacity = self._capacity()
        self._warn_small_batches()

    def _warn_small_batches(self) -> None:
        for name, spec in self._batched.items():
            if spec.max_batch_size > self.capacity:
                # Worker-side batching can only gather what the router has sent.
                self._log.warning(
                    "@batched method %r has max_batch_size=%d but this worker holds at most "
                    "max_inflight=%d request(s), so its batches hold at most %d; set the "
                    "service's max_inflight >= %d (or leave it unset)", name,
                    spec.max_batch_size, self.capacity, self.capacity, spec.max_batch_size)

    def _on_capacity(self, meta: dict) -> None:
        """The router caps this worker below what it declared (the service's max_inflight,
        set by another supervisor's configuration): batches flush at the lower count."""
        cap = meta.get("capacity")
        if type(cap) is not int or cap < 1 or cap == self.capacity:
            return
        self.capacity = min(cap, self.declared)
        self._log.info("the router caps this worker at %d request(s) (it declared %d): the "
                       "service's max_inflight", self.capacity, self.declared)
        self._warn_small_batches()

    def _capacity(self) -> int:
        """How many requests this worker holds at once: the service's ``max_inflight``, or,
        left unset, 1 for plain handlers and twice the largest ``max_batch_size`` for one
        with batched methods (a batch can only gather what the worker holds, and the second
        half is the next batch, gathering while one runs)."""
        if self.spec.capacity is not None:
            return self.spec.capacity
        if not self._batched:
            return 1
        return min(65536, 2 * max(s.max_batch_size for s in self._batched.values()))

    def _teardown(self) -> None:
        teardown = getattr(self._handler, "teardown", None)
        if callable(teardown):
            try:
                teardown()
            except Exception:
                self._log.exception("teardown() raised")

    def _ready_meta(self) -> dict:
        s = self.spec
        return {
            "slot": s.slot,
            "incarnation": s.incarnation,
            "pid": os.getpid(),
            "device": device_label(s.device),
            "service": s.service,
            "capacity": self.declared,  # what this process can hold; a new router caps it anew
            **({"supervisor": s.supervisor} if s.supervisor is not None else {}),
            "methods": sorted(self._methods),
            "batched": {name: {"max_batch_size": spec.max_batch_size,
                               "max_delay_ms": spec.max_delay_ms,
                               "effective_max_batch_size": min(spec.max_batch_size,
                                                                self.declared)}
                        for name, spec in sorted(self._batched.items())},
        }

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stopping = True

    def _close(self, linger: int = 300) -> None:
        # A short linger by default: the GOODBYE is worth a moment, but a router that has
        # already gone (it exits right after draining) must not hold this exit for long.
        if self._wire is not None:
            self._wire.stop()  # what it still holds is sent; the socket is ours again
        self._sock.close(linger=linger)
        self._ctx.term()
        if self._shm is not None:
            self._shm.close()

    # -- the loop --------------------------------------------------------------------------
    def _serve(self) -> None:
        """Take in what waits on the socket, run the oldest request, repeat.

        Taking everything in (and doing what the wire thread left to this one) before
        each request starts is what lets a CANCEL overtake the request it names. The
        socket is lent to the wire thread while requests come back to back, and taken
        back when the loop runs out of work. Whatever was received is answered before the
        worker stops. Final replies are held only while the rest of a group of quick
        requests runs (``_next``), and are sent before the loop waits for work.
        """
        self._poller.register(self._sock, zmq.POLLIN)
        backlog = self.backlog
        group = self._group
        wire = self._wire
        while not self._stopping or backlog or group:
            if self._heart is not None and self._heart.register_again.is_set():
                self._register_again()
            self._trim_shm()
            self._catch_up()
            if not backlog and not group:
                self.replies.flush()  # nothing to start: what is held would wait
                self._await(200)
                continue
            msg = self._next()
            if msg is None:
                continue
            lend = self._lending.starting(self._ahead, wire.lent, wire.late, time.monotonic())
            if lend:  # back to back: the socket's work is done while this one runs
                wire.lend()
            elif lend is False:  # the handler holds the GIL: that work would wait for it
                wire.reclaim()
            arrived = self._batches.arrived.pop(msg.req_id, None)
            method = msg.meta.get("method")
            spec = self._batched.get(method) if isinstance(method, str) else None
            began = time.monotonic()
            try:
                if spec is not None:
                    self._batches.run(msg, arrived, spec, self._methods[method])
                else:
                    self._current = msg.req_id
                    self._running = 1
                    self._on_request(msg)
            finally:
                self._current = None
                self._running = 0
                self.stats.running = 0
            # Held ahead: the next request was here as this one ended (work back to back).
            self._ahead = bool(backlog or group) or (not wire.lent
                                                      and transport.readable(self._sock))
            if spec is None and method in self._methods:
                self._hold.times.record(method, time.monotonic() - began)
            if not group:  # a lone request, or a group's last: its replies leave now
                self.replies.flush()

    def _next(self) -> protocol.Message | None:
        """The request to start now. The next of a group runs after the replies held
        unless they waited long enough (``ReplyHold.keep``). Otherwise the oldest waiting
        starts, with the quick ones behind it as a group when there are any (STARTED, and
        their replies held); else alone, after every reply held, so that it is the oldest
        request the router sees this worker hold (4.6)."""
        replies = self.replies
        group = self._group
        if group:
            if replies.held and not self._hold.keep(len(replies.held), replies.held_bytes,
                                                    replies.held_since, time.monotonic()):
                replies.flush()
            return group.popitem(last=False)[1]
        msg = self.backlog.pop_oldest()
        if msg is None:
            return None
        hold = self._hold
        method = msg.meta.get("method")
        # The router sends more only as replies come back: replies held are requests it
        # cannot send yet. A group takes at most half of what this worker may hold, so the
        # rest keeps arriving while it runs (with max_inflight 1 there is no group at all:
        # the request held ahead must be refilled while the other runs, 7.1).
        most = self.capacity // 2
        rest = self.backlog.take_oldest(lambda ahead: hold.plan(
            chain([method], (m.meta.get("method") for m in ahead)), most) - 1) \
            if most > 1 and hold.quick(method) else ()
        if rest:
            group.update((m.req_id, m) for m in rest)
            # They all run from now on, not only the oldest: if this process dies, the
            # router answers each as started, not as never run (4.6, 8.10). What is held
            # travels with it.
            replies.send(Kind.STARTED, 0, {"ids": [msg.req_id, *group]})
        else:
            replies.flush()
        return msg

    def _trim_shm(self) -> None:
        """Give back segments that sat unused, and mappings of segments their owner left."""
        if self._shm is not None:
            self._shm.maybe_trim()

    def _register_again(self) -> None:
        """The router does not know us (it restarted). Register again. What the backlog
        holds still runs: replies the new router does not know are dropped there, and
        dropping here instead would strand requests if the router merely raced us."""
        self._heart.register_again.clear()
        self.capacity = self.declared  # the new router tells us again if it caps us lower
        self._log.warning("the router does not know this worker: registering again")
        self._send(Kind.READY, 0, self._ready_meta())

    def more_may_come(self) -> bool:
        """The router may still send requests (BatchRunner: no use waiting otherwise)."""
        return not self._stopping and self._outstanding() < self.capacity

    def receive(self, wait_ms: int) -> None:
        """Wait up to ``wait_ms`` for messages, then take in all that arrived, and do what
        the wire thread left to this one. Nothing is held while it waits."""
        if wait_ms > 0:
            self.replies.flush()
            self._await(wait_ms)
        self._catch_up()

    def _await(self, wait_ms: int) -> None:
        """Out of work: wait up to ``wait_ms`` for a message. A lent socket stays lent while
        ``Lending`` says, since work often comes back as soon, and is then taken back."""
        wire = self._wire
        keep = self._lending.waiting(wire.lent, time.monotonic())
        if wire.lent:
            if keep and wire.await_message(min(wait_ms / 1000, keep), self._has_work):
                return
            wire.reclaim()
            if self._has_work():
                return  # taken in before it gave the socket back
        if self._poller.poll(wait_ms):
            self._read_socket()

    def _has_work(self) -> bool:
        return bool(self.backlog or self._control or self._stopping)

    def _catch_up(self) -> None:
        """Take in what waits on the socket, if it is not lent, then do what the wire
        thread left to this one: which lets a CANCEL overtake the request it names."""
        if not self._wire.lent and transport.readable(self._sock):
            self._read_socket()
        if self._control:
            self._take_control()

    def _take_control(self) -> None:
        control = self._control
        while control:
            control.popleft()()

    def _read_socket(self) -> None:
        transport.drain(self._sock, self._on_wire)

    # -- on whichever thread holds the socket ---------------------------------------------------
    def _on_wire(self, frames: list) -> None:
        """One message from the router: a REQUEST goes in the backlog, a ping is answered
        at once, and what touches the main thread's state is left to it (``_catch_up``)."""
        try:
            inner = messages(frames)
        except FrameError as exc:
            # The router is trusted and builds bundles with protocol.pack: a bad one is
            # its bug. None of it is acted on (2.6), and its id is a count: no answer.
            self._log.warning("dropped malformed bundle from the router: %s", exc)
            return
        for message in inner:
            self._on_message(message)

    def _on_message(self, frames: list) -> None:
        try:
            msg = protocol.decode(frames, self._meta_cache)
        except FrameError as exc:
            # Only the router talks to us; a bad frame means a bug, not an attack. Say so.
            self._log.warning("dropped malformed frame: %s", exc)
            if exc.req_id is not None:
                self._control.append(partial(self.replies.error, exc.req_id,
                                             ProtocolError(str(exc), code=exc.code)))
            return
        if msg.kind is Kind.REQUEST:
            if not self.backlog.put(msg):
                return  # the router took it back before it was read: it runs elsewhere
            if self._batched:
                self._batches.arrived[msg.req_id] = time.monotonic()
            self.stats.received += 1
            self.stats.max_outstanding = max(self.stats.max_outstanding, self._outstanding())
        elif msg.kind is Kind.CANCEL:
            self._on_cancel_here(msg.req_id)
        elif msg.kind is Kind.SHUTDOWN:
            self._stopping = True
        elif msg.kind is Kind.HEARTBEAT and "ping" in msg.meta:
            # Straight from the thread that read it: it is not ordered with replies.
            self._wire.send(protocol.encode(Kind.HEARTBEAT, msg.req_id,
                                            {"pong": msg.meta["ping"]}))
        elif msg.kind is Kind.READY:
            self._control.append(partial(self._on_capacity, msg.meta))

    def _on_cancel_here(self, req_id: int) -> None:
        """A CANCEL, on the thread that read it. A request still in the backlog is answered
        from there, while a handler may be running: the router frees its place at once.
        Whether it or the main thread takes the request out is the backlog lock's to
        decide."""
        if self.backlog.pop(req_id) is None:
            self._control.append(partial(self._on_cancel, req_id))
            return
        self._batches.arrived.pop(req_id, None)
        self._control.append(self._count_cancelled)  # counted by one thread only
        self._wire.send(self.replies.error_frames(
            req_id, RequestCancelledError("cancelled before it started")))

    def _count_cancelled(self) -> None:
        self.stats.cancelled += 1

    def _on_cancel(self, req_id: int) -> None:
        """The router gave up on a request (timeout, client cancel). Not started: skip it.
        Streaming: stop after the current item. Running otherwise: it runs to the end."""
        queued = (self.backlog.pop(req_id) is not None
                  or self._group.pop(req_id, None) is not None)
        if self._batches.cancel(req_id) or queued:
            self.stats.cancelled += 1
            self.replies.error(req_id, RequestCancelledError("cancelled before it started"))
        elif req_id == self._current:
            self._cancel_current = True

    def _outstanding(self) -> int:
        """Requests received and not yet answered (the router keeps this <= capacity)."""
        return len(self.backlog) + len(self._group) + self._batches.held() + self._running

    def _on_request(self, msg: protocol.Message) -> None:
        self.stats.running = 1
        self._cancel_current = False
        method = msg.meta.get("method")
        fn = self._methods.get(method) if isinstance(method, str) else None
        replies = self.replies
        if fn is None:
            replies.error(msg.req_id, UnknownMethodError(
                f"service {self.spec.service!r} has no method {method!r}; "
                f"it has: {', '.join(sorted(self._methods))}"))
            return
        try:
            payload, shm_ok = self.decode(msg)
        except codec.PayloadError as exc:
            extra = {"code": exc.code} if exc.code else {}
            replies.error(msg.req_id, PayloadError(str(exc), **extra))
            return
        replies.wait_unsent()  # the handler may reuse memory an earlier reply is still sent from
        busy = self.busy
        busy.begin()
        try:
            result = fn(payload)
            busy.end()
            del payload  # the request's segments are released as soon as the handler lets go
            if inspect.isgenerator(result):
                for item in self._timed(result):
                    replies.value(Kind.PARTIAL, msg.req_id, item, shm_ok)
                    replies.wait_unsent()
                    self._catch_up()  # a CANCEL for this stream may be waiting
                    if self._cancel_current:
                        result.close()
                        self.stats.cancelled += 1
                        replies.error(msg.req_id, RequestCancelledError(
                            "stream cancelled by its caller"))
                        return
                replies.end(msg.req_id)
            else:
                replies.value(Kind.RESULT, msg.req_id, result, shm_ok)
        except UnencodableResult as exc:
            replies.error(msg.req_id, PayloadError(str(exc)))
        except Exception as exc:
            busy.end()
            self.fail([msg.req_id], exc)

    def _timed(self, stream: Iterator) -> Iterator:
        """A streaming handler runs while it makes each item, not while its items travel.
        No reply is held while it runs: an item may take long."""
        busy = self.busy
        while True:
            self.replies.flush()
            busy.begin()
            try:
                item = next(stream)
            except StopIteration:
                return
            finally:
                busy.end()
            yield item

    def decode(self, msg: protocol.Message) -> tuple[Any, bool]:
        """A request's payload, for plain and batched methods alike, and whether shared
        memory may carry it and its reply: only with a client that says it maps our host's
        segments. Raises ``codec.PayloadError`` when its body does not decode."""
        shm_ok = self._host is not None and msg.meta.get("shm") == self._host
        return codec.loads(msg.body, msg.buffers, mapper=self._mapper if shm_ok else None,
                           max_bytes=self.spec.max_message_bytes), shm_ok

    # -- errors --------------------------------------------------------------------------------
    def fail(self, req_ids: list[int], exc: BaseException) -> None:
        """Answer each request with the error the handler's ``exc`` means: a domain error
        keeps the worker; a poisoned CUDA context ends it (faults.py)."""
        fate = faults.fate_of(exc)
        text = f"{type(exc).__name__}: {exc}"
        tb = "".join(traceback.format_exception(exc))
        if fate is Fate.POISONED:
            self._leave_poisoned(req_ids, text, tb, exc)
        if fate is Fate.EXHAUSTED:
            faults.release_cached_memory()
        for req_id in req_ids:
            if fate is Fate.EXHAUSTED:
                self.replies.error(req_id, ResourceExhaustedError(
                    f"out of device memory: {text}", remote_type=type(exc).__name__,
                    traceback=tb))
            else:
                self.replies.error(req_id, HandlerError(text, remote_type=type(exc).__name__,
                                                        traceback=tb))

    def _leave_poisoned(self, req_ids: list[int], text: str, tb: str,
                        exc: BaseException) -> None:
        """Answer, say why, and exit without running any cleanup that could touch CUDA."""
        self._log.error("CUDA context poisoned; exiting:", exc_info=exc,
                        extra={"event": "context-poisoned"})
        for req_id in req_ids:
            self.replies.error(req_id, WorkerCrashedError(
                f"worker {self.spec.slot} hit a sticky CUDA error and is being replaced: {text}",
                cause=GoodbyeReason.CONTEXT_POISONED.value, remote_type=text.partition(":")[0],
                traceback=tb))
        self._send(Kind.GOODBYE, 0, {"reason": GoodbyeReason.CONTEXT_POISONED,
                                     "error": text[-2000:]})
        # close() alone returns at once; term() waits (up to the linger) until the replies
        # above are on the wire (and for every socket: the heartbeat's first). No CUDA.
        self._heart.stop()
        self._wire.stop()
        self._sock.close(linger=2000)
        self._ctx.term()
        os._exit(EXIT_POISONED)

    # -- sending -------------------------------------------------------------------------------
    def _send(self, kind: Kind, req_id: int, meta: dict | bytes | None = None) -> None:
        """A message that is not a reply (READY, GOODBYE, a pong)."""
        self.replies.send(kind, req_id, meta)


class _Heartbeat(threading.Thread):
    """Tells the router this process is alive, from its own thread and socket; and answers
    the router's RECLAIM, which asks for a request held ahead back while a handler runs.

    A handler that merely runs long keeps beating (the GIL is released every few ms); a
    process that is stopped (SIGSTOP), or stuck in native code holding the GIL, goes
    silent, and the router has it killed. Hung-but-beating handlers are bounded by the
    service's ``exec_timeout`` instead.

    Once, ``FIRST_WORK_BEAT`` after its first handler call ended, it beats out of turn;
    until then it looks at the busy meter that often (no message).
    """

    def __init__(self, ctx: zmq.Context, spec: WorkerSpec, busy: BusyMeter,
                 sizes: BatchSizeMeter, backlog: Backlog) -> None:
        super().__init__(name="workerpool-heartbeat", daemon=True)
        self._ctx = ctx
        self._spec = spec
        self._busy = busy
        self._sizes = sizes
        self._backlog = backlog
        self._keys = spec.curve_keys()  # read here: a bad file fails the worker at start
        self._halt = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # stop() wakes the poll at once
        self.register_again = threading.Event()  # a restarted router does not know us

    def run(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self._spec.identity + protocol.HEARTBEAT_SUFFIX)
        sock.setsockopt(zmq.LINGER, 0)
        curve.secure_client(sock, self._keys)
        sock.connect(self._spec.backend)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        meta = {"of": self._spec.identity}
        interval = self._spec.heartbeat_interval
        try:
            n = 0
            worked = False  # a handler call has ended (the out-of-turn beat is due or sent)
            while not self._halt.is_set():
                n += 1
                meta["mem"] = memory_use()
                meta["busy"] = list(self._busy.sample())
                # Only the methods whose batches moved: most beats carry none.
                batches = self._sizes.report()
                if batches:
                    meta["batches"] = batches
                if self._send(sock, Kind.HEARTBEAT, n, meta) and batches:
                    self._sizes.sent(batches)
                meta.pop("batches", None)
                next_beat = time.monotonic() + interval
                while not self._halt.is_set():
                    now = time.monotonic()
                    if not worked and self._busy.finished_any():
                        worked = True  # a handler call ended: beat soon with its time
                        next_beat = min(next_beat, now + FIRST_WORK_BEAT)
                    wait = next_beat - now
                    if wait <= 0:
                        break
                    if poller.poll((wait if worked else min(wait, FIRST_WORK_BEAT)) * 1000):
                        self._read(sock)
        finally:
            sock.close(0)

    @staticmethod
    def _send(sock: zmq.Socket, kind: Kind, req_id: int, meta: dict) -> bool:
        """True once the message is queued for the router."""
        try:
            transport.send(sock, protocol.encode(kind, req_id, meta), transport.NOBLOCK)
        except zmq.ZMQError:
            return False  # router unreachable now: the next beat tries again
        return True

    def _read(self, sock: zmq.Socket) -> None:
        """Take in every message waiting; the RECLAIM answers they ask for leave together,
        as one BUNDLE when there are several."""
        answers: list[bytes] = []
        while True:
            try:
                frames = transport.recv(sock, transport.NOBLOCK)
            except zmq.Again:
                break
            try:
                inner = messages(frames)
            except FrameError as exc:  # the router's bug (it is trusted): none of it acted on
                log.warning("[%s] heartbeat thread dropped a malformed bundle from the "
                            "router: %s", self._spec.slot, exc)
                continue
            for one in inner:
                self._on_message(one, answers)
        for message in protocol.pack(answers):
            try:
                transport.send(sock, [message], transport.NOBLOCK)
            except zmq.ZMQError:
                pass  # router unreachable now: the RECLAIMs are lost with it, as one alone

    def _on_message(self, frames: list, answers: list[bytes]) -> None:
        try:
            msg = protocol.decode(frames)
        except FrameError:
            return
        if msg.kind is Kind.RECLAIM:
            seq = msg.meta.get("seq")
            returned = type(seq) is int and self._backlog.give_back(msg.req_id, seq)
            answers.append(protocol.encode(Kind.RECLAIM, msg.req_id,
                                           {"returned": returned})[0])
        elif msg.kind is Kind.HEARTBEAT and msg.meta.get("register"):
            # Asked at each beat a router cannot place, so a beat soon after we
            # register again carries every method's batch figures anew.
            self._sizes.resend()
            self.register_again.set()

    def stop(self) -> None:
        self._halt.set()
        os.write(self._wake_w, b"x")
        if self.is_alive():
            self.join(2)
        if not self.is_alive():  # closed only once nothing polls them
            os.close(self._wake_r)
            os.close(self._wake_w)


def main() -> int:
    # First: everything below, the handler's import and setup() included, logs.
    setup_logging(role="worker")
    raw = os.environ.get(SPEC_ENV)
    if not raw:
        log.error("%s is not set; workers are started by the supervisor (workerpool up / "
                  "workerpool worker)", SPEC_ENV)
        return 2
    spec = WorkerSpec.model_validate_json(raw)
    setup_logging(role="worker", worker=spec.slot)  # every line says which worker wrote it
    die_with_parent(spec.parent_pid)
    return Worker(spec).run()


if __name__ == "__main__":
    sys.exit(main())
