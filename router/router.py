"""The router process: one poll loop between clients and workers.

::

    clients [DEALER] --> frontend ROUTER --+                     +-- backend ROUTER <-- [DEALER] workers
                                           |   Router loop       |                  <-- [DEALER] supervisors
                                           +-- records, queues,--+
                                               health table, timers

Each pass of the loop polls both sockets and a signal wake-up fd, drains each socket in
bounded batches (so one busy side cannot starve the other), then runs due timers
(deadlines) and the drain check. Nothing in it blocks: sends are NOBLOCK with
``ROUTER_MANDATORY`` so an unroutable peer is an error we count, not a silent drop.

Bytes from the network never raise out of the loop: every frame sequence decodes or
becomes a typed ``ProtocolError`` reply (clients) or a counted, logged drop (backend).
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable

import msgpack
import zmq

from ipc import protocol, transport
from ipc.errors import IllegalTransition
from ipc.lifecycle import WorkerState
from ipc.protocol import FINAL_REPLY_KINDS, REPLY_KINDS, FrameError, Kind
from ipc.transport import NOBLOCK
from router.health import Conn, Slot
from router.requests import Phase, Record
from router.service import Service, ServiceSettings
from workerpool._proc import SignalWakeup
from workerpool.config import (
    DEFAULT_BACKEND,
    MAX_PRIORITY,
    MAX_TIMEOUT,
    MIN_PRIORITY,
    ROUTED_FIELDS,
    TIMINGS,
    RouterConfig,
    ServiceConfig,
    routed_defaults,
)
from workerpool.errors import (
    AdminError,
    BackpressureError,
    PoisonedRequestError,
    ProtocolError,
    RequestTimeoutError,
    ServiceUnavailableError,
    UnknownMethodError,
    WorkerCrashedError,
    WorkerPoolError,
)

log = logging.getLogger("workerpool.router")

BATCH = 512  # messages taken from one socket before looking at the other
_DEADLINE, _MAX_WAIT = 0, 1  # timer kinds
ADMIN_OPS = ("restart", "drain", "scale")  # operator commands, carried out with the supervisors
_ALIVE = frozenset({WorkerState.STARTING, WorkerState.RESTARTING, WorkerState.DEAD,
                    WorkerState.READY, WorkerState.BUSY, WorkerState.SPARE})
MAX_WORKERS = 1024  # per service and supervisor, as ServiceConfig.workers allows
MAX_GRACE_SERVICES = 256  # services requests may name before any supervisor described them
TIMER_SLACK = 1024  # disarmed timers tolerated before the heap is rebuilt
_EMPTY_META = b""


def _count(value: object) -> int:
    """A worker count from a peer's HELLO; anything else is refused as a bad message."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WORKERS:
        raise ValueError(f"bad worker count {value!r}")
    return value


def _err_body(err: WorkerPoolError) -> bytes:
    return msgpack.packb(err.to_wire(), use_bin_type=True, default=str)


