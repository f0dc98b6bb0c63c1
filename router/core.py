"""The router's core: every decision, and no I/O.

::

    Router (router.router): sockets, poll, signals
        | frames in                          ^ frames out (Outbox)
        v                                    |
    RouterCore.on_frontend / on_backend / tick(now)
        admission ---> requests (records, queues, dispatch, the one finish)
        clients (per-connection limits; gone and not-reading clients)
        registry (slots, conns, loss) <--- liveness (heartbeats, kills)
        supervisors (HELLO, SLOT, DRAIN, loss)   scaling (spares, scale)
        recovery (retry and poison rule)         status (the STATUS body)

The core takes decoded messages and the time from its caller (``clock``), and sends
through an ``Outbox`` whose sends report whether the peer was reachable; while a batch is
open (``batch``: the loop's batch of messages, a tick, a BUNDLE taken in) one-frame
messages wait in ``Outgoing`` and go to each peer together at its end. Tests drive it
with plain frames, a recording outbox and a fake clock. Bytes from the network never
raise out of it: every frame sequence decodes or becomes a typed ``ProtocolError`` reply
(clients) or a counted, logged drop (backend).

Each message comes with its sender's ``Role`` (ipc.curve): what its key may do now. A
keyless router passes the defaults (anyone may do anything, as before keys); a key no
longer in the store comes as None. On the frontend a client key may not send ADMIN, and
a revoked key is answered PermissionDeniedError for whatever it sends; on the backend a
message from anything but a worker key is dropped, and the connection it came on is
treated as lost.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import msgpack

from ipc import protocol
from ipc.curve import Role
from ipc.errors import (
    NO_LIVE_WORKERS,
    SHUTTING_DOWN,
    UNKNOWN_SERVICE,
    FrameError,
    IllegalTransition,
    PayloadError,
    PermissionDeniedError,
    ProtocolError,
    ServiceUnavailableError,
    WorkerPoolError,
)
from ipc.protocol import REPLY_KINDS, Kind
from ipc.transport import Truncated
from router import admin
from router import status as status_report
from router.admission import Admission
from router.clients import ClientLimits, Delivery
from router.liveness import Liveness
from router.metrics import Meters, ServiceMeter
from router.outgoing import Outbox, Outgoing
from router.registry import WorkerRegistry
from router.requests import Phase, RequestTable, error_body, error_reply
from router.scaling import Scaling
from router.service import Service, ServiceSettings
from router.supervisors import Supervisors
from workerpool.config import (
    ROUTED_FIELDS,
    TIMINGS,
    RouterConfig,
    ServiceConfig,
    routed_defaults,
)

log = logging.getLogger("workerpool.router")

EMPTY_META = b""
RESERVED_ID = 0  # the id of replies the router cannot attribute; no request may use it
LARGE_META = 65536  # bytes of meta past which its decoding is worth giving memory back after
LARGE_META_INTERVAL = 0.5
"""A client connection's metas over LARGE_META (only pings holding thousands of ids need
them) are decoded at most once per this many seconds; sooner ones are refused undecoded
(``meta-too-often``). Decoding one takes milliseconds, receiving one microseconds: a
client sending them back to back would otherwise fill the router's memory with the
backlog. The Python clients ping at most once per ``TIMINGS.ping_interval`` (1 s)."""
LARGE_META_CLIENTS = 4096  # connections whose last large meta is remembered (cleared when full)
LARGE_META_RATE = 4.0
"""Metas over LARGE_META decoded per second from all connections together (and as many at
once): the per-connection interval does not bound many connections each sending one (150
of them held every client about 2.7 s). Past it they are refused undecoded, as
``meta-too-often``: at most about 80 ms a second of decoding, and four clients pinging
with over 7,000 requests outstanding each are never refused."""


class RouterCore:
    """Admits client requests, dispatches them to workers and keeps the health table."""

    def __init__(self, config: RouterConfig, service_defaults: dict | None, out: Outbox,
                 clock: Callable[[], float] = time.monotonic,
                 addresses: tuple[str, str] = ("", "")) -> None:
        self.config = config
        self.clock = clock
        self.addresses = addresses  # (frontend, backend) as bound, for status
        self._defaults = {**routed_defaults(), **(service_defaults or {})}
        self.services: dict[str, Service] = {}
        self.stats: Counter[str] = Counter()
        self.outgoing = Outgoing(out, self.stats, self._undelivered)
        # With --metrics: what is counted for it on the request path (router.metrics).
        self.meters: Meters | None = Meters() if config.metrics else None
        self._warned: Counter[str] = Counter()
        self.instance = f"{os.getpid()}-{time.time_ns()}"  # changes when the router restarts
        self._meta_cache = protocol.MetaCache(max_bytes=config.max_meta_bytes)
        self._large_metas: dict[bytes, float] = {}  # client -> when its last large meta came
        self._large_budget = (LARGE_META_RATE, self.clock())  # (metas left, as of when)
        self.started = clock()
        # Set when a client's message made this process allocate a lot at once (a huge frame
        # count, an oversized meta): the loop then gives the freed memory back.
        self.release_memory = False
        # When the caller's loop last turned to its sockets (None: now; tests): see tick.
        self.backend_read_at: float | None = None
        self.draining = False
        self._drain_deadline = 0.0
        self._drained = False
        self._exit_at: float | None = None
        self._deaths_asked: float | None = None  # see deaths_due
        # The next periodic pass of tick (liveness, ahead sizing, shedding lines): between
        # passes, a turn's tick only looks at what may be due sooner (_wanted).
        self._periodic_at = float("-inf")
        self.requests = RequestTable(self)
        self.registry = WorkerRegistry(self)
        self.liveness = Liveness(self)
        self.supervisors = Supervisors(self)
        self.scaling = Scaling(self)
        self.admission = Admission(self)
        self.clients = ClientLimits(self)
        self._backend_handlers: dict[Kind, Callable[[bytes, dict], None]] = {
            Kind.READY: self.registry.on_ready,
            Kind.GOODBYE: self.registry.on_goodbye,
            Kind.HEARTBEAT: self.liveness.on_heartbeat,
            Kind.STARTED: self._on_started,
            Kind.HELLO: self.supervisors.on_hello,
            Kind.SLOT: self.supervisors.on_slot,
            Kind.DRAIN: self.supervisors.on_drain,
        }

    # -- frontend: clients -----------------------------------------------------------------------
    def on_frontend(self, frames: list, role: Role | None = Role.ADMIN) -> None:
        """One message from a client: ``[routing id, head, *frames]``, sent with a key of
        ``role`` (None: a key that is no longer allowed)."""
        client = frames[0]
        if role is not Role.ADMIN and role is not Role.CLIENT:
            self._refuse_key(client, frames, role)
            return
        if type(frames) is Truncated:
            self._refuse_truncated(client, frames)
            return
        if len(frames) > 2 and self._oversized(frames):
            self._refuse_oversized(client, frames)
            return
        large = protocol.meta_length(frames[1]) > LARGE_META
        if large:
            # Received (and maybe decoded), it made this process allocate a lot, refused or not.
            self.release_memory = True
        try:
            kind, rid, meta_frame, body, buffers = protocol.split(frames, 1)
            if kind is Kind.BUNDLE:
                self._on_bundle(self.on_frontend, client, protocol.unbundle(frames[1]), role)
                return
            if large:
                self._check_large_meta(client, rid, meta_frame)
            msg = protocol.Message(kind, rid, self._meta_cache.unpack(meta_frame, rid, kind),
                                   body, buffers)
        except FrameError as exc:
            self.stats["bad_frames_frontend"] += 1
            if exc.code == "meta-too-large":
                self.release_memory = True
            self.warn("bad-frame", "bad frame from client %r: %s", client, exc)
            self.reply_error(client, exc.req_id or RESERVED_ID, ProtocolError(str(exc),
                                                                             code=exc.code))
            return
        kind = msg.kind
        if kind is Kind.HEARTBEAT:
            self._on_client_ping(client, msg)
            return
        if kind not in (Kind.REQUEST, Kind.STATUS, Kind.CANCEL, Kind.ADMIN):
            self.stats["bad_frames_frontend"] += 1
            self.reply_error(client, msg.req_id, ProtocolError(
                f"message kind {kind.name} is not sent by clients", code="bad-kind"))
            return
        if msg.req_id == RESERVED_ID:
            if kind is not Kind.CANCEL:  # a CANCEL is never answered
                self.reply_error(client, RESERVED_ID, ProtocolError(
                    f"request id 0 is reserved for replies the router cannot attribute; "
                    f"{kind.name} needs another id", code="bad-request-id"))
            return
        if kind is Kind.REQUEST:
            self.admission.on_request(client, msg, meta_frame)
        elif kind is Kind.CANCEL:
            self.requests.cancel(client, msg.req_id)
        elif (client, msg.req_id) in self.requests.by_client:
            # Its answer would be a second reply under the id of a request in flight.
            self.reply_error(client, msg.req_id, ProtocolError(
                f"request id {msg.req_id} is already in flight on this connection",
                code="duplicate-id"))
        elif kind is Kind.STATUS:
            body = msgpack.packb(self.status(), use_bin_type=True)
            self.to_client(client, Kind.RESULT, msg.req_id, EMPTY_META, body)
        elif role is not Role.ADMIN:
            self.stats["permission_denied"] += 1
            self.reply_error(client, msg.req_id, PermissionDeniedError(
                "ADMIN needs an admin key; this connection's key is a client key",
                code="role"))
        else:
            admin.on_admin(self, client, msg.req_id, msg.meta)

    def _on_bundle(self, handler: Callable[[list, Role | None], None], peer: bytes,
                   heads: list[bytes], role: Role | None) -> None:
        """A well-formed BUNDLE's messages, each handled by ``handler`` as if it had come
        alone from ``peer`` with ``role``, in order; a bug in one costs that one only.
        What they send to one peer goes together."""
        self.stats["bundles_received"] += 1
        with self.outgoing.batch():
            for head in heads:
                self._guarded(handler, [peer, head], role)

    def _refuse_key(self, client: bytes, frames: list, role: Role | None) -> None:
        """A frontend message whose key is no longer allowed there (revoked, or moved to
        the workers' folder): refused unread but for its header, so the caller is told
        instead of waiting out its timeout. A CANCEL is never answered. A BUNDLE's
        messages are refused each under its own id (one ERROR under 0 if malformed)."""
        try:
            kind, req_id = protocol.unpack_header(frames[1]) if len(frames) > 1 \
                else (None, RESERVED_ID)
            if kind is Kind.BUNDLE:
                heads = protocol.unbundle(frames[1])
                with self.outgoing.batch():
                    for head in heads:
                        self._refuse_key(client, [client, head], role)
                return
        except FrameError:
            kind, req_id = None, RESERVED_ID
        self.stats["permission_denied"] += 1
        if kind is Kind.CANCEL:
            return
        why = "was revoked" if role is None else f"is a {role.value} key"
        self.warn("permission", "refused a message from client %r: its key %s", client, why)
        self.reply_error(client, req_id, PermissionDeniedError(
            f"this connection's key {why}: the router accepts nothing more on it",
            code="revoked" if role is None else "role"))

    def _refuse_truncated(self, client: bytes, frames: Truncated) -> None:
        """A message with more frames than a client may send: its extra frames were never
        kept (``transport.recv``); answered under its id if its header reads."""
        self.stats["bad_frames_frontend"] += 1
        self.release_memory = True
        req_id = _answer_id(frames)
        total = len(frames) - 1 + frames.dropped
        self.warn("too-many-frames", "client %r sent a message of %d frames", client, total)
        self.reply_error(client, req_id, ProtocolError(
            f"message has {total} frames, over the limit of "
            f"{2 + self.config.max_buffer_frames} (max_buffer_frames="
            f"{self.config.max_buffer_frames})", code="too-many-frames"))

    def _check_large_meta(self, client: bytes, req_id: int, meta_frame: bytes) -> None:
        """Raises FrameError ``meta-too-often`` for a meta over LARGE_META that comes within
        LARGE_META_INTERVAL of the connection's last one, or past LARGE_META_RATE from all
        connections together. The checks before it in the order
        of protocol.md 9.1 (head, size) come first, as decode makes them."""
        if len(meta_frame) > self.config.max_meta_bytes:
            return  # decode refuses it: meta-too-large
        now = self.clock()
        last = self._large_metas.get(client)
        if last is not None and now - last < LARGE_META_INTERVAL:
            raise FrameError("meta-too-often", f"a meta over {LARGE_META} bytes is decoded at "
                             f"most once per {LARGE_META_INTERVAL:g}s per connection; this one "
                             f"came {now - last:.3f}s after the last", req_id)
        left, then = self._large_budget
        left = min(LARGE_META_RATE, left + (now - then) * LARGE_META_RATE)
        if left < 1:
            self._large_budget = (left, now)
            raise FrameError("meta-too-often", f"the router decodes at most "
                             f"{LARGE_META_RATE:g} metas over {LARGE_META} bytes a second, from "
                             "all connections together; try again in a second", req_id)
        self._large_budget = (left - 1, now)
        if len(self._large_metas) >= LARGE_META_CLIENTS:
            self._large_metas.clear()
        self._large_metas[client] = now

    def _oversized(self, frames: list) -> int:
        """The bytes of a message's body and buffers if over ``max_message_bytes``, else 0.
        ZeroMQ bounds each frame (MAXMSGSIZE), not their sum: a message of many large
        frames is refused here rather than queued or forwarded."""
        head = frames[1]
        total = len(head) - protocol.HEADER_SIZE - protocol.meta_length(head)
        for frame in frames[2:]:
            total += len(frame)
        return total if total > self.config.max_message_bytes else 0

    def _refuse_oversized(self, client: bytes, frames: list) -> None:
        self.stats["bad_frames_frontend"] += 1
        self.release_memory = True
        total = self._oversized(frames)
        req_id = _answer_id(frames)
        self.warn("too-large", "client %r sent a message of %d bytes", client, total)
        self.reply_error(client, req_id, ProtocolError(
            f"message body and buffers are {total} bytes, over the router's "
            f"max_message_bytes={self.config.max_message_bytes}", code="too-large"))

    def _on_client_ping(self, client: bytes, msg: protocol.Message) -> None:
        """Who am I, and which of the requests it waits for I do not hold. FIFO per
        connection: whatever the client sent before the ping is already here."""
        held = msg.meta.get("held", ())
        by_client = self.requests.by_client
        unknown = [r for r in held if type(r) is int and (client, r) not in by_client] \
            if isinstance(held, list) else []
        body = msgpack.packb({"router": self.instance, "unknown": unknown,
                              "uptime": self.clock() - self.started})
        self.to_client(client, Kind.HEARTBEAT, msg.req_id, EMPTY_META, body)

    # -- backend: workers and supervisors -------------------------------------------------------
    def on_backend(self, frames: list, role: Role | None = Role.WORKER) -> None:
        """One message from a worker or supervisor: ``[routing id, head, *frames]``, sent
        with a key of ``role`` (None: a key that is no longer allowed)."""
        ident = frames[0]
        if role is not Role.WORKER:
            self._drop_unauthorized(ident, role)
            return
        if type(frames) is Truncated:
            total = len(frames) - 1 + frames.dropped
            self._drop_oversized(ident, frames, f"{total} frames", "a message of %d frames",
                                 total, f"limit of {2 + self.config.max_buffer_frames} "
                                 f"(max_buffer_frames={self.config.max_buffer_frames})")
            return
        if len(frames) > 2 and (total := self._oversized(frames)):
            self._drop_oversized(ident, frames, f"{total} bytes", "a message of %d bytes",
                                 total, f"max_message_bytes={self.config.max_message_bytes}")
            return
        try:
            kind, rid, meta_frame, body, buffers = protocol.split(frames, 1)
            if kind is Kind.BUNDLE:
                heads = protocol.unbundle(frames[1])
        except FrameError as exc:
            self.stats["bad_frames_backend"] += 1
            self.warn("bad-backend", "dropped bad frame from backend peer %r: %s", ident, exc)
            return
        if kind is Kind.BUNDLE:
            self._on_bundle(self.on_backend, ident, heads, role)
            return
        if kind in REPLY_KINDS:
            conn = self.registry.conns.get(ident)
            if conn is None:
                self.stats["replies_from_unknown_worker"] += 1
                return
            self.requests.on_reply(conn, kind, rid, meta_frame, body, buffers)
            return
        if len(meta_frame) > LARGE_META and kind is not Kind.HELLO and not self._known(ident):
            # Decoding it would take milliseconds: only a peer that registered (a worker's
            # STARTED for a large batch, a supervisor) may make the router spend them.
            self.stats["bad_frames_backend"] += 1
            self.warn("bad-backend", "dropped a %s with a meta of %d bytes from backend peer "
                      "%r, which has not registered", kind.name, len(meta_frame), ident)
            return
        try:
            meta = protocol.unpack_meta(meta_frame, rid, self.config.max_meta_bytes)
        except FrameError as exc:
            self.stats["bad_frames_backend"] += 1
            self.warn("bad-backend", "dropped bad meta from backend peer %r: %s", ident, exc)
            return
        if kind is Kind.RECLAIM:  # the answer of a worker's heartbeat thread (requests.py)
            conn = self.registry.conns.get(ident.removesuffix(protocol.HEARTBEAT_SUFFIX))
            if conn is not None and ident.endswith(protocol.HEARTBEAT_SUFFIX):
                self.requests.on_reclaimed(conn, rid, meta)
            return
        handler = self._backend_handlers.get(kind)
        if handler is None:
            self.stats["bad_frames_backend"] += 1
            self.warn("bad-backend", "backend peer %r sent %s, which it must not", ident, kind.name)
            return
        try:
            handler(ident, meta)
        except IllegalTransition as exc:
            self.stats["illegal_transitions"] += 1
            self.warn("transition", "%s", exc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.stats["bad_frames_backend"] += 1
            self.warn("bad-backend", "bad %s from %r: %r", kind.name, ident, exc)
            if kind is Kind.HELLO and not self.supervisors.connected(ident):
                # Unanswered, it would say HELLO again at every ping, and whoever runs it
                # would never learn why its workers get nothing.
                self.stats["hellos_refused"] += 1
                self.to_backend(ident, Kind.DRAINED,
                                {"reason": f"HELLO refused: {exc}"[:300], "refused": True})

    def _known(self, ident: bytes) -> bool:
        """Whether a backend peer registered: a worker (or its heartbeat socket) or a
        supervisor."""
        conns = self.registry.conns
        return ident in conns or self.supervisors.connected(ident) or (
            ident.endswith(protocol.HEARTBEAT_SUFFIX)
            and ident.removesuffix(protocol.HEARTBEAT_SUFFIX) in conns)

    def _drop_unauthorized(self, ident: bytes, role: Role | None) -> None:
        """A backend message whose key is no longer a worker key: dropped unread. A worker
        registered on that connection is lost as if it had died (its requests answered or
        requeued), so no request goes to it again; a supervisor's messages are dropped
        until it counts as silent, and its workers are lost with it then."""
        self.stats["backend_unauthorized"] += 1
        why = "was revoked" if role is None else f"is a {role.value} key"
        self.warn("permission", "dropped a message from backend peer %r: its key %s", ident, why)
        conn = self.registry.conns.get(ident)
        if conn is not None:
            reason = f"lost its key (it {why})"
            try:
                self.registry.declare_dead(conn, reason, reason, "key-revoked")
            except IllegalTransition as exc:  # its requests were answered all the same
                self.warn("transition", "%s", exc)

    def _drop_oversized(self, ident: bytes, frames: list, size: str, fmt: str, n: int,
                        limit: str) -> None:
        """A backend message over a limit (``max_buffer_frames``, or ``max_message_bytes``
        for its body and buffers together): dropped. A worker's reply of that size still
        ends its request, with a PayloadError, so the caller is not left waiting for a
        reply that will never be forwarded."""
        self.stats["bad_frames_backend"] += 1
        self.release_memory = True
        self.warn("oversized", "backend peer %r sent " + fmt, ident, n)
        conn = self.registry.conns.get(ident)
        try:
            kind, rid = protocol.unpack_header(frames[1])
        except (FrameError, IndexError):
            return
        if conn is None or kind not in REPLY_KINDS or rid not in conn.in_flight:
            return
        rec = conn.in_flight[rid]
        if rec.phase is Phase.RUNNING:
            conn.slot.errored += 1
            self.services[rec.service].errored += 1
        err = PayloadError(f"the worker's reply has {size}, over the router's {limit}",
                           worker=conn.slot.id)
        if kind is Kind.PARTIAL:
            self.requests.fail(rec, err)  # the worker still owes its final reply: orphaned
            return
        self.requests.finish(rec, error_reply(err), from_worker=True, outcome=err.type)
        self.requests.release(rec)
        self.requests.pump(self.services[rec.service])

    def _on_started(self, ident: bytes, meta: dict) -> None:
        """A worker runs several of its requests at once (a batch): if it dies now, each of
        them was running, not only the oldest."""
        conn = self.registry.conns.get(ident)
        if conn is None:
            return
        ids = meta["ids"]
        if not isinstance(ids, list) or not all(type(rid) is int for rid in ids):
            raise TypeError(f"STARTED ids must be a list of request ids, not {ids!r:.80}")
        conn.started.update(rid for rid in ids if rid in conn.in_flight)

    # -- time ---------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Everything that happens with time: call after each poll. Death notices due must
        be preceded by one more read of the backend (``deaths_due``): those that came due
        after the last ``deaths_due`` wait for the next pass (a caller that never asks,
        such as a test, has every notice due by now applied). Its sends are one batch.

        The loop turns once or twice a request, and most turns nothing here is due: a full
        pass runs every ``liveness_tick`` and whenever ``_wanted`` says something may be
        due sooner, so a turn with nothing due costs a few attribute reads, whatever the
        number of workers."""
        now = self.clock()
        if now < self._periodic_at and not self._wanted(now):
            self._deaths_asked = None
            return
        if now >= self._periodic_at:
            self._periodic_at = now + TIMINGS.liveness_tick
        with self.outgoing.batch():  # what it sends to one peer goes as one message
            deaths_by = now if self._deaths_asked is None else self._deaths_asked
            self._deaths_asked = None
            self._guarded(self.admission.check_grace, now)
            self._guarded(self.registry.check_unreachable, now)
            if self.registry.waiting:
                self._guarded(self.registry.check_waiting, now)
            self._guarded(self.requests.expire, now)
            self._guarded(self.clients.expire, now)
            if self.clients.owed:
                self._guarded(self.clients.pay_owed)
            self._guarded(self.admission.log_shedding, now)
            # Silence is judged as of the loop's last turn to its sockets: a loop that spent
            # seconds on one client's message has simply not read the heartbeats yet.
            heard = now if self.backend_read_at is None else min(now, self.backend_read_at)
            self._guarded(self.liveness.check, heard)
            self._guarded(self.liveness.stop_drained_workers)
            self._guarded(self.registry.apply_deaths, deaths_by)
            if self.supervisors.draining:
                self._guarded(self.supervisors.check_drains, now)
            if self.draining:
                self._guarded(self._check_drained, now)

    def deaths_due(self) -> bool:
        """Whether a death notice is due: read the backend once more before ``tick``, so the
        dead worker's last replies are taken before its requests are answered. ``tick``
        then acts only on the notices due at this call."""
        self._deaths_asked = now = self.clock()
        return self.registry.deaths_due(now)

    def _wanted(self, now: float) -> bool:
        """Whether a step of ``tick`` may have work before its next periodic pass: a
        request's deadline or max_wait, a client's cut-off over or an error owed to it, a
        death notice or an unreachable worker pending, READYs waiting for their supervisor,
        registration grace over, a draining worker, a drain. The steps that only run on
        the period (liveness, sizing, shedding lines) are not asked."""
        due = self.requests.timers.next_due()
        grace = self.admission.grace_until
        return ((due is not None and due <= now) or self.clients.due(now)
                or self.registry.pending() or self.liveness.draining_workers
                or (grace is not None and now >= grace)
                or self.draining or self.supervisors.draining)

    def next_wakeup(self) -> float:
        """Seconds until ``tick`` has something to do at the latest."""
        now = self.clock()
        t = min(TIMINGS.liveness_tick, self._periodic_at - now)
        due = self.requests.timers.next_due()
        if due is not None:
            t = min(t, due - now)
        if self.registry.any_unreachable():
            t = min(t, TIMINGS.unreachable_poll)
        death = self.registry.next_death()
        if death is not None:
            t = min(t, death - now)
        if self.draining or self.supervisors.draining:
            t = min(t, TIMINGS.drain_poll)
        return max(0.0, t)

    @property
    def finished(self) -> bool:
        """Drained, and the last replies had time to leave: the loop may stop."""
        return self._exit_at is not None and self.clock() >= self._exit_at

    def _guarded(self, step: Callable, *args: object) -> None:
        """Run a step; a bug in it is logged and counted, never fatal to the router."""
        try:
            step(*args)
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("internal error in %s", getattr(step, "__name__", step))

    # -- shutdown -----------------------------------------------------------------------------------
    def begin_drain(self, why: str = "") -> None:
        """Stop admitting; finish what was admitted; then stop workers and exit."""
        if self.draining:
            return
        live = self.requests.live()
        log.info("draining (%s): %d requests to finish", why, live,
                 extra={"event": "drain-start", "reason": why, "requests": live,
                        "drain_timeout": self.config.drain_timeout})
        self.draining = True
        self._drain_deadline = self.clock() + self.config.drain_timeout

    def _check_drained(self, now: float) -> None:
        if self._drained:
            return
        if self.requests.live() and now < self._drain_deadline:
            return
        unfinished = self.requests.live()
        for rec in list(self.requests.records.values()):
            self.requests.fail(rec, ServiceUnavailableError(
                "the pool shut down before this request finished (drain_timeout)",
                code=SHUTTING_DOWN))
        for ident in list(self.registry.conns):
            self.to_backend(ident, Kind.SHUTDOWN)
        for ident in self.supervisors.known:
            self.to_backend(ident, Kind.DRAINED)
        self._drained = True
        self._exit_at = now + TIMINGS.drain_linger
        log.info("drained; workers told to stop",
                 extra={"event": "drained", "unfinished": unfinished,
                        "workers": len(self.registry.conns),
                        "seconds": round(now - self._drain_deadline
                                         + self.config.drain_timeout, 3)})

    # -- services -----------------------------------------------------------------------------------
    def service(self, name: str, config: dict | None = None) -> Service:
        """The service ``name``, created with router defaults if new. ``config`` (from a
        HELLO) applies once: to a new service, or to one a READY created before the
        HELLO arrived; the first supervisor to describe a service wins."""
        svc = self.services.get(name)
        if svc is not None and (config is None or svc.configured):
            return svc
        cfg = {**self._defaults, **(config or {})}
        # Re-validated with the same model the supervisor used: a bad HELLO is refused.
        checked = ServiceConfig.model_validate({k: cfg[k] for k in ROUTED_FIELDS if k in cfg},
                                               strict=True)
        settings = ServiceSettings(**{k: getattr(checked, k) for k in ROUTED_FIELDS})
        if svc is None:
            svc = self.services[name] = Service(name, settings)
        else:
            svc.configure(settings)
            for conn in self.registry.conns.values():  # spares too: they are not in svc.conns
                if conn.slot.service == name:
                    svc.set_capacity(conn, conn.declared)
                    self.registry.tell_capacity(conn)
        svc.configured = config is not None
        return svc

    def described(self, svc: Service) -> None:
        """A supervisor described ``svc`` (in its HELLO, or a slot of it): with --metrics,
        its name may now be a label value (router.metrics)."""
        if svc.meter is None and self.meters is not None:
            svc.meter = ServiceMeter()

    def fail_if_unservable(self, svc: Service | None) -> None:
        """Queued requests of a service that has no live worker left would wait forever."""
        registry = self.registry
        if svc is None or not svc.queued or svc.conns or registry.has_live_slots(svc.name):
            return
        if not registry.described(svc.name):
            if self.admission.grace_until is not None:
                return  # nobody described it yet: its workers may still register
            known = ", ".join(sorted(n for n in self.services
                                     if n != svc.name and registry.described(n)))
            why = (f"unknown service {svc.name!r}; services: {known or 'none'} (no worker of "
                   f"it registered within registration_grace={self.config.registration_grace:g}s "
                   "of the router starting)")
            code = UNKNOWN_SERVICE
        else:
            why = f"service {svc.name!r} has no live workers (all failed or stopped)"
            code = NO_LIVE_WORKERS
        for rec in svc.queue.records():
            self.requests.fail(rec, ServiceUnavailableError(why, code=code))

    # -- sending ------------------------------------------------------------------------------------
    def batch(self) -> AbstractContextManager[None]:
        """A block whose one-frame messages to each peer are sent together at its end (the
        loop's batch of messages; ``tick`` opens its own): ``Outgoing``."""
        return self.outgoing.batch()

    def to_client(self, client: bytes, kind: Kind, client_rid: int, meta: bytes, body: bytes,
                  buffers: Iterable = ()) -> Delivery | None:
        """Send one reply; None while it waits for the end of the batch. A reply the
        client's queue is too full to take cuts the client off (``ClientLimits``), except
        a stream's item (PARTIAL), which goes at once: its caller ends that stream instead
        (``RequestTable.on_reply``), since a reader slower than its stream still reads."""
        partial = kind is Kind.PARTIAL
        result = self.outgoing.to_client(
            client, protocol.encode(kind, client_rid, meta, body, buffers), now=partial)
        if result is None or result is Delivery.SENT or (result is Delivery.FULL and partial):
            return result
        self._not_delivered(client, 1, result)
        return result

    def reply_error(self, client: bytes, client_rid: int, err: WorkerPoolError) -> None:
        self.to_client(client, Kind.ERROR, client_rid, EMPTY_META, error_body(err))

    def to_backend(self, ident: bytes, kind: Kind, meta: dict | None = None,
                   req_id: int = 0) -> None:
        if self.outgoing.to_backend(ident, protocol.encode(kind, req_id, meta)) is Delivery.GONE:
            self.stats["unroutable_backend"] += 1

    def _undelivered(self, to_client: bool, peer: bytes, tags: list, why: Delivery) -> None:
        """Messages collected for ``peer`` that could not be sent at the end of a batch, in
        order; each means what it would have meant had it failed at once: a reply, the
        client gone or not reading; a dispatched request (its tag), back to the queue; any
        other backend message, counted."""
        if to_client:
            self._guarded(self._not_delivered, peer, len(tags), why)
            return
        for rec in tags:
            if rec is None:
                self.stats["unroutable_backend"] += 1
            else:
                self._guarded(self.requests.undispatched, rec, peer)

    def _not_delivered(self, client: bytes, count: int, why: Delivery) -> None:
        self.stats["unroutable_replies"] += count
        self.clients.undelivered(client, why)

    # -- observability ------------------------------------------------------------------------------
    def status(self) -> dict:
        return status_report.status(self)

    def warn(self, key: str, fmt: str, *args: object) -> None:
        """Log the first few of each kind of peer misbehaviour, then one in a thousand."""
        self._warned[key] += 1
        n = self._warned[key]
        if n <= 10 or n % 1000 == 0:
            log.warning(fmt + (f" [{n} so far]" if n > 10 else ""), *args)


def _answer_id(frames: list) -> int:
    """The id to refuse a message under when only its header is read: the header's, or 0
    when it has none that reads, or is a BUNDLE's (whose id is a count, not a request's)."""
    try:
        kind, req_id = protocol.unpack_header(frames[1]) if len(frames) > 1 \
            else (None, RESERVED_ID)
    except FrameError:
        return RESERVED_ID
    return RESERVED_ID if kind is Kind.BUNDLE else req_id
