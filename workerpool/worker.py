"""The worker process: one handler, one device, one DEALER socket to the router.

Data flow::

    router --REQUEST(id, meta, body)--> [DEALER] worker --method(payload)--> handler
    router <--RESULT | ERROR | PARTIAL* END--            <--value / generator / raise--

The worker is started by the supervisor as a fresh interpreter
(``python -m workerpool.worker``) with its ``WorkerSpec`` in the environment and
``CUDA_VISIBLE_DEVICES`` already set, so nothing CUDA-related is inherited. It handles
one request at a time, in order; the router decides how many it may hold (``capacity``).
A method declared ``@batched`` (workerpool/batching.py) instead runs once for the requests
of that method the worker holds, up to its ``max_batch_size``. A handler's exception is a
domain error: it is answered as ``HandlerError`` and the worker keeps serving. If
``setup()`` fails the worker reports why and exits with ``EXIT_SETUP_FAILED`` so the
supervisor does not respawn it in a loop.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from typing import Any

import msgpack
import zmq
from pydantic import BaseModel, ConfigDict

from ipc import codec, protocol, shm, transport
from ipc.protocol import FrameError, Kind
from workerpool import faults
from workerpool._proc import EXIT_POISONED, EXIT_SETUP_FAILED, die_with_parent, setup_logging
from workerpool.batching import BatchSpec, batch_spec, check_results
from workerpool.config import TIMINGS
from workerpool.context import WorkerContext, WorkerStats
from workerpool.devices import CPU, device_label
from workerpool.errors import (
    HandlerError,
    PayloadError,
    ProtocolError,
    RequestCancelledError,
    RequestTimeoutError,
    ResourceExhaustedError,
    UnknownMethodError,
    WorkerCrashedError,
    WorkerPoolError,
)
from workerpool.faults import Fate
from workerpool.memory import memory_use

SPEC_ENV = "WORKERPOOL_WORKER_SPEC"
_RESERVED = frozenset({"setup", "teardown", "context"})


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
    max_message_bytes: int = 256 * 2**20  # the router drops bigger messages: refuse them here
    heartbeat_interval: float = 1.0  # seconds between heartbeats from the heartbeat thread

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
        self._sock.connect(spec.backend)
        # Every reply carries the worker's slot so errors and results name who produced them.
        self._reply_meta = protocol.pack_meta({"worker": spec.slot})
        self._methods: dict[str, Any] = {}
        self._batched: dict[str, BatchSpec] = {}  # the methods declared @batched
        self.capacity = spec.capacity or 1  # settled once setup() has shown the methods
        self.declared = self.capacity  # what it tells the router; capacity: what the router allows
        self._meta_cache = protocol.MetaCache()
        self._backlog: OrderedDict[int, protocol.Message] = OrderedDict()  # received, not run
        self._arrived: dict[int, float] = {}  # when each backlog request arrived (batching)
        self._gathering: OrderedDict[int, protocol.Message] = OrderedDict()  # batch being formed
        self._running = 0  # requests running now: 1, or a batch's size
        self._poller = zmq.Poller()
        self._current: int | None = None  # request id running now (not batched)
        self._cancel_current = False
        self._heart: _Heartbeat | None = None
        self.stats = WorkerStats()
        self._handler: Any = None
        # Shared memory with clients on this host: requests whose meta "shm" names our host
        # may carry segment handles, and get their large arrays back the same way.
        self._host = shm.host_id()
        self._shm = shm.ShmEndpoint() if self._host else None
        self._pool = self._shm.pool if self._shm else None  # lends the replies' arrays
        self._mapper = self._shm.mapper if self._shm else None  # maps the requests' arrays
        self._unsent: list[zmq.MessageTracker] = []  # zero-copy frames ZeroMQ still reads

    # -- lifecycle -----------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._setup()
        except Exception:
            tb = traceback.format_exc()
            sys.stderr.write(f"[{self.spec.slot}] setup failed:\n{tb}")
            self._send(Kind.GOODBYE, 0, {"reason": "setup-failed", "error": tb[-4000:],
                                         "slot": self.spec.slot, "service": self.spec.service})
            self._close()
            return EXIT_SETUP_FAILED
        self._send(Kind.READY, 0, self._ready_meta())
        self._heart = _Heartbeat(self._ctx, self.spec)
        self._heart.start()
        stopped = False
        try:
            self._serve()
            stopped = True
        finally:
            self._teardown()  # still beating: a slow teardown is not a hang
            self._heart.stop()
            if stopped:
                # Only a clean stop says so: after an exception of the runtime itself the
                # router must learn of a crash (from the supervisor), not of a stop that
                # would leave the slot STOPPED and never answer what we held as crashed.
                self._send(Kind.GOODBYE, 0, {"reason": "stopped"})
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
                sys.stderr.write(
                    f"[{self.spec.slot}] warning: @batched method {name!r} has max_batch_size="
                    f"{spec.max_batch_size} but this worker holds at most max_inflight="
                    f"{self.capacity} request(s), so its batches hold at most "
                    f"{self.capacity}; set the service's max_inflight >= "
                    f"{spec.max_batch_size} (or leave it unset)\n")

    def _on_capacity(self, meta: dict) -> None:
        """The router caps this worker below what it declared (the service's max_inflight,
        set by another supervisor's configuration): batches flush at the lower count."""
        cap = meta.get("capacity")
        if type(cap) is not int or cap < 1 or cap == self.capacity:
            return
        self.capacity = min(cap, self.declared)
        sys.stderr.write(f"[{self.spec.slot}] the router caps this worker at {self.capacity} "
                         f"request(s) (it declared {self.declared}): the service's "
                         "max_inflight\n")
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
                traceback.print_exc()

    def _ready_meta(self) -> dict:
        s = self.spec
        return {
            "slot": s.slot,
            "incarnation": s.incarnation,
            "pid": os.getpid(),
            "device": device_label(s.device),
            "service": s.service,
            "capacity": self.declared,  # what this process can hold; a new router caps it anew
            "methods": sorted(self._methods),
            "batched": {name: {"max_batch_size": spec.max_batch_size,
                               "max_delay_ms": spec.max_delay_ms,
                               "effective_max_batch_size": min(spec.max_batch_size,
                                                                self.declared)}
                        for name, spec in sorted(self._batched.items())},
        }

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stopping = True

    def _close(self) -> None:
        # A short linger: the GOODBYE is worth a moment, but a router that has already
        # gone (it exits right after draining) must not hold this exit for long.
        self._sock.close(linger=300)
        self._ctx.term()
        if self._shm is not None:
            self._shm.close()

    # -- the loop --------------------------------------------------------------------------
    def _serve(self) -> None:
        """Take every waiting message into the backlog, run the oldest request, repeat.

        Reading the socket dry before each request is what lets a CANCEL overtake the
        request it names. Whatever was received is answered before the worker stops.
        """
        poller = self._poller
        poller.register(self._sock, zmq.POLLIN)
        backlog = self._backlog
        while not self._stopping or backlog:
            if self._heart is not None and self._heart.register_again.is_set():
                self._register_again()
            self._trim_shm()
            if not backlog and not poller.poll(200):
                continue
            # With a backlog this runs once per request and mostly finds nothing.
            if not backlog or transport.readable(self._sock):
                self._read_socket()
            if backlog:
                _, msg = backlog.popitem(last=False)
                arrived = self._arrived.pop(msg.req_id, None)
                method = msg.meta.get("method")
                spec = self._batched.get(method) if isinstance(method, str) else None
                try:
                    if spec is not None:
                        self._run_batch(msg, arrived, spec)
                    else:
                        self._current = msg.req_id
                        self._running = 1
                        self._on_request(msg)
                finally:
                    self._current = None
                    self._running = 0
                    self.stats.running = 0

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
        sys.stderr.write(f"[{self.spec.slot}] the router does not know this worker: "
                         "registering again\n")
        self._send(Kind.READY, 0, self._ready_meta())

    def _read_socket(self) -> None:
        while True:
            try:
                frames = transport.recv(self._sock, transport.NOBLOCK)
            except zmq.Again:
                return
            self._on_message(frames)

    def _on_message(self, frames: list) -> None:
        try:
            msg = protocol.decode(frames, self._meta_cache)
        except FrameError as exc:
            # Only the router talks to us; a bad frame means a bug, not an attack. Say so.
            sys.stderr.write(f"[{self.spec.slot}] dropped malformed frame: {exc}\n")
            if exc.req_id is not None:
                self._send_error(exc.req_id, ProtocolError(str(exc), code=exc.code))
            return
        if msg.kind is Kind.REQUEST:
            self._backlog[msg.req_id] = msg
            if self._batched:
                self._arrived[msg.req_id] = time.monotonic()
            self.stats.received += 1
            self.stats.max_outstanding = max(self.stats.max_outstanding, self._outstanding())
        elif msg.kind is Kind.CANCEL:
            self._on_cancel(msg.req_id)
        elif msg.kind is Kind.SHUTDOWN:
            self._stopping = True
        elif msg.kind is Kind.HEARTBEAT and "ping" in msg.meta:
            self._send(Kind.HEARTBEAT, msg.req_id, {"pong": msg.meta["ping"]})
        elif msg.kind is Kind.READY:
            self._on_capacity(msg.meta)

    def _on_cancel(self, req_id: int) -> None:
        """The router gave up on a request (timeout, client cancel). Not started: skip it.
        Streaming: stop after the current item. Running otherwise: it runs to the end."""
        if (self._backlog.pop(req_id, None) or self._gathering.pop(req_id, None)) is not None:
            self._arrived.pop(req_id, None)
            self.stats.cancelled += 1
            self._send_error(req_id, RequestCancelledError("cancelled before it started"))
        elif req_id == self._current:
            self._cancel_current = True

    def _outstanding(self) -> int:
        """Requests received and not yet answered (the router keeps this <= capacity)."""
        return len(self._backlog) + len(self._gathering) + self._running

    def _on_request(self, msg: protocol.Message) -> None:
        self.stats.running = 1
        self._cancel_current = False
        method = msg.meta.get("method")
        fn = self._methods.get(method) if isinstance(method, str) else None
        if fn is None:
            self._send_error(msg.req_id, UnknownMethodError(
                f"service {self.spec.service!r} has no method {method!r}; "
                f"it has: {', '.join(sorted(self._methods))}"))
            return
        shm_ok = self._shm_ok(msg)
        try:
            payload = self._decode(msg, shm_ok)
        except codec.PayloadError as exc:
            extra = {"code": exc.code} if exc.code else {}
            self._send_error(msg.req_id, PayloadError(str(exc), **extra))
            return
        self._wait_unsent()  # the handler may reuse memory an earlier reply is still sent from
        try:
            result = fn(payload)
            del payload  # the request's segments are released as soon as the handler lets go
            if inspect.isgenerator(result):
                for item in result:
                    self._send_value(Kind.PARTIAL, msg.req_id, item, shm_ok)
                    self._wait_unsent()
                    self._read_socket()  # a CANCEL for this stream may be waiting
                    if self._cancel_current:
                        result.close()
                        self.stats.cancelled += 1
                        self._send_error(msg.req_id, RequestCancelledError(
                            "stream cancelled by its caller"))
                        return
                self._send(Kind.END, msg.req_id, self._reply_meta)
            else:
                self._send_value(Kind.RESULT, msg.req_id, result, shm_ok)
        except _UnencodableResult as exc:
            self._send_error(msg.req_id, PayloadError(str(exc)))
        except Exception as exc:
            self._on_handler_exception([msg.req_id], exc)

    def _shm_ok(self, msg: protocol.Message) -> bool:
        """Shared memory both ways only with a client that says it maps our host's segments."""
        return self._host is not None and msg.meta.get("shm") == self._host

    def _decode(self, msg: protocol.Message, shm_ok: bool) -> Any:
        """A request's payload, for plain and batched methods alike; raises
        ``codec.PayloadError`` when its body does not decode."""
        return codec.loads(msg.body, msg.buffers, mapper=self._mapper if shm_ok else None,
                           max_bytes=self.spec.max_message_bytes)

    # -- batches -------------------------------------------------------------------------------
    def _run_batch(self, first: protocol.Message, arrived: float | None, spec: BatchSpec) -> None:
        """Gather the requests for ``first``'s method, run the method once, answer each.

        The batch runs when it is full, when ``first`` (the oldest) has waited
        ``max_delay_ms``, when the worker holds all the router will send it, or when the
        worker is stopping. Requests cancelled meanwhile, or whose ``timeout`` has certainly
        passed, are answered and left out.
        """
        method = first.meta["method"]
        gathering = self._gathering
        gathering[first.req_id] = first
        now = time.monotonic()
        arrived_at = {first.req_id: now if arrived is None else arrived}
        flush_at = arrived_at[first.req_id] + spec.max_delay_ms / 1000
        while True:
            self._take_matching(method, spec.max_batch_size, arrived_at)
            if (not gathering or len(gathering) >= spec.max_batch_size or self._stopping
                    or self._outstanding() >= self.capacity):
                break
            wait = flush_at - time.monotonic()
            if wait <= 0:
                break
            if self._poller.poll(math.ceil(wait * 1000)):
                self._read_socket()  # CANCELs drop from the batch here, pings are answered
        self._read_socket()  # last chance for a CANCEL to overtake the batch
        self._take_matching(method, spec.max_batch_size, arrived_at)
        if not gathering:
            return  # every request was cancelled while the batch formed
        msgs = list(gathering.values())
        gathering.clear()
        self._running = len(msgs)
        self.stats.running = len(msgs)
        self._execute_batch(method, msgs, arrived_at, first.req_id)

    def _take_matching(self, method: str, limit: int, arrived_at: dict[int, float]) -> None:
        """Move requests for ``method`` from the backlog into the batch, oldest first."""
        room = limit - len(self._gathering)
        if room <= 0:
            return
        for rid in [rid for rid, m in self._backlog.items() if m.meta.get("method") == method
                    ][:room]:
            self._gathering[rid] = self._backlog.pop(rid)
            arrived_at[rid] = self._arrived.pop(rid, time.monotonic())

    def _execute_batch(self, method: str, msgs: list[protocol.Message],
                       arrived_at: dict[int, float], oldest: int) -> None:
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
                self._send_error(msg.req_id, RequestTimeoutError(
                    f"timeout={timeout:g}s passed before its batch ran"))
                continue
            shm_ok[msg.req_id] = self._shm_ok(msg)
            try:
                payloads.append(self._decode(msg, shm_ok[msg.req_id]))
            except codec.PayloadError as exc:
                extra = {"code": exc.code} if exc.code else {}
                self._send_error(msg.req_id, PayloadError(str(exc), **extra))
                continue
            ids.append(msg.req_id)
        if not ids:
            return
        if ids != [oldest]:
            # The router assumes a worker runs only the oldest request it holds; tell it which
            # ones started (several, or a later one when the oldest was left out), so a
            # crash now is answered as a crash for exactly these.
            self._send(Kind.STARTED, 0, {"ids": ids})
        self.stats.batches += 1
        self.stats.batched_requests += len(ids)
        self._wait_unsent()  # the handler may reuse memory an earlier reply is still sent from
        try:
            results = check_results(method, self._methods[method](payloads), len(ids))
        except Exception as exc:
            self._on_handler_exception(ids, exc)
            return
        for r in results:
            if (isinstance(r, BaseException) and not isinstance(r, WorkerPoolError)
                    and self._fate(r) is Fate.POISONED):
                self._on_handler_exception(ids, r)  # one item's fault poisoned the context
                return
        for k, (rid, value) in enumerate(zip(ids, results, strict=True)):
            if isinstance(value, WorkerPoolError):
                self._send_error(rid, value)  # a typed error the handler chose for this caller
            elif isinstance(value, BaseException):
                self._on_handler_exception([rid], value)
            else:
                try:
                    self._send_value(Kind.RESULT, rid, value, shm_ok[rid])
                except _UnencodableResult as exc:
                    self._send_error(rid, PayloadError(str(exc)))
                except Exception as exc:
                    # Encoding copies a CUDA result to the host, where an earlier kernel's
                    # sticky error surfaces: then every caller not yet answered hears it.
                    poisoned = self._fate(exc) is Fate.POISONED
                    self._on_handler_exception(ids[k:] if poisoned else [rid], exc)

    # -- errors --------------------------------------------------------------------------------
    @staticmethod
    def _fate(exc: BaseException) -> Fate:
        fate = faults.classify(exc)
        if fate is Fate.DOMAIN and faults.is_cuda_error(exc) and not faults.context_alive():
            fate = Fate.POISONED  # an unlisted CUDA error that left the context unusable
        return fate

    def _on_handler_exception(self, req_ids: list[int], exc: BaseException) -> None:
        """Answer each request with the error ``exc`` means: a domain error keeps the
        worker; a poisoned CUDA context ends it (faults.py)."""
        fate = self._fate(exc)
        text = f"{type(exc).__name__}: {exc}"
        tb = "".join(traceback.format_exception(exc))
        if fate is Fate.POISONED:
            self._leave_poisoned(req_ids, text, tb)
        if fate is Fate.EXHAUSTED:
            faults.release_cached_memory()
        for req_id in req_ids:
            if fate is Fate.EXHAUSTED:
                self._send_error(req_id, ResourceExhaustedError(
                    f"out of device memory: {text}", remote_type=type(exc).__name__,
                    traceback=tb))
            else:
                self._send_error(req_id, HandlerError(text, remote_type=type(exc).__name__,
                                                      traceback=tb))

    def _leave_poisoned(self, req_ids: list[int], text: str, tb: str) -> None:
        """Answer, say why, and exit without running any cleanup that could touch CUDA."""
        sys.stderr.write(f"[{self.spec.slot}] CUDA context poisoned; exiting:\n{tb}")
        for req_id in req_ids:
            self._send_error(req_id, WorkerCrashedError(
                f"worker {self.spec.slot} hit a sticky CUDA error and is being replaced: {text}",
                cause=Fate.POISONED.value, remote_type=text.partition(":")[0], traceback=tb))
        self._send(Kind.GOODBYE, 0, {"reason": Fate.POISONED.value, "error": text[-2000:]})
        # close() alone returns at once; term() waits (up to the linger) until the replies
        # above are on the wire (and for every socket: the heartbeat's first). No CUDA.
        self._heart.stop()
        self._sock.close(linger=2000)
        self._ctx.term()
        os._exit(EXIT_POISONED)

    # -- sending -------------------------------------------------------------------------------
    def _send(self, kind: Kind, req_id: int, meta: dict | bytes | None = None,
              body: bytes = b"", buffers: list | tuple = ()) -> None:
        transport.send(self._sock, protocol.encode(kind, req_id, meta, body, buffers))

    def _send_value(self, kind: Kind, req_id: int, value: Any, shm_ok: bool = False) -> None:
        limit = self.spec.max_message_bytes
        try:
            body, buffers = codec.dumps(value, pool=self._pool if shm_ok else None,
                                        max_bytes=limit)
        except codec.PayloadError as exc:
            if exc.code == codec.TOO_LARGE:
                raise _UnencodableResult(f"handler returned {exc}") from None
            raise _UnencodableResult(
                f"handler returned a value that cannot be sent: {exc}") from None
        size = len(body) + sum(len(b) for b in buffers)
        if size > limit:
            raise _UnencodableResult(f"handler returned {size} bytes, over max_message_bytes="
                                     f"{limit}")
        frames = protocol.encode(kind, req_id, self._reply_meta, body, buffers)
        self._unsent += transport.send(self._sock, frames, track=bool(buffers))

    def _wait_unsent(self) -> None:
        """Block until ZeroMQ has finished reading the zero-copy frames sent so far, so a
        handler that refills the array it returned last time cannot change a reply that is
        still on its way."""
        for tracker in self._unsent:
            try:
                tracker.wait(TIMINGS.unsent_wait)
            except zmq.NotDone:
                # No router to read it (it restarted): ZeroMQ sends it on reconnection, to
                # a router that drops it as unknown. Don't hold the next request for that.
                sys.stderr.write(f"[{self.spec.slot}] a reply was not sent within "
                                 f"{TIMINGS.unsent_wait:g}s; going on\n")
                break
        self._unsent.clear()

    def _send_error(self, req_id: int, err: WorkerPoolError) -> None:
        err.worker = self.spec.slot
        self._send(Kind.ERROR, req_id, self._reply_meta,
                   msgpack.packb(err.to_wire(), use_bin_type=True, default=str))


class _UnencodableResult(Exception):
    pass


class _Heartbeat(threading.Thread):
    """Tells the router this process is alive, from its own thread and socket.

    A handler that merely runs long keeps beating (the GIL is released every few ms); a
    process that is stopped (SIGSTOP), or stuck in native code holding the GIL, goes
    silent, and the router has it killed. Hung-but-beating handlers are bounded by the
    service's ``exec_timeout`` instead.
    """

    def __init__(self, ctx: zmq.Context, spec: WorkerSpec) -> None:
        super().__init__(name="workerpool-heartbeat", daemon=True)
        self._ctx = ctx
        self._spec = spec
        self._halt = threading.Event()
        self.register_again = threading.Event()  # a restarted router does not know us

    def run(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self._spec.identity + b"#hb")
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self._spec.backend)
        meta = {"of": self._spec.identity}
        try:
            n = 0
            while not self._halt.is_set():
                n += 1
                meta["mem"] = memory_use()
                try:
                    transport.send(sock, protocol.encode(Kind.HEARTBEAT, n, meta),
                                   transport.NOBLOCK)
                except zmq.ZMQError:
                    pass  # router unreachable right now: the next beat tries again
                if self._halt.wait(self._spec.heartbeat_interval):
                    break  # stop() returns at once, not after a beat
                self._read(sock)
        finally:
            sock.close(0)

    def _read(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = transport.recv(sock, transport.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = protocol.decode(frames)
            except FrameError:
                continue
            if msg.kind is Kind.HEARTBEAT and msg.meta.get("register"):
                self.register_again.set()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(2)


def main() -> int:
    raw = os.environ.get(SPEC_ENV)
    if not raw:
        sys.stderr.write(f"workerpool.worker: {SPEC_ENV} is not set; workers are started by "
                         "the supervisor (workerpool up / workerpool worker)\n")
        return 2
    spec = WorkerSpec.model_validate_json(raw)
    die_with_parent(spec.parent_pid)
    setup_logging()
    return Worker(spec).run()


if __name__ == "__main__":
    sys.exit(main())
