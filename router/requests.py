"""Request records: the router's single source of truth for every admitted request.

A record exists from admission until its final reply is sent and its worker is done with
it. Every outcome (result, error, crash, timeout, cancel) goes through one method,
``RequestTable.finish``, so a request can never get two final replies; a reply that
arrives for a record already gone is dropped and counted.

::

    admit --> QUEUED --dispatch--> RUNNING --worker's final reply--> DONE (removed)
                 |                    |
                 |                    +--timeout/cancel--> ORPHANED --worker's reply--> DONE
                 +--timeout/cancel/max_wait--> DONE (removed)
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import msgpack

from ipc import protocol
from ipc.errors import BackpressureError, RequestTimeoutError, WorkerPoolError
from ipc.protocol import FINAL_REPLY_KINDS, HEARTBEAT_SUFFIX, Kind
from router.clients import Delivery
from router.metrics import CANCELLED, DROPPED, OK, error_type
from router.timers import DEADLINE, MAX_WAIT, TimerHeap

if TYPE_CHECKING:
    from router.core import RouterCore
    from router.health import Conn
    from router.service import Service


class Phase(enum.Enum):
    QUEUED = "queued"  # waiting in its service's queue
    RUNNING = "running"  # sent to ``conn``, no final reply yet
    ORPHANED = "orphaned"  # client answered (timeout, cancel) but ``conn`` still runs it
    DONE = "done"  # final reply sent and the worker is done with it


class Record:
    __slots__ = (
        "admitted_at",
        "body",
        "buffers",
        "client",
        "client_rid",
        "conn",
        "deadline",
        "dispatched_at",
        "idempotent",
        "meta_frame",
        "method",
        "phase",
        "priority",
        "rid",
        "seq",
        "service",
        "starts",
        "streamed",
        "wait_until",
    )

    def __init__(self, rid: int, client: bytes, client_rid: int, service: str, method: str,
                 meta_frame: bytes, body: bytes, buffers: list, deadline: float | None,
                 admitted_at: float, priority: int = 0, idempotent: bool = False) -> None:
        self.rid = rid
        self.client = client
        self.client_rid = client_rid
        self.service = service
        self.method = method
        self.meta_frame = meta_frame
        self.body = body
        self.buffers = buffers
        self.deadline = deadline
        self.admitted_at = admitted_at
        self.priority = priority
        self.idempotent = idempotent
        self.starts = 0  # times a worker died while running it (retries, poison detection)
        self.streamed = False  # partial replies went out: it can no longer be retried
        self.wait_until = 0.0  # max_wait deadline of its current stay in the queue
        self.dispatched_at = 0.0
        self.seq = 0  # which request to its worker this is (1, 2, ...): RECLAIM names it
        self.phase = Phase.QUEUED
        self.conn: Conn | None = None


class RequestTable:
    """Every admitted request: the records, their queues' pump, dispatch and the one
    place a request ends. Sends go through the core's outbox; the time is the core's."""

    def __init__(self, core: RouterCore) -> None:
        self.core = core
        self.records: dict[int, Record] = {}
        self.by_client: dict[tuple[bytes, int], Record] = {}
        # What each client connection waits for (queued or running): its in-flight limit,
        # and everything to drop at once when it is gone or cut off.
        self.per_client: dict[bytes, dict[int, Record]] = {}
        self.timers = TimerHeap(self._armed)
        # Ids start from the clock, so a reply addressed by an earlier router process (same
        # workers, restarted router) can never match a request of this one.
        self._next_rid = (time.time_ns() // 1000) << 8

    def __len__(self) -> int:
        return len(self.records)

    def new_rid(self) -> int:
        rid = self._next_rid
        self._next_rid += 1
        return rid

    def live(self) -> int:
        """Requests whose client still waits for a final reply."""
        return sum(1 for r in self.records.values() if r.phase in (Phase.QUEUED, Phase.RUNNING))

    def admit(self, rec: Record, svc: Service, conn: Conn | None) -> None:
        """Take ``rec`` in: onto ``conn`` at once, or into ``svc``'s queue."""
        self.records[rec.rid] = rec
        self.by_client[(rec.client, rec.client_rid)] = rec
        held = self.per_client.get(rec.client)
        if held is None:
            held = self.per_client[rec.client] = {}
        held[rec.rid] = rec
        if rec.deadline is not None:
            self.timers.push(rec.deadline, rec.rid, DEADLINE, len(self.records))
        if conn is not None:
            self.dispatch(rec, conn)
        else:
            self.enqueue(svc, rec)

    def held_by(self, client: bytes) -> int:
        """Requests ``client`` waits for (queued or running)."""
        held = self.per_client.get(client)
        return len(held) if held else 0

    def enqueue(self, svc: Service, rec: Record, again: bool = False) -> None:
        """Queue ``rec`` (new, or ``again``: back after its worker died or refused it)
        with a fresh max_wait."""
        svc.queue.push(rec, front=again)
        if svc.settings.max_wait is not None:
            rec.wait_until = self.core.clock() + svc.settings.max_wait
            self.timers.push(rec.wait_until, rec.rid, MAX_WAIT, len(self.records))

    def dispatch(self, rec: Record, conn: Conn) -> None:
        """Send ``rec`` to ``conn``. It counts as running there from now; a send found to
        have failed (at once, or at the end of the batch) undoes that (``undispatched``)."""
        core = self.core
        rec.phase = Phase.RUNNING
        rec.conn = conn
        conn.sent += 1
        rec.seq = conn.sent
        rec.dispatched_at = core.clock()
        if not conn.in_flight:
            conn.busy_since = rec.dispatched_at
        conn.in_flight[rec.rid] = rec
        conn.slot.refresh_busy()
        if core.outgoing.to_backend(conn.identity, protocol.encode(
                Kind.REQUEST, rec.rid, rec.meta_frame, rec.body, rec.buffers),
                rec) is Delivery.GONE:
            self.undispatched(rec, conn.identity)

    def undispatched(self, rec: Record, ident: bytes) -> None:
        """The REQUEST of ``rec`` could not be sent to ``ident``: the process is gone and
        its death notice is still on its way. The worker leaves dispatch; the request never
        reached it, so it is safe to queue again, at the front, unless it was answered
        meanwhile (timeout, cancel: then it is only let go) or its worker already lost."""
        core = self.core
        core.stats["dispatch_unroutable"] += 1
        conn = core.registry.conns.get(ident)
        if conn is None:
            return  # lost meanwhile: its requests were dealt with then
        core.registry.quarantine(conn)
        if rec.conn is not conn or conn.in_flight.get(rec.rid) is not rec:
            return
        svc = core.services[rec.service]
        if rec.phase is Phase.ORPHANED:
            self.release(rec)
        else:
            del conn.in_flight[rec.rid]
            conn.started.discard(rec.rid)
            conn.reclaiming.discard(rec.rid)
            conn.sent -= 1  # RECLAIM names requests by the worker's count of those it got
            conn.slot.refresh_busy()
            rec.conn = None
            rec.phase = Phase.QUEUED
            self.enqueue(svc, rec, again=True)  # keeps its place among its client's
        self.pump(svc)  # another worker may have room now

    def pump(self, svc: Service) -> None:
        """Move queued requests onto workers with room, in queue order. With the queue
        empty, a worker that could run more while another holds requests ahead that it has
        not started asks for one of those back (``hand_back``)."""
        while svc.queued:
            conn = svc.pick()
            if conn is None:
                return
            rec = svc.queue.pop()
            if rec is None:
                break
            self.dispatch(rec, conn)
        if svc.settings.prefetch:
            self.hand_back(svc)

    def hand_back(self, svc: Service) -> None:
        """Requests held ahead (beyond what their worker runs) wait behind its current one.
        While another worker has room to run, ask for one back, newest first, one per free
        run slot: RECLAIM, which the worker answers (``on_reclaimed``). Nothing is taken
        back on a guess: only the worker knows whether it has started a request."""
        free = 0
        asked = 0
        for c in svc.conns:
            held = len(c.in_flight)
            if held < c.capacity:
                free += c.capacity - held
            asked += len(c.reclaiming)
        free -= asked
        for c in svc.conns:
            if free <= 0:
                return
            ahead = len(c.in_flight) - c.capacity - len(c.reclaiming)
            if ahead > 0:
                free -= self.reclaim(c, min(free, ahead))

    def shed_excess(self, conn: Conn) -> None:
        """``conn`` holds more than its limit now allows (its ahead count fell: it stalled,
        or its round trip shrank): ask the excess back, newest first, whatever the other
        workers are doing. What it gives back goes to the queue and on to a worker with
        room."""
        excess = len(conn.in_flight) - conn.limit - len(conn.reclaiming)
        if excess > 0:
            self.reclaim(conn, excess)

    def reclaim(self, conn: Conn, most: int) -> int:
        """Send RECLAIM for up to ``most`` of the requests ``conn`` holds ahead, newest
        first (it would start them last), skipping any it said it started or was already
        asked for. Returns how many were asked."""
        asked = 0
        for rid in reversed(conn.in_flight):
            if asked >= most:
                break
            rec = conn.in_flight[rid]
            if rid in conn.reclaiming or rid in conn.started or rec.phase is not Phase.RUNNING:
                continue
            if len(conn.in_flight) - len(conn.reclaiming) <= conn.capacity:
                break  # the rest it runs (or the oldest does): never ask for those
            conn.reclaiming.add(rid)
            # To its heartbeat thread: the main thread is busy running a handler.
            self.core.to_backend(conn.identity + HEARTBEAT_SUFFIX, Kind.RECLAIM,
                                 {"seq": rec.seq}, rid)
            self.core.stats["reclaims_asked"] += 1
            asked += 1
        return asked

    def on_reclaimed(self, conn: Conn, rid: int, meta: dict) -> None:
        """A worker's answer to RECLAIM: ``returned``, it gave the request back unstarted
        and will never run it (it runs elsewhere now); otherwise it had started it and
        its reply follows as usual. Exactly one of the two, decided by the worker."""
        conn.reclaiming.discard(rid)
        rec = conn.in_flight.get(rid)
        if meta.get("returned") is not True or rec is None:
            return
        self.core.stats["reclaimed"] += 1
        del conn.in_flight[rid]
        conn.started.discard(rid)
        conn.slot.refresh_busy()
        rec.conn = None
        svc = self.core.services[rec.service]
        if rec.phase is Phase.ORPHANED:  # answered meanwhile (timeout, cancel): done
            rec.phase = Phase.DONE
            self.records.pop(rid, None)
        else:
            rec.phase = Phase.QUEUED
            self.enqueue(svc, rec, again=True)  # keeps its place among its client's
        self.pump(svc)

    def finish(self, rec: Record, reply: tuple | None, from_worker: bool = False,
               outcome: str = OK, now: float | None = None) -> None:
        """Send ``rec``'s final reply (``(kind, meta, body, buffers)``; None: send nothing).

        A record still running on a worker stays attached to it as ORPHANED, holding its
        capacity until the worker's own reply arrives (then dropped and counted), and the
        worker is told to skip it. ``from_worker``: the reply is the worker's own, so the
        worker is done with it and the caller releases it. ``outcome`` (``ok``, an error
        type, ``cancelled``, ``dropped``) is what the metrics count it as, at ``now``.
        """
        if rec.phase in (Phase.DONE, Phase.ORPHANED):
            return
        meters = self.core.meters
        if meters is not None:
            meters.request_ended(
                self.core.services.get(rec.service), rec.method, outcome, None if reply is None
                else (self.core.clock() if now is None else now) - rec.admitted_at)
        self.by_client.pop((rec.client, rec.client_rid), None)
        held = self.per_client.get(rec.client)
        if held is not None:
            held.pop(rec.rid, None)
            if not held:
                del self.per_client[rec.client]
        if rec.phase is Phase.QUEUED:
            self.core.services[rec.service].queue.forget()
            rec.phase = Phase.DONE
            del self.records[rec.rid]
        elif rec.phase is Phase.RUNNING and not from_worker:
            rec.phase = Phase.ORPHANED
            # Best effort: a worker that has not started it yet skips it and answers at once.
            if rec.conn is not None and rec.conn.identity in self.core.registry.conns:
                self.core.to_backend(rec.conn.identity, Kind.CANCEL, None, rec.rid)
        if reply is not None:
            kind, meta, body, buffers = reply
            self.core.to_client(rec.client, kind, rec.client_rid, meta, body, buffers)

    def drop_client(self, client: bytes) -> tuple[int, int]:
        """Forget everything ``client`` waits for, sending it nothing: its queued requests
        are removed, its running ones cancelled on their workers (orphaned until they
        answer). Returns (queued, running) dropped."""
        held = self.per_client.pop(client, None)
        if not held:
            return 0, 0
        queued = sum(1 for rec in held.values() if rec.phase is Phase.QUEUED)
        for rec in held.values():
            self.finish(rec, None, outcome=DROPPED)
        return queued, len(held) - queued

    def overrun(self, rec: Record, svc: Service) -> None:
        """``rec``'s stream produced items faster than its client reads them, until
        ``max_unread_replies`` waited for it: the stream ends here (its worker is told to
        stop), and its final ERROR goes out once the client's queue has room. The
        connection itself is not cut off: it reads, only slower."""
        core = self.core
        core.stats["streams_overrun"] += 1
        svc.errored += 1
        err = BackpressureError(
            f"the stream produced items faster than this connection read them, until "
            f"max_unread_replies={core.config.max_unread_replies} waited unread; it was "
            "stopped", code="stream-overrun")
        client, client_rid = rec.client, rec.client_rid
        self.finish(rec, None, outcome=err.type)
        core.clients.owe(client, client_rid, error_body(err))

    def fail(self, rec: Record, err: WorkerPoolError) -> None:
        """Finish ``rec`` with ``err`` as its final reply."""
        self.finish(rec, error_reply(err), outcome=err.type)

    def release(self, rec: Record) -> None:
        """The worker is done with ``rec`` (it replied or died): free its capacity."""
        conn = rec.conn
        if conn is not None:
            conn.in_flight.pop(rec.rid, None)
            conn.started.discard(rec.rid)
            conn.reclaiming.discard(rec.rid)  # its answer to RECLAIM, if any, is moot now
            conn.busy_since = self.core.clock()  # progress: the next one starts now
            conn.slot.refresh_busy()
        rec.phase = Phase.DONE
        self.records.pop(rec.rid, None)

    def cancel(self, client: bytes, client_rid: int) -> None:
        rec = self.by_client.get((client, client_rid))
        if rec is None:
            return  # already answered: cancel is idempotent and never replied to
        self.core.services[rec.service].cancelled += 1
        self.finish(rec, None, outcome=CANCELLED)

    def on_reply(self, conn: Conn, kind: Kind, rid: int, meta: bytes, body: bytes,
                 buffers: list) -> None:
        """A worker's PARTIAL or final reply for one of the requests it holds."""
        core = self.core
        rec = conn.in_flight.get(rid)
        if rec is None:
            core.stats["late_replies"] += 1
            return
        svc = core.services[rec.service]
        if rec.phase is Phase.ORPHANED:  # already answered (timeout/cancel): drop, free capacity
            if kind in FINAL_REPLY_KINDS:
                core.stats["late_replies"] += 1
                svc.late_results += 1
                self.release(rec)
                self.pump(svc)
            return
        if kind is Kind.PARTIAL:
            rec.streamed = True
            # Sent at once, after what waits for the client: sending that may have found it
            # gone or cut off, which already ended this stream with its others.
            if core.to_client(rec.client, kind, rec.client_rid, meta, body,
                              buffers) is Delivery.FULL and rec.phase is Phase.RUNNING:
                self.overrun(rec, svc)
            return
        slot = conn.slot
        outcome = OK
        if kind is Kind.ERROR:
            slot.errored += 1
            svc.errored += 1
            if svc.meter is not None:
                outcome = error_type(body)
        else:
            slot.completed += 1
            svc.completed += 1
        now = core.clock()
        svc.observe(now, now - rec.dispatched_at, rec.dispatched_at - rec.admitted_at)
        self.finish(rec, (kind, meta, body, buffers), from_worker=True, outcome=outcome, now=now)
        self.release(rec)
        self.pump(svc)

    # -- timers ------------------------------------------------------------------------------
    def _armed(self, timer: tuple[float, int, int]) -> bool:
        when, rid, kind = timer
        rec = self.records.get(rid)
        if rec is None or rec.phase not in (Phase.QUEUED, Phase.RUNNING):
            return False
        return rec.deadline == when if kind == DEADLINE else (
            rec.phase is Phase.QUEUED and rec.wait_until == when)

    def expire(self, now: float) -> None:
        """Answer the requests whose deadline or max_wait passed."""
        core = self.core
        for timer in self.timers.pop_due(now):
            if not self._armed(timer):
                continue
            _, rid, kind = timer
            rec = self.records[rid]
            svc = core.services[rec.service]
            if kind == MAX_WAIT:
                # Waited max_wait (this stay in the queue) without a worker: shed it.
                svc.rejected_backpressure += 1
                self.fail(rec, core.admission.backpressure(
                    svc, f"waited max_wait={svc.settings.max_wait}s in the queue"))
                continue
            svc.expired += 1
            if rec.phase is Phase.QUEUED:
                where = "in the queue"
            elif next(iter(rec.conn.in_flight)) != rid and rid not in rec.conn.started:
                # Held ahead behind the request its worker runs (prefetch): not started.
                where = f"held ahead on worker {rec.conn.slot.id}, not started"
            else:
                where = f"on worker {rec.conn.slot.id}"
            self.fail(rec, RequestTimeoutError(
                f"deadline passed after {now - rec.admitted_at:.3f}s {where}",
                worker=rec.conn.slot.id if rec.conn else None))


def error_reply(err: WorkerPoolError) -> tuple:
    """The ``(kind, meta, body, buffers)`` of an ERROR reply carrying ``err``."""
    return (Kind.ERROR, b"", error_body(err), ())


def error_body(err: WorkerPoolError) -> bytes:
    return msgpack.packb(err.to_wire(), use_bin_type=True, default=str)