class Router:
    """Routes requests from clients to workers and keeps the health table.

    ``run()`` serves until SIGTERM/SIGINT or a supervisor's DRAIN, then drains: it stops
    admitting, lets admitted requests finish (up to ``drain_timeout``), tells every
    worker to stop, and returns.
    """

    def __init__(self, config: RouterConfig, service_defaults: dict | None = None) -> None:
        self.config = config
        self._defaults = {**routed_defaults(), **(service_defaults or {})}
        self._ctx = zmq.Context()
        self.frontend = self._bind(config.frontend, sndhwm=1_000_000)
        self.backend = self._bind(config.backend or DEFAULT_BACKEND, sndhwm=0)
        self.frontend_address = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_address = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)

        self.services: dict[str, Service] = {}
        self.slots: dict[str, Slot] = {}
        self.conns: dict[bytes, Conn] = {}  # backend identity -> registered worker
        self.supervisors: dict[bytes, dict] = {}
        self._slot_owner: dict[str, bytes] = {}  # slot id -> supervisor that runs it
        # service -> supervisor -> (workers, spares) from its HELLO: how many of its
        # registered workers serve; the rest are held back as spares.
        self._targets: dict[str, dict[bytes, tuple[int, int]]] = {}
        self._unreachable: dict[bytes, float] = {}  # worker identity -> give-up time
        self._draining_sups: dict[bytes, float] = {}  # leaving supervisor -> drain deadline
        self._deaths: list[tuple[float, Slot, int, str]] = []  # (when due, slot, inc, how)
        self._next_liveness = 0.0
        self._departed: set[bytes] = set()  # supervisors that drained and left
        self._lost: set[bytes] = set()  # supervisors declared lost; taken back if they speak
        self._unknown_beats: dict[bytes, float] = {}  # heartbeats from unregistered workers
        self.records: dict[int, Record] = {}
        self._by_client: dict[tuple[bytes, int], Record] = {}
        self._timers: list[tuple[float, int, int]] = []  # (when, rid, kind); stale ones skipped
        # Ids start from the clock, so a reply addressed by an earlier router process (same
        # workers, restarted router) can never match a request of this one.
        self._next_rid = (time.time_ns() // 1000) << 8
        self.instance = f"{os.getpid()}-{time.time_ns()}"  # changes when the router restarts
        self._meta_cache = protocol.MetaCache()
        self.stats: Counter[str] = Counter()
        self._warned: Counter[str] = Counter()
        self.started = time.monotonic()
        # Until then, requests for services nobody described yet wait (see _resolve_service).
        self._grace_until: float | None = self.started + config.registration_grace

        self.draining = False
        self._drain_deadline = 0.0
        self._drained = False
        self._exit_at: float | None = None
        self._wakeup = SignalWakeup()

    def _bind(self, address: str, sndhwm: int) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(address)
        return sock

    # -- the loop ----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a drain; the wake-up fd makes the poll return at once."""
        self._wakeup.install(lambda: self.begin_drain("signal"))

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self._wakeup, zmq.POLLIN)
        log.info("router listening: frontend %s, backend %s",
                 self.frontend_address, self.backend_address)
        busy = False
        try:
            while True:
                events = dict(poller.poll(0 if busy else self._poll_timeout_ms()))
                if self._wakeup.fileno() in events:
                    self._wakeup.drain()
                busy = False
                if self.backend in events:
                    busy |= self._drain_socket(self.backend, self._on_backend)
                if self.frontend in events:
                    busy |= self._drain_socket(self.frontend, self._on_frontend)
                self._guarded(self._run_timers)
                self._guarded(self._check_liveness)
                self._guarded(self._check_worker_drains)
                if self._deaths:
                    self._guarded(self._apply_deaths)
                if self._draining_sups:
                    self._guarded(self._check_supervisor_drains)
                if self.draining:
                    self._guarded(self._check_drained)
                    if self._exit_at is not None and time.monotonic() >= self._exit_at:
                        break
        finally:
            self.close()

    def close(self) -> None:
        self.frontend.close()
        self.backend.close()
        self._ctx.term()
        self._wakeup.close()

    def _guarded(self, step) -> None:
        """Run a loop step; a bug in it is logged and counted, never fatal to the router."""
        try:
            step()
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("internal error in %s", getattr(step, "__name__", step))

    def _poll_timeout_ms(self) -> int:
        t = TIMINGS.liveness_tick * 1000
        now = time.monotonic()
        if self._timers:
            t = min(t, (self._timers[0][0] - now) * 1000)
        if self._unreachable:
            t = min(t, 50.0)
        if self._deaths:
            t = min(t, TIMINGS.death_grace * 1000)
        if self.draining or self._draining_sups:
            t = min(t, 20.0)
        return max(0, int(t) + 1)

    def _drain_socket(self, sock: zmq.Socket, handler) -> bool:
        """Handle up to BATCH waiting messages; True if more may be waiting."""
        for _ in range(BATCH):
            try:
                frames = transport.recv(sock, NOBLOCK, 4)  # routing id, then the message
            except zmq.Again:
                return False
            try:
                handler(frames)
            except Exception:  # a bug must cost one message, never the router
                self.stats["internal_errors"] += 1
                log.exception("internal error handling a message; message dropped")
        return True

    # -- frontend: clients ---------------------------------------------------------------------
    def _on_frontend(self, frames: list) -> None:
        client = frames[0]
        try:
            msg = protocol.decode(frames[1:], self._meta_cache)
        except FrameError as exc:
            self.stats["bad_frames_frontend"] += 1
            self._warn("bad-frame", "bad frame from client %r: %s", client, exc)
            self._reply_error(client, exc.req_id or 0, ProtocolError(str(exc), code=exc.code))
            return
        if msg.kind is Kind.REQUEST:
            self._on_request(client, msg, frames[2])
        elif msg.kind is Kind.STATUS:
            body = msgpack.packb(self.status(), use_bin_type=True)
            self._to_client(client, Kind.RESULT, msg.req_id, _EMPTY_META, body)
        elif msg.kind is Kind.CANCEL:
            self._on_cancel(client, msg.req_id)
        elif msg.kind is Kind.ADMIN:
            self._on_admin(client, msg.req_id, msg.meta)
        elif msg.kind is Kind.HEARTBEAT:
            # A client's ping: who am I, and which of the requests it waits for I do not
            # hold. FIFO per connection: whatever it sent before the ping is already here.
            held = msg.meta.get("held", ())
            unknown = [r for r in held if isinstance(r, int)
                       and (client, r) not in self._by_client] if isinstance(held, list) else []
            body = msgpack.packb({"router": self.instance, "unknown": unknown,
                                  "uptime": time.monotonic() - self.started})
            self._to_client(client, Kind.HEARTBEAT, msg.req_id, _EMPTY_META, body)
        else:
            self.stats["bad_frames_frontend"] += 1
            self._reply_error(client, msg.req_id, ProtocolError(
                f"message kind {msg.kind.name} is not sent by clients", code="bad-kind"))

    def _on_request(self, client: bytes, msg: protocol.Message, meta_frame: bytes) -> None:
        meta = msg.meta
        method = meta.get("method")
        if not isinstance(method, str) or not method:
            self._reply_error(client, msg.req_id, ProtocolError(
                "request meta needs 'method' (a non-empty string)", code="bad-meta"))
            return
        timeout = meta.get("timeout")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float))
                                    or not 0 < timeout <= MAX_TIMEOUT):
            self._reply_error(client, msg.req_id, ProtocolError(
                f"'timeout' must be a number of seconds in (0, {MAX_TIMEOUT}], got {timeout!r}",
                code="bad-meta"))
            return
        if not isinstance(meta.get("idempotent", False), bool):
            self._reply_error(client, msg.req_id, ProtocolError(
                f"'idempotent' must be true or false, got {meta['idempotent']!r}",
                code="bad-meta"))
            return
        priority = meta.get("priority", 0)
        if (isinstance(priority, bool) or not isinstance(priority, int)
                or not MIN_PRIORITY <= priority <= MAX_PRIORITY):
            self._reply_error(client, msg.req_id, ProtocolError(
                f"'priority' must be an integer in [{MIN_PRIORITY}, {MAX_PRIORITY}], "
                f"got {priority!r}", code="bad-meta"))
            return
        if (client, msg.req_id) in self._by_client:
            self._reply_error(client, msg.req_id, ProtocolError(
                f"request id {msg.req_id} is already in flight on this connection",
                code="duplicate-id"))
            return
        if self.draining:
            self._reply_error(client, msg.req_id, ServiceUnavailableError(
                "the pool is shutting down and admits no new requests"))
            return
        svc, why = self._resolve_service(meta.get("service"))
        if svc is None:
            self._reply_error(client, msg.req_id, ServiceUnavailableError(why))
            return
        if svc.methods and method not in svc.methods:
            self._reply_error(client, msg.req_id, UnknownMethodError(
                f"service {svc.name!r} has no method {method!r}; "
                f"it has: {', '.join(sorted(svc.methods))}"))
            return
        now = time.monotonic()
        conn = svc.pick()
        if conn is None and not svc.may_queue:
            victim = None
            if svc.settings.capacity_policy == "queue":
                victim = svc.eviction_candidate(priority)
            if victim is None:
                svc.rejected_backpressure += 1
                self._reply_error(client, msg.req_id, self._backpressure(svc))
                return
            # The queue is full of lower-priority work: the newest of it makes room.
            svc.rejected_backpressure += 1
            self._finish(victim, self._error_reply(self._backpressure(
                svc, "displaced from the full queue by higher-priority work")))
        rid = self._next_rid
        self._next_rid += 1
        deadline = now + timeout if timeout is not None else None
        idempotent = meta.get("idempotent")
        if idempotent is None:
            idempotent = svc.settings.idempotent
        rec = Record(rid, client, msg.req_id, svc.name, method, meta_frame, msg.body,
                     msg.buffers, deadline, now, priority, bool(idempotent))
        self.records[rid] = rec
        self._by_client[(client, msg.req_id)] = rec
        if deadline is not None:
            self._add_timer(deadline, rid, _DEADLINE)
        if conn is not None:
            self._dispatch(rec, conn)
        else:
            self._enqueue(svc, rec)

    def _enqueue(self, svc: Service, rec: Record) -> None:
        """Queue ``rec`` (new, or back after its worker died) with a fresh max_wait."""
        svc.enqueue(rec)
        if svc.settings.max_wait is not None:
            rec.wait_until = time.monotonic() + svc.settings.max_wait
            self._add_timer(rec.wait_until, rec.rid, _MAX_WAIT)

    def _add_timer(self, when: float, rid: int, kind: int) -> None:
        """Timers of answered requests are skipped when due, not removed: with long
        deadlines at a high rate they would pile up (rate x timeout entries). When they
        outnumber the live ones, keep only those still armed: amortized O(1) each."""
        timers = self._timers
        heapq.heappush(timers, (when, rid, kind))
        if len(timers) > 2 * len(self.records) + TIMER_SLACK:
            timers[:] = [t for t in timers if self._armed(t)]  # in place: loops hold it
            heapq.heapify(timers)

    def _armed(self, timer: tuple[float, int, int]) -> bool:
        when, rid, kind = timer
        rec = self.records.get(rid)
        if rec is None or rec.phase not in (Phase.QUEUED, Phase.RUNNING):
            return False
        return rec.deadline == when if kind == _DEADLINE else (
            rec.phase is Phase.QUEUED and rec.wait_until == when)

    def _backpressure(self, svc: Service, why: str = "") -> BackpressureError:
        s = svc.settings
        if not why:
            why = (f"{svc.queued} requests queued (queue_capacity {s.queue_capacity})"
                   if s.capacity_policy == "queue" else
                   "every worker is at max_inflight (capacity_policy 'reject')")
        return BackpressureError(f"service {svc.name!r} is overloaded: {why}",
                                 retry_after=svc.retry_after())

    def _resolve_service(self, name: object) -> tuple[Service | None, str]:
        if self._grace_until is not None and (
                (name is None and not self.services)
                or (isinstance(name, str) and name not in self.services)):
            # Just started (or restarted): its supervisors and workers have not all described
            # themselves yet. The request waits for them; _end_grace answers it otherwise.
            name = "default" if name is None else name
            if len(self.services) >= MAX_GRACE_SERVICES:
                return None, f"unknown service {name!r} (too many undescribed services)"
            try:
                ServiceConfig(name=name)
            except ValueError:
                return None, f"unknown service {name!r}; it is not a valid service name"
            return self._service(name), ""
        if name is None:
            if len(self.services) == 1:
                svc = next(iter(self.services.values()))
            elif "default" in self.services:
                svc = self.services["default"]
            elif not self.services:
                return None, "no workers are registered with this router"
            else:
                return None, ("request names no service and there is no 'default'; services: "
                              + ", ".join(sorted(self.services)))
        elif not isinstance(name, str):
            return None, f"'service' must be a string, got {type(name).__name__}"
        else:
            svc = self.services.get(name)
            if svc is None:
                known = ", ".join(sorted(self.services)) or "none"
                return None, f"unknown service {name!r}; services: {known}"
        if not svc.conns and not self._has_live_slots(svc.name):
            if self._grace_until is not None and not self._described(svc.name):
                return svc, ""  # named by an earlier request in the grace: wait as it does
            return None, f"service {svc.name!r} has no live workers (all failed or stopped)"
        return svc, ""

    def _described(self, service: str) -> bool:
        """Some supervisor or worker told this router about a slot of ``service``."""
        return any(s.service == service for s in self.slots.values())

    def _has_live_slots(self, service: str) -> bool:
        """Some worker of ``service`` is serving or expected back (starting, respawning)."""
        return any(s.service == service and s.state in _ALIVE for s in self.slots.values())

    def _on_admin(self, client: bytes, client_rid: int, meta: dict) -> None:
        """Operator commands on a worker slot, carried out by the supervisor that runs it."""
        op = meta.get("op")
        if op not in ADMIN_OPS:
            self._reply_error(client, client_rid, ProtocolError(
                f"unknown admin op {op!r}; ops: {', '.join(ADMIN_OPS)}", code="bad-meta"))
            return
        if op == "scale":
            self._on_scale(client, client_rid, meta)
            return
        slot_id = meta.get("worker")
        slot = self.slots.get(slot_id) if isinstance(slot_id, str) else None
        if slot is None:
            self._reply_error(client, client_rid, AdminError(
                f"no worker {slot_id!r}; workers: {', '.join(sorted(self.slots)) or 'none'}"))
            return
        owner = self._slot_owner.get(slot.id)
        if owner is None or owner not in self.supervisors:
            self._reply_error(client, client_rid, AdminError(
                f"worker {slot.id} has no supervisor connected to this router"))
            return
        if op == "drain":
            if slot.conn is None or slot.state is WorkerState.DRAINING:
                self._reply_error(client, client_rid, AdminError(
                    f"worker {slot.id} is {slot.state}: only a registered worker drains"))
                return
            # No new work from now on; what it holds finishes, then it is told to stop
            # (_check_worker_drains), and its supervisor will not respawn it.
            slot.transition(WorkerState.DRAINING)
            self._unroute(slot.conn)
        if op == "restart" and slot.conn is not None:
            slot.restart_pending = True  # its GOODBYE means "coming back", not "gone"
        self._send_backend(owner, Kind.ADMIN, {"op": op, "slot": slot.id})
        body = msgpack.packb({"op": op, "worker": slot.id, "state": str(slot.state),
                              "message": f"{op} of {slot.id} sent to its supervisor"})
        self._to_client(client, Kind.RESULT, client_rid, _EMPTY_META, body)

    def _on_cancel(self, client: bytes, client_rid: int) -> None:
        rec = self._by_client.get((client, client_rid))
        if rec is None:
            return  # already answered: cancel is idempotent and never replied to
        self.services[rec.service].cancelled += 1
        self._finish(rec, None)

    # -- dispatch ------------------------------------------------------------------------------------
    def _dispatch(self, rec: Record, conn: Conn) -> None:
        try:
            transport.send(self.backend, [conn.identity, protocol.pack_header(
                Kind.REQUEST, rec.rid), rec.meta_frame, rec.body, *rec.buffers], NOBLOCK)
        except zmq.ZMQError:
            # Unreachable: the process is gone and its death notice is still on its way.
            # The request never reached it, so it is safe to queue again, at the front.
            self.stats["dispatch_unroutable"] += 1
            self._quarantine(conn)
            svc = self.services[rec.service]
            self._enqueue(svc, rec)  # keeps its place: the queue orders by admission number
            self._pump(svc)  # another worker may have room now
            return
        rec.phase = Phase.RUNNING
        rec.conn = conn
        rec.dispatched_at = time.monotonic()
        if not conn.in_flight:
            conn.busy_since = rec.dispatched_at
        conn.in_flight[rec.rid] = rec
        conn.slot.refresh_busy()

    def _pump(self, svc: Service) -> None:
        """Move queued requests onto workers with room, in FIFO order."""
        while svc.queued:
            conn = svc.pick()
            if conn is None:
                return
            rec = svc.dequeue()
            if rec is None:
                return
            self._dispatch(rec, conn)

    # -- the one place a request ends ------------------------------------------------------------
    def _finish(self, rec: Record, reply: tuple | None, from_worker: bool = False) -> None:
        """Send ``rec``'s final reply (``(kind, meta, body, buffers)``; None: send nothing).

        A record still running on a worker stays attached to it as ORPHANED, holding its
        capacity until the worker's own reply arrives (then dropped and counted), and the
        worker is told to skip it. ``from_worker``: the reply is the worker's own, so the
        worker is done with it and the caller releases it.
        """
        if rec.phase in (Phase.DONE, Phase.ORPHANED):
            return
        self._by_client.pop((rec.client, rec.client_rid), None)
        if rec.phase is Phase.QUEUED:
            self.services[rec.service].forget_queued()
            rec.phase = Phase.DONE
            del self.records[rec.rid]
        elif rec.phase is Phase.RUNNING and not from_worker:
            rec.phase = Phase.ORPHANED
            # Best effort: a worker that has not started it yet skips it and answers at once.
            if rec.conn is not None and rec.conn.identity in self.conns:
                self._send_backend(rec.conn.identity, Kind.CANCEL, None, rec.rid)
        if reply is not None:
            kind, meta, body, buffers = reply
            self._to_client(rec.client, kind, rec.client_rid, meta, body, buffers)

    def _release(self, rec: Record) -> None:
        """The worker is done with ``rec`` (it replied or died): free its capacity."""
        conn = rec.conn
        if conn is not None:
            conn.in_flight.pop(rec.rid, None)
            conn.started.discard(rec.rid)
            conn.busy_since = time.monotonic()  # progress: the next one starts now
            conn.slot.refresh_busy()
        rec.phase = Phase.DONE
        self.records.pop(rec.rid, None)

    def _to_client(self, client: bytes, kind: Kind, client_rid: int, meta: bytes, body: bytes,
                   buffers: Iterable = ()) -> None:
        try:
            transport.send(self.frontend, [client, protocol.pack_header(kind, client_rid), meta,
                                           body, *buffers], NOBLOCK)
        except zmq.ZMQError:
            # The client disconnected (EHOSTUNREACH) or stopped reading (EAGAIN).
            self.stats["unroutable_replies"] += 1

    def _reply_error(self, client: bytes, client_rid: int, err: WorkerPoolError) -> None:
        self._to_client(client, Kind.ERROR, client_rid, _EMPTY_META, _err_body(err))

    def _error_reply(self, err: WorkerPoolError) -> tuple:
        return (Kind.ERROR, _EMPTY_META, _err_body(err), ())

    # -- backend: workers and supervisors ------------------------------------------------------------
    def _on_backend(self, frames: list) -> None:
        ident = frames[0]
        try:
            if len(frames) < 4:
                raise FrameError("too-few-frames", f"{len(frames) - 1} frames, expected >= 3")
            kind, rid = protocol.unpack_header(frames[1])
        except FrameError as exc:
            self.stats["bad_frames_backend"] += 1
            self._warn("bad-backend", "dropped bad frame from backend peer %r: %s", ident, exc)
            return
        if kind in REPLY_KINDS:
            conn = self.conns.get(ident)
            if conn is None:
                self.stats["replies_from_unknown_worker"] += 1
                return
            self._on_worker_reply(conn, kind, rid, frames[2], frames[3], frames[4:])
            return
        try:
            meta = protocol.unpack_meta(frames[2], rid)
        except FrameError as exc:
            self.stats["bad_frames_backend"] += 1
            self._warn("bad-backend", "dropped bad meta from backend peer %r: %s", ident, exc)
            return
        handler = self._backend_handlers.get(kind)
        if handler is None:
            self.stats["bad_frames_backend"] += 1
            self._warn("bad-backend", "backend peer %r sent %s, which it must not", ident, kind.name)
            return
        try:
            handler(self, ident, meta)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.stats["bad_frames_backend"] += 1
            self._warn("bad-backend", "bad %s from %r: %r", kind.name, ident, exc)
        except IllegalTransition as exc:
            self.stats["illegal_transitions"] += 1
            self._warn("transition", "%s", exc)

    def _on_worker_reply(self, conn: Conn, kind: Kind, rid: int, meta: bytes, body: bytes,
                         buffers: list) -> None:
        rec = conn.in_flight.get(rid)
        if rec is None:
            self.stats["late_replies"] += 1
            return
        if rec.phase is Phase.ORPHANED:  # already answered (timeout/cancel): drop, free capacity
            if kind in FINAL_REPLY_KINDS:
                self.stats["late_replies"] += 1
                svc = self.services[rec.service]
                svc.late_results += 1
                self._release(rec)
                self._pump(svc)
            return
        if kind is Kind.PARTIAL:
            rec.streamed = True
            self._to_client(rec.client, kind, rec.client_rid, meta, body, buffers)
            return
        slot = conn.slot
        svc = self.services[rec.service]
        if kind is Kind.ERROR:
            slot.errored += 1
            svc.errored += 1
        else:
            slot.completed += 1
            svc.completed += 1
        now = time.monotonic()
        svc.observe(now - rec.dispatched_at, rec.dispatched_at - rec.admitted_at)
        self._finish(rec, (kind, meta, body, buffers), from_worker=True)
        self._release(rec)
        self._pump(svc)

    def _on_ready(self, ident: bytes, meta: dict) -> None:
        slot_id = str(meta["slot"])
        incarnation = int(meta["incarnation"])
        service = str(meta["service"])
        capacity = int(meta["capacity"])
        if capacity < 1:
            raise ValueError(f"capacity {capacity} < 1")
        owner = self._slot_owner.get(slot_id)
        if owner in self._draining_sups or owner in self._departed:
            self._send_backend(ident, Kind.SHUTDOWN)  # its supervisor is leaving or left
            return
        slot = self._slot(slot_id, service, str(meta.get("device", "?")))
        if incarnation < slot.incarnation:
            self.stats["stale_ready"] += 1
            self._send_backend(ident, Kind.SHUTDOWN)
            return
        if ident in self.conns:
            return  # the same process registering twice (it was asked to): nothing changes
        if slot.conn is not None and slot.conn.identity != ident:
            self._lose_conn(slot.conn, f"replaced by incarnation {incarnation}")
        if slot.retiring:
            self._send_backend(ident, Kind.SHUTDOWN)  # scaled away while it was starting
            return
        svc = self._service(service)
        conn = Conn(ident, slot, incarnation, int(meta["pid"]), capacity,
                    frozenset(str(m) for m in meta.get("methods", ())))
        conn.capacity = svc.capacity_for(capacity)
        self._tell_capacity(conn)
        target = self._active_target(service)
        spare = target is not None and len(svc.conns) >= target
        slot.transition(WorkerState.SPARE if spare else WorkerState.READY)
        slot.incarnation = incarnation
        slot.pid = conn.pid
        slot.device = str(meta.get("device", slot.device))
        slot.restarts = max(slot.restarts, incarnation - 1)
        slot.ready_at = time.monotonic()
        slot.setup_error = None
        slot.leave_reason = None
        slot.conn = conn
        self.conns[ident] = conn
        self._unknown_beats.pop(ident, None)
        if not spare:
            svc.add_conn(conn)
        log.info("worker %s registered (pid %s, %s, incarnation %d)%s", slot_id, conn.pid,
                 slot.device, incarnation, " as a spare" if spare else "")
        owner = self._slot_owner.get(slot_id)
        if owner is not None:  # tell its supervisor: it reports readiness and recovery time
            self._send_backend(owner, Kind.READY, {"slot": slot_id, "incarnation": incarnation})
        self._pump(svc)

    def _on_goodbye(self, ident: bytes, meta: dict) -> None:
        conn = self.conns.get(ident)
        reason = str(meta.get("reason", "left"))
        if conn is None:
            # A worker whose setup failed leaves before it ever registered (perhaps even
            # before its supervisor's HELLO arrived: the GOODBYE names its slot itself).
            if reason == "setup-failed" and isinstance(meta.get("slot"), str):
                slot = self._slot(meta["slot"], str(meta.get("service", "default")), "?")
                slot.setup_error = str(meta.get("error", reason))[-4000:]
                slot.last_error = slot.setup_error
            return
        if reason == "context-poisoned":
            # It is exiting on purpose to be replaced: what it still held is answered as a
            # crash, and the slot waits for its respawn.
            error = str(meta.get("error", reason))
            conn.slot.leave_reason = f"CUDA context poisoned: {error}"[-4000:]
            # The request that poisoned it was answered by the worker itself; whatever it
            # still held never started.
            self._lose_conn(conn, "left with a poisoned CUDA context", running=False)
            conn.slot.transition(WorkerState.DEAD)
            return
        slot = conn.slot
        # Set the state first: losing the conn checks whether the service is still alive.
        if slot.restart_pending:  # an operator's restart: a replacement is on its way
            slot.restart_pending = False
            slot.transition(WorkerState.RESTARTING)
        else:
            slot.transition(WorkerState.STOPPED)
        self._lose_conn(conn, reason, crashed=False)

    def _on_hello(self, ident: bytes, meta: dict) -> None:
        services = list(meta.get("services", ()))
        slots = [(str(s["slot"]), str(s["service"]), str(s.get("device", "?")))
                 for s in meta.get("slots", ())]
        for s in services:  # all or nothing: check every service before applying any
            ServiceConfig.model_validate(
                {k: v for k, v in s.items() if k in ROUTED_FIELDS} | {"name": str(s["name"])})
            for key in ("workers", "spares"):
                if key in s:
                    _count(s[key])
        self.supervisors[ident] = {"pid": meta.get("pid"), "host": meta.get("host"),
                                   "seen": time.monotonic()}
        self._departed.discard(ident)
        if ident in self._lost:
            self._lost.discard(ident)
            log.warning("supervisor %r, declared lost, is back: taking its workers back", ident)
        for s in services:
            self._service(str(s["name"]), s)
            if "workers" in s:
                self._targets.setdefault(str(s["name"]), {})[ident] = (
                    _count(s["workers"]), _count(s.get("spares", 0)))
        for slot_id, service, device in slots:
            slot = self._slot(slot_id, service, device)
            self._slot_owner[slot.id] = ident
            if slot.conn is not None:  # its worker registered before our HELLO arrived
                self._send_backend(ident, Kind.READY,
                                   {"slot": slot.id, "incarnation": slot.conn.incarnation})
        for s in services:
            self._rebalance(self.services[str(s["name"])])
        if self.draining:
            self._send_backend(ident, Kind.DRAINED)

    def _on_slot(self, ident: bytes, meta: dict) -> None:
        """A supervisor reports a slot's process event: started, died or failed."""
        slot = self._slot(str(meta["slot"]), str(meta["service"]), str(meta.get("device", "?")))
        incarnation = int(meta["incarnation"])
        event = meta["event"]
        if incarnation < slot.incarnation:
            self.stats["stale_slot_events"] += 1
            return
        if event == "started":
            if incarnation > slot.incarnation:
                slot.incarnation = incarnation
                slot.pid = meta.get("pid")
                slot.transition(WorkerState.RESTARTING if incarnation > 1 else WorkerState.STARTING)
        elif event == "died":
            # The supervisor's socket can overtake the worker's: its last replies may still
            # be queued behind. Act after TIMINGS.death_grace and another read of the backend.
            self._deaths.append((time.monotonic() + TIMINGS.death_grace, slot, incarnation,
                                 str(meta.get("reason", "died"))))
        elif event == "failed":
            reason = str(meta.get("reason", "failed"))
            if slot.conn is not None:
                self._lose_conn(slot.conn, reason)
            # Keep the traceback its GOODBYE carried: it says *why* setup() failed.
            detail = slot.setup_error if slot.setup_error else ""
            slot.last_error = f"{reason}\n{detail}".strip()[-4000:]
            slot.transition(WorkerState.FAILED)
            self._fail_if_unservable(self.services.get(slot.service))
        elif event == "stopped":
            slot.transition(WorkerState.STOPPED)
            if slot.conn is not None:
                self._lose_conn(slot.conn, "stopped", crashed=False)
            self._fail_if_unservable(self.services.get(slot.service))
        elif event == "removed":
            # Scaled away: its process is gone (normally after draining). Its row goes too.
            if slot.conn is not None:
                self._lose_conn(slot.conn, str(meta.get("reason", "was scaled away")),
                                crashed=meta.get("exitcode") != 0)
            self.slots.pop(slot.id, None)
            if self._slot_owner.get(slot.id) == ident:
                del self._slot_owner[slot.id]
            self._fail_if_unservable(self.services.get(slot.service))
        else:
            raise ValueError(f"unknown slot event {event!r}")

    def _apply_deaths(self) -> None:
        now = time.monotonic()
        due = [d for d in self._deaths if d[0] <= now]
        if not due:
            return
        self._drain_socket(self.backend, self._on_backend)  # the dead worker's last words
        self._deaths = [d for d in self._deaths if d[0] > now]
        for _, slot, incarnation, reason in due:
            conn = slot.conn
            if conn is not None and conn.incarnation == incarnation:
                self._lose_conn(conn, reason)
            if incarnation != slot.incarnation or slot.state in (WorkerState.FAILED,
                                                                 WorkerState.STOPPED):
                continue  # a newer incarnation registered, or the slot's fate is settled
            # Why it left, if it (or we) said so before it died, then how; once each.
            why = slot.leave_reason
            slot.last_error = f"{why}; {reason}" if why and why[-40:] not in reason else reason
            slot.leave_reason = None
            slot.transition(WorkerState.DEAD)

    def _on_drain(self, ident: bytes, meta: dict) -> None:
        """scope "router": the whole pool stops (``up``). scope "supervisor": only that
        supervisor's workers leave; the router and other supervisors keep serving."""
        if meta.get("scope", "router") == "router":
            self.begin_drain(f"requested by supervisor {ident!r}")
            return
        if ident in self._draining_sups:
            return
        self._draining_sups[ident] = time.monotonic() + self.config.drain_timeout
        for conn in self._conns_of(ident):
            self._unroute(conn)  # no new work; what it holds finishes
        log.info("supervisor %r is leaving: draining its workers", ident)

    def _conns_of(self, ident: bytes) -> list[Conn]:
        return [slot.conn for slot_id, owner in self._slot_owner.items()
                if owner == ident and (slot := self.slots.get(slot_id)) and slot.conn]

    def _check_supervisor_drains(self) -> None:
        now = time.monotonic()
        for ident, deadline in list(self._draining_sups.items()):
            conns = self._conns_of(ident)
            running = [r for c in conns for r in c.in_flight.values() if r.phase is Phase.RUNNING]
            if running and now < deadline:
                continue
            for rec in running:
                self._finish(rec, self._error_reply(ServiceUnavailableError(
                    "the worker's supervisor left before this request finished (drain_timeout)")))
            for conn in conns:
                self._send_backend(conn.identity, Kind.SHUTDOWN)
            self._send_backend(ident, Kind.DRAINED)
            del self._draining_sups[ident]
            self._forget_supervisor(ident, "its supervisor left")

    def _forget_supervisor(self, ident: bytes, reason: str) -> None:
        """A supervisor left on purpose: its slots leave the table with it (a worker of
        its that registers late is told to stop), and admin commands no longer go to it."""
        self.supervisors.pop(ident, None)
        self._departed.add(ident)
        for slot_id, owner in list(self._slot_owner.items()):
            if owner != ident:
                continue
            slot = self.slots.pop(slot_id, None)  # the owner entry stays: see _on_ready
            if slot is not None and slot.conn is not None:
                self._lose_conn(slot.conn, reason, crashed=False)
        self._drop_targets(ident)
        for svc in self.services.values():
            self._fail_if_unservable(svc)

    def _on_heartbeat(self, ident: bytes, meta: dict) -> None:
        """A worker's heartbeat thread (``of`` names its main socket) or a supervisor.
        Pings are answered with their token; pongs never are (no ping-pong loops)."""
        now = time.monotonic()
        of = meta.get("of")
        if isinstance(of, bytes):
            conn = self.conns.get(of)
            if conn is not None:
                conn.last_beat = now
                mem = meta.get("mem")
                if isinstance(mem, dict):  # shown as is in status: keep only well-formed
                    conn.memory = {k: v for k, v in list(mem.items())[:8]
                                   if isinstance(k, str) and type(v) is int}
            elif of not in self._unknown_beats:
                # Its heartbeat socket may simply have overtaken its READY: wait one beat.
                self._unknown_beats[of] = now
            else:
                # Still unknown a beat later: this router restarted and never saw its READY.
                # Ask it, on its heartbeat socket, to register again.
                self._unknown_beats[of] = now
                self._send_backend(ident, Kind.HEARTBEAT, {"register": True,
                                                           "router": self.instance})
            return  # otherwise worker heartbeats are one-way
        if ident in self.supervisors:
            self.supervisors[ident]["seen"] = now
        if "ping" in meta:
            pong = {"pong": meta["ping"], "router": self.instance}
            if ident in self._lost:
                pong["hello"] = True  # its host is back: have it describe itself again
            self._send_backend(ident, Kind.HEARTBEAT, pong)

    def _on_started(self, ident: bytes, meta: dict) -> None:
        """A worker runs several of its requests at once (a batch): if it dies now, each of
        them was running, not only the oldest."""
        conn = self.conns.get(ident)
        if conn is None:
            return
        ids = meta["ids"]
        if not isinstance(ids, list) or not all(type(rid) is int for rid in ids):
            raise TypeError(f"STARTED ids must be a list of request ids, not {ids!r:.80}")
        conn.started.update(rid for rid in ids if rid in conn.in_flight)

    def _check_liveness(self) -> None:
        """Hung workers and vanished supervisors: what no death notice can reveal."""
        now = time.monotonic()
        if now < self._next_liveness:
            return
        self._next_liveness = now + TIMINGS.liveness_tick
        limit = self.config.heartbeat_interval * self.config.heartbeat_liveness
        for ident, seen in list(self._unknown_beats.items()):
            if now - seen > limit:  # it stopped beating without ever registering: gone
                del self._unknown_beats[ident]
        for ident, sup in list(self.supervisors.items()):
            if now - sup["seen"] > limit:
                self._supervisor_lost(ident, now - sup["seen"])
        for conn in list(self.conns.values()):
            if conn.kill_sent is not None:
                if now - conn.kill_sent > TIMINGS.kill_grace:  # no death notice came: answer anyway
                    why = conn.slot.leave_reason or "hung"
                    conn.slot.last_error = f"{why}; no death notice came: declared dead"
                    conn.slot.leave_reason = None
                    self._lose_conn(conn, f"was declared dead ({why})")
                    conn.slot.transition(WorkerState.DEAD)
                continue
            silent = now - conn.last_beat
            if silent > limit:
                self._kill(conn, f"sent no heartbeat for {silent:.1f}s (stopped, or stuck "
                                 "holding the GIL)")
                continue
            svc = self.services.get(conn.slot.service)
            cap = svc.settings.exec_timeout if svc is not None else None
            if cap and conn.in_flight and now - conn.busy_since > cap:
                # The oldest is running, and so is every request of a batch (STARTED).
                running = [min(conn.in_flight.values(), key=lambda r: r.dispatched_at),
                           *(conn.in_flight[r] for r in conn.started if r in conn.in_flight)]
                why = f"ran longer than exec_timeout={cap:g}s"
                for rec in dict.fromkeys(running):
                    if rec.phase is Phase.RUNNING:
                        if svc is not None:
                            svc.expired += 1
                        self._finish(rec, self._error_reply(RequestTimeoutError(
                            f"the request {why} on worker {conn.slot.id}; the worker is being "
                            "replaced", worker=conn.slot.id)))
                self._kill(conn, f"a request {why}")

    def _check_worker_drains(self) -> None:
        """A draining worker that holds nothing any more is told to stop."""
        for conn in list(self.conns.values()):
            if conn.slot.state is WorkerState.DRAINING and not conn.in_flight \
                    and conn.kill_sent is None:
                conn.kill_sent = time.monotonic()  # asked once; TIMINGS.kill_grace bounds the wait
                conn.slot.leave_reason = "drained"
                self._send_backend(conn.identity, Kind.SHUTDOWN)

    def _kill(self, conn: Conn, reason: str) -> None:
        """Have a hung worker killed (SIGKILL by its supervisor); its death then answers
        what it held. No supervisor to ask: it is declared dead here and now."""
        slot = conn.slot
        log.warning("worker %s (pid %s) %s: killing it", slot.id, conn.pid, reason)
        self.stats["hung_workers_killed"] += 1
        slot.leave_reason = f"hung: {reason}"
        self._unroute(conn)  # no new work for it; a spare, if any, takes its place
        owner = self._slot_owner.get(slot.id)
        if owner in self.supervisors:
            conn.kill_sent = time.monotonic()
            self._send_backend(owner, Kind.ADMIN, {"op": "kill", "slot": slot.id,
                                                   "incarnation": conn.incarnation,
                                                   "reason": reason})
        else:
            slot.last_error = f"hung: {reason}"
            self._lose_conn(conn, f"was declared dead: {reason}")
            slot.transition(WorkerState.DEAD)

    def _supervisor_lost(self, ident: bytes, silent: float) -> None:
        """A supervisor stopped answering: its host is gone or cut off. Its workers cannot
        be reached or respawned from here: answer what they held and mark them failed."""
        log.error("supervisor %r silent for %.1fs: its workers are lost", ident, silent)
        self.stats["supervisors_lost"] += 1
        del self.supervisors[ident]
        self._lost.add(ident)
        for slot_id, owner in list(self._slot_owner.items()):
            if owner != ident:
                continue
            slot = self.slots.get(slot_id)
            if slot is None:
                continue
            reason = f"its supervisor was silent for {silent:.1f}s (host lost?)"
            if slot.conn is not None:
                self._lose_conn(slot.conn, reason)
            slot.last_error = reason
            if slot.state is not WorkerState.STOPPED:
                slot.transition(WorkerState.FAILED)
            self._fail_if_unservable(self.services.get(slot.service))
        self._drop_targets(ident)

    _backend_handlers = {
        Kind.READY: _on_ready,
        Kind.GOODBYE: _on_goodbye,
        Kind.HELLO: _on_hello,
        Kind.SLOT: _on_slot,
        Kind.DRAIN: _on_drain,
        Kind.HEARTBEAT: _on_heartbeat,
        Kind.STARTED: _on_started,
    }

    def _quarantine(self, conn: Conn) -> None:
        """The worker's socket is gone but its death notice has not arrived yet.

        Stop dispatching to it at once; give the supervisor TIMINGS.unreachable_grace to say how it
        died (so its requests are answered with the real cause, e.g. SIGSEGV), then answer
        them anyway: a remote supervisor may be gone too.
        """
        self._unroute(conn)
        if conn.identity not in self._unreachable:
            self._unreachable[conn.identity] = time.monotonic() + TIMINGS.unreachable_grace

    def _lose_conn(self, conn: Conn, reason: str, crashed: bool = True,
                   running: bool = True) -> None:
        """An incarnation is gone: answer everything it held, then forget it."""
        slot = conn.slot
        self.conns.pop(conn.identity, None)
        self._unreachable.pop(conn.identity, None)
        if slot.conn is conn:
            slot.conn = None
        # Before its requests are requeued: a spare promoted now takes them at once.
        self._unroute(conn)
        svc = self.services.get(slot.service)
        # A worker runs what it holds in dispatch order: only the oldest had started, and the
        # batch it said it started (STARTED). The rest never ran, so they go back to the
        # queue whatever their idempotency.
        held = sorted(conn.in_flight.values(), key=lambda r: r.dispatched_at)
        started = {held[0].rid} | conn.started if crashed and running and held else set()
        requeued = False
        for rec in held:
            if rec.phase is not Phase.RUNNING:  # its client was already answered
                self._release(rec)
                continue
            if rec.rid in started:
                rec.starts += 1
                outcome = self._after_crash(rec, svc, slot, conn, reason)
                if outcome is not None:
                    slot.errored += 1
                    if svc is not None:
                        svc.errored += 1
                    self.stats["crashed_requests"] += 1
                    self._finish(rec, self._error_reply(outcome))
                    self._release(rec)
                    continue
            conn.in_flight.pop(rec.rid, None)
            rec.conn = None
            if svc is None:
                self._finish(rec, self._error_reply(WorkerCrashedError(
                    f"worker {slot.id} {reason}", worker=slot.id)))
                self.records.pop(rec.rid, None)
                continue
            if rec.rid in started and svc is not None:
                svc.retried += 1
            self._enqueue(svc, rec)
            requeued = True
        if svc is not None:
            if requeued:
                self._pump(svc)
            self._fail_if_unservable(svc)

    def _after_crash(self, rec: Record, svc: Service | None, slot: Slot, conn: Conn,
                     reason: str) -> WorkerPoolError | None:
        """The error for a request whose worker died running it, or None to run it again."""
        s = svc.settings if svc is not None else None
        where = f"worker {slot.id} (pid {conn.pid}) {reason} while running this request"
        if s is not None and rec.starts >= s.poison_threshold:
            svc.poisoned += 1
            return PoisonedRequestError(
                f"{where}; it has now killed {rec.starts} workers "
                f"(poison_threshold={s.poison_threshold}) and will not be retried",
                worker=slot.id, retryable=False)
        if (s is not None and rec.idempotent and not rec.streamed
                and rec.starts < s.max_attempts):
            return None
        why = ("" if not rec.idempotent else
               "; partial replies were already sent" if rec.streamed else
               f"; it was started {rec.starts} times (max_attempts)")
        return WorkerCrashedError(where + why, worker=slot.id)

    # -- spares and scaling --------------------------------------------------------------------
    def _unroute(self, conn: Conn) -> None:
        """Send ``conn`` no new work (it died, hangs, drains or leaves); a spare takes its
        place if its service has one. The one way a worker leaves its service's rotation."""
        svc = self.services.get(conn.slot.service)
        if svc is not None and conn in svc.conns:
            svc.remove_conn(conn)
            self._rebalance(svc)

    def _active_target(self, service: str) -> int | None:
        """How many workers of ``service`` serve, or None (no spares: every one serves)."""
        per = self._targets.get(service)
        if not per or not any(spares for _, spares in per.values()):
            return None
        return sum(workers for workers, _ in per.values())

    def _rebalance(self, svc: Service) -> None:
        """Promote spares while ``svc`` serves from fewer workers than its target; hold
        back idle ones while it has more (a router that restarted saw them all register)."""
        target = self._active_target(svc.name)
        spares = sorted((s for s in self.slots.values()
                         if s.service == svc.name and s.state is WorkerState.SPARE
                         and s.conn is not None
                         and self._slot_owner.get(s.id) not in self._draining_sups),
                        key=lambda s: s.sort_key)
        promoted = False
        for slot in spares:
            if target is not None and len(svc.conns) >= target:
                break
            slot.transition(WorkerState.READY)
            svc.add_conn(slot.conn)
            self.stats["spares_promoted"] += 1
            promoted = True
            log.info("spare %s (pid %s) now serves %s", slot.id, slot.pid, svc.name)
        if target is not None and len(svc.conns) > target:
            for conn in sorted((c for c in svc.conns if not c.in_flight),
                               key=lambda c: c.slot.sort_key, reverse=True):
                if len(svc.conns) <= target:
                    break
                svc.remove_conn(conn)
                conn.slot.transition(WorkerState.SPARE)
        if promoted:
            self._pump(svc)

    def _drop_targets(self, ident: bytes) -> None:
        for service, per in self._targets.items():
            if per.pop(ident, None) is not None and service in self.services:
                self._rebalance(self.services[service])

    def _on_scale(self, client: bytes, client_rid: int, meta: dict) -> None:
        """Change how many workers serve a service. Up: spares are promoted at once and the
        supervisor starts the rest. Down: the idlest workers drain, then leave for good."""
        name, workers = meta.get("service"), meta.get("workers")
        svc = self.services.get(name) if isinstance(name, str) else None
        if svc is None:
            self._reply_error(client, client_rid, AdminError(
                f"no service {name!r}; services: {', '.join(sorted(self.services)) or 'none'}"))
            return
        try:
            _count(workers)
        except ValueError:
            self._reply_error(client, client_rid, AdminError(
                f"workers must be an integer in 0..{MAX_WORKERS}, got {workers!r}"))
            return
        owners = sorted(i for i in self._targets.get(name, {})
                        if i in self.supervisors and i not in self._draining_sups)
        if not owners:
            self._reply_error(client, client_rid, AdminError(
                f"service {name!r} has no supervisor connected to this router"))
            return
        try:
            plan = self._scale_plan(name, owners, workers)
        except ValueError as exc:
            self._reply_error(client, client_rid, AdminError(str(exc)))
            return
        current = sum(self._targets[name][o][0] for o in owners)
        retire = [slot for _, slots in plan.values() for slot in slots]
        for owner, (count, _) in plan.items():
            self._targets[name][owner] = (count, self._targets[name][owner][1])
        for slot in retire:
            slot.retiring = True
            if slot.conn is not None and slot.state is not WorkerState.DRAINING:
                slot.transition(WorkerState.DRAINING)  # finishes what it holds, then stops
                svc.remove_conn(slot.conn)
        self._rebalance(svc)
        for owner, (count, slots) in plan.items():
            self._send_backend(owner, Kind.ADMIN, {"op": "scale", "service": name,
                                                   "workers": count,
                                                   "retire": [s.id for s in slots]})
        ids = [s.id for s in retire]
        split = {o.decode(errors="replace"): count for o, (count, _) in plan.items()}
        log.info("scaling %s from %d to %d workers%s", name, current, workers,
                 f"; retiring {', '.join(ids)}" if ids else "")
        message = (f"{name}: {current} -> {workers} workers"
                   + (f" ({', '.join(f'{o}: {n}' for o, n in split.items())})"
                      if len(split) > 1 else "")
                   + (f"; retiring {', '.join(ids)} (they finish what they hold)" if ids else ""))
        body = msgpack.packb({"op": "scale", "service": name, "workers": workers,
                              "previous": current, "retire": ids, "supervisors": split,
                              "message": message})
        self._to_client(client, Kind.RESULT, client_rid, _EMPTY_META, body)

    def _scale_plan(self, name: str, owners: list[bytes],
                    workers: int) -> dict[bytes, tuple[int, list[Slot]]]:
        """Split ``workers`` over the supervisors running ``name``: each supervisor's new
        count and the slots it retires. Workers are added where there are fewest, and taken
        where there are most (ties: where it stops the least), so hosts stay even; a
        supervisor that keeps spares keeps one worker. Raises ValueError when ``workers``
        cannot be met."""
        counts = {o: self._targets[name][o][0] for o in owners}
        spares = {o: self._targets[name][o][1] for o in owners}
        floor = {o: 1 if spares[o] else 0 for o in owners}
        held = sum(floor.values())
        if workers < held:
            if held == 1:
                raise ValueError(f"service {name!r} keeps {max(spares.values())} spares: it "
                                 "needs at least one worker")
            raise ValueError(f"service {name!r} keeps spares on {held} supervisors: it needs "
                             f"at least {held} workers")
        # Each supervisor keeps (its count + its spares) slots: the router must name the ones
        # above that to retire. The cheapest to lose first: not running, then serving ones
        # holding the fewest requests, then spares (a spare may sit on any supervisor, since
        # promotion ignores hosts), ties to the highest id.
        def cost(slot: Slot) -> tuple[int, int]:
            if slot.conn is None:
                return 0, 0
            return (2, 0) if slot.state is WorkerState.SPARE else (1, len(slot.conn.in_flight))

        candidates: dict[bytes, list[Slot]] = {o: [] for o in owners}
        for slot in sorted(self.slots.values(), key=lambda s: s.sort_key, reverse=True):
            owner = self._slot_owner.get(slot.id)
            if slot.service == name and owner in candidates and not slot.retiring:
                candidates[owner].append(slot)
        for mine in candidates.values():
            mine.sort(key=cost)

        def excess(o: bytes, count: int) -> int:
            return max(0, len(candidates[o]) - count - spares[o])

        def loss(o: bytes) -> tuple[int, ...]:
            """What one worker fewer on ``o`` stops: nothing (it runs fewer slots than its
            count), else its next slot in cost order."""
            k = excess(o, counts[o] - 1)
            return (0,) if k == 0 else (1, *cost(candidates[o][k - 1]))

        while sum(counts.values()) < workers:
            counts[min(owners, key=lambda o: counts[o])] += 1
        while sum(counts.values()) > workers:
            owner = max((o for o in owners if counts[o] > floor[o]),
                        key=lambda o: (counts[o], tuple(-x for x in loss(o))))
            counts[owner] -= 1
        retire = {o: candidates[o][:excess(o, counts[o])] for o in owners}
        return {o: (counts[o], retire[o]) for o in owners}

    def _fail_if_unservable(self, svc: Service | None) -> None:
        """Queued requests of a service that has no live worker left would wait forever."""
        if svc is None or not svc.queued or svc.conns or self._has_live_slots(svc.name):
            return
        if not self._described(svc.name):
            if self._grace_until is not None:
                return  # nobody described it yet: its workers may still register
            known = ", ".join(sorted(n for n in self.services
                                     if n != svc.name and self._described(n)))
            why = (f"unknown service {svc.name!r}; services: {known or 'none'} (no worker of "
                   f"it registered within registration_grace={self.config.registration_grace:g}s "
                   "of the router starting)")
        else:
            why = f"service {svc.name!r} has no live workers (all failed or stopped)"
        for rec in svc.queued_records():
            self._finish(rec, self._error_reply(ServiceUnavailableError(why)))

    def _end_grace(self) -> None:
        """Registration grace is over: what still waits for an undescribed service fails."""
        self._grace_until = None
        for svc in list(self.services.values()):
            self._fail_if_unservable(svc)
            if not svc.queued and not self._described(svc.name):
                del self.services[svc.name]  # only a request named it: forget it again

    def _slot(self, slot_id: str, service: str, device: str) -> Slot:
        slot = self.slots.get(slot_id)
        if slot is None:
            slot = self.slots[slot_id] = Slot(slot_id, service, device)
            self._service(service)
        elif device != "?":
            slot.device = device
        return slot

    def _service(self, name: str, config: dict | None = None) -> Service:
        """The service ``name``, created with router defaults if new. ``config`` (from a
        HELLO) applies once: to a new service, or to one a READY created before the
        HELLO arrived; the first supervisor to describe a service wins."""
        svc = self.services.get(name)
        if svc is not None and (config is None or svc.configured):
            return svc
        cfg = {**self._defaults, **(config or {})}
        # Re-validated with the same model the supervisor used: a bad HELLO is refused.
        checked = ServiceConfig.model_validate({k: cfg[k] for k in ROUTED_FIELDS if k in cfg})
        settings = ServiceSettings(**{k: getattr(checked, k) for k in ROUTED_FIELDS})
        if svc is None:
            svc = self.services[name] = Service(name, settings)
        else:
            svc.configure(settings)
            for conn in self.conns.values():  # spares too: they are not in svc.conns
                if conn.slot.service == name:
                    conn.capacity = svc.capacity_for(conn.declared)
                    self._tell_capacity(conn)
        svc.configured = config is not None
        return svc

    def _tell_capacity(self, conn: Conn) -> None:
        """A worker batches from what it holds and flushes early once it holds its capacity,
        so it must know when the service's max_inflight caps it below what it declared."""
        if conn.capacity != conn.told:
            conn.told = conn.capacity
            self._send_backend(conn.identity, Kind.READY, {"capacity": conn.capacity})

    def _send_backend(self, ident: bytes, kind: Kind, meta: dict | None = None,
                      req_id: int = 0) -> None:
        try:
            transport.send(self.backend, [ident, *protocol.encode(kind, req_id, meta)], NOBLOCK)
        except zmq.ZMQError:
            self.stats["unroutable_backend"] += 1

    # -- timers ------------------------------------------------------------------------------------
    def _run_timers(self) -> None:
        now = time.monotonic()
        if self._grace_until is not None and now >= self._grace_until:
            self._end_grace()
        for ident, deadline in list(self._unreachable.items()):
            conn = self.conns.get(ident)
            if conn is None:
                del self._unreachable[ident]
            elif deadline <= now:
                self._lose_conn(conn, "disconnected (no death notice from its supervisor)")
                conn.slot.last_error = "disconnected (no death notice from its supervisor)"
                conn.slot.transition(WorkerState.DEAD)
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, rid, kind = heapq.heappop(timers)
            rec = self.records.get(rid)
            if rec is None or rec.phase not in (Phase.QUEUED, Phase.RUNNING):
                continue
            svc = self.services[rec.service]
            if kind == _MAX_WAIT:
                # Waited max_wait (this stay in the queue) without a worker: shed it.
                if rec.phase is Phase.QUEUED and rec.wait_until == when:
                    svc.rejected_backpressure += 1
                    self._finish(rec, self._error_reply(self._backpressure(
                        svc, f"waited max_wait={svc.settings.max_wait}s in the queue")))
                continue
            if rec.deadline != when:
                continue
            svc.expired += 1
            where = "in the queue" if rec.phase is Phase.QUEUED else f"on worker {rec.conn.slot.id}"
            self._finish(rec, self._error_reply(RequestTimeoutError(
                f"deadline passed after {now - rec.admitted_at:.3f}s {where}",
                worker=rec.conn.slot.id if rec.conn else None)))

    # -- shutdown ------------------------------------------------------------------------------------
    def begin_drain(self, why: str = "") -> None:
        """Stop admitting; finish what was admitted; then stop workers and exit."""
        if self.draining:
            return
        log.info("draining (%s): %d requests to finish", why, self._live_records())
        self.draining = True
        self._drain_deadline = time.monotonic() + self.config.drain_timeout

    def _live_records(self) -> int:
        return sum(1 for r in self.records.values() if r.phase in (Phase.QUEUED, Phase.RUNNING))

    def _check_drained(self) -> None:
        if self._drained:
            return
        if self._live_records() and time.monotonic() < self._drain_deadline:
            return
        for rec in list(self.records.values()):
            self._finish(rec, self._error_reply(ServiceUnavailableError(
                "the pool shut down before this request finished (drain_timeout)")))
        for ident in list(self.conns):
            self._send_backend(ident, Kind.SHUTDOWN)
        for ident in self.supervisors:
            self._send_backend(ident, Kind.DRAINED)
        self._drained = True
        self._exit_at = time.monotonic() + TIMINGS.drain_linger
        log.info("drained; workers told to stop")

    # -- observability ------------------------------------------------------------------------------------
    def status(self) -> dict:
        now = time.monotonic()
        return {
            "router": {
                "pid": os.getpid(),
                "version": protocol.VERSION,
                "frontend": self.frontend_address,
                "backend": self.backend_address,
                "uptime": round(now - self.started, 3),
                "draining": self.draining,
                "requests": len(self.records),
                "supervisors": len(self.supervisors),
                "counters": dict(self.stats),
            },
            "services": [self._service_row(s) for s in sorted(self.services.values(),
                                                               key=lambda s: s.name)],
            "workers": [s.row(now) for s in sorted(self.slots.values(),
                                                  key=lambda s: s.sort_key)],
        }

    def _service_row(self, svc: Service) -> dict:
        row = svc.row()
        row["spares"] = sum(1 for s in self.slots.values()
                            if s.service == svc.name and s.state is WorkerState.SPARE)
        row["target_workers"] = self._active_target(svc.name)
        return row

    def _warn(self, key: str, fmt: str, *args: object) -> None:
        """Log the first few of each kind of peer misbehaviour, then one in a thousand."""
        self._warned[key] += 1
        n = self._warned[key]
        if n <= 10 or n % 1000 == 0:
            log.warning(fmt + (f" [{n} so far]" if n > 10 else ""), *args)
