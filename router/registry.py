"""The worker registry: every slot and every connected incarnation, and how one is lost.

::

    supervisor HELLO/SLOT --> slots (one Slot per slot id; owner, state, counters)
    worker READY ----------> conns (one Conn per live incarnation; in flight, liveness)
    death notice / GOODBYE / unreachable / kill --> lose(conn): its requests answered or
                                                    requeued (router.recovery), slot moves on

A death notice waits ``TIMINGS.death_grace`` and one more read of the backend, because
the supervisor's socket can overtake the worker's: the dead worker's last replies may
still be queued behind it.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

from ipc.errors import PoisonedRequestError, WorkerCrashedError
from ipc.lifecycle import LIVE, GoodbyeReason, WorkerState
from ipc.protocol import Kind
from router import recovery, vouching
from router.health import Conn, Slot
from router.requests import Phase, Record
from workerpool._proc import exit_cause, exit_status
from workerpool.config import TIMINGS

if TYPE_CHECKING:
    from router.core import RouterCore

log = logging.getLogger("workerpool.router")
ERROR_TAIL = 4000  # characters of an error kept for status
LOGGED_REQUESTS = 32  # held requests a death line lists one by one (it counts them all)


class WorkerRegistry:
    def __init__(self, core: RouterCore) -> None:
        self.core = core
        self.slots: dict[str, Slot] = {}
        self.conns: dict[bytes, Conn] = {}  # backend identity -> registered incarnation
        # Slots that left the table with a supervisor that drained away: a worker of theirs
        # that registers late is told to stop.
        self.departed_owner: dict[str, bytes] = {}
        # (when due, slot, incarnation, how, death_fields(...) of the notice)
        self._deaths: list[tuple[float, Slot, int, str, dict]] = []
        self.waiting = vouching.Waiting()  # READYs not vouched for yet
        # Workers whose socket is gone and whose death notice has not come (quarantine).
        self._unreachable: dict[bytes, Conn] = {}

    # -- lookups -------------------------------------------------------------------------------
    def slot(self, slot_id: str, service: str, device: str) -> Slot:
        """The slot ``slot_id``, created (with its service) if new."""
        slot = self.slots.get(slot_id)
        if slot is None:
            slot = self.slots[slot_id] = Slot(slot_id, service, device)
            self.core.described(self.core.service(service))
        elif device != "?":
            slot.device = device
        return slot

    def owner(self, slot_id: str) -> bytes | None:
        """The supervisor that runs ``slot_id``; for a slot that left with a supervisor that
        drained away, that supervisor, even if a late event of it brought the row back."""
        slot = self.slots.get(slot_id)
        if slot is not None and slot.owner is not None:
            return slot.owner
        return self.departed_owner.get(slot_id)

    def owned_by(self, ident: bytes) -> list[Slot]:
        return [s for s in self.slots.values() if s.owner == ident]

    def conns_of(self, ident: bytes) -> list[Conn]:
        return [s.conn for s in self.owned_by(ident) if s.conn is not None]

    def described(self, service: str) -> bool:
        """Some supervisor or worker told this router about a slot of ``service``."""
        return any(s.service == service for s in self.slots.values())

    def has_live_slots(self, service: str) -> bool:
        """Some worker of ``service`` is serving or expected back (starting, respawning)."""
        return any(s.service == service and s.state in LIVE for s in self.slots.values())

    # -- registration --------------------------------------------------------------------------
    def on_ready(self, ident: bytes, meta: dict) -> None:
        core = self.core
        slot_id = str(meta["slot"])
        incarnation = int(meta["incarnation"])
        service = str(meta["service"])
        capacity = int(meta["capacity"])
        pid = int(meta["pid"])
        if capacity < 1:
            raise ValueError(f"capacity {capacity} < 1")
        if ident in self.conns:
            return  # the same process registering twice (it was asked to): nothing changes
        slot = self.slots.get(slot_id)
        owner = self.owner(slot_id)
        started_by = str(meta["supervisor"]).encode() if "supervisor" in meta else owner
        if core.supervisors.leaving(started_by):
            core.to_backend(ident, Kind.SHUTDOWN)  # its supervisor is leaving or left
            return
        if owner is not None and started_by != owner:
            # A new supervisor's worker, ahead of the HELLO that takes the slot over (the
            # two sockets race): what the old owner said is no verdict on it.
            slot = None
        match vouching.verdict(slot, incarnation, pid):
            case vouching.Verdict.STALE:
                core.stats["stale_ready"] += 1
                core.to_backend(ident, Kind.SHUTDOWN)
                return
            case vouching.Verdict.WAIT:
                if not self.waiting.park(ident, Kind.READY, meta,
                                         core.clock() + TIMINGS.vouch_wait):
                    core.stats["unvouched_ready"] += 1
                return
        assert slot is not None  # ACCEPT: its supervisor described it and vouched for this
        if service != slot.service:
            raise ValueError(f"READY for {slot_id} names service {service!r}, "
                             f"not {slot.service!r}")
        if meta.get("device", "?") != "?":
            slot.device = str(meta["device"])
        if slot.conn is not None and slot.conn.identity != ident:
            self.lose(slot.conn, f"replaced by incarnation {incarnation}")
        if slot.retiring:
            core.to_backend(ident, Kind.SHUTDOWN)  # scaled away while it was starting
            return
        svc = core.service(service)
        now = core.clock()
        conn = Conn(ident, slot, incarnation, pid, capacity,
                    frozenset(str(m) for m in meta.get("methods", ())), now)
        svc.set_capacity(conn, capacity)
        self.tell_capacity(conn)
        spare = core.scaling.holds_back(svc)
        slot.transition(WorkerState.SPARE if spare else WorkerState.READY)
        slot.pid = conn.pid
        slot.restarts = max(slot.restarts, incarnation - 1)
        slot.ready_at = now
        slot.setup_error = None
        slot.leave_reason = None
        slot.left_cleanly = False
        slot.conn = conn
        self.conns[ident] = conn
        core.liveness.forget_unknown(ident)
        if not spare:
            svc.add_conn(conn)
        log.info("worker %s registered (pid %s, %s, incarnation %d)%s", slot_id, conn.pid,
                 slot.device, incarnation, " as a spare" if spare else "",
                 extra={"event": "worker-ready", "worker": slot_id, "service": service,
                        "worker_pid": conn.pid, "device": slot.device,
                        "incarnation": incarnation, "capacity": capacity, "spare": spare})
        if slot.owner is not None:  # tell its supervisor: it reports readiness and recovery
            core.to_backend(slot.owner, Kind.READY, {"slot": slot_id, "incarnation": incarnation})
        core.requests.pump(svc)

    def vouch(self, slot: Slot, incarnation: int, pid: object) -> None:
        """Its supervisor says ``incarnation`` (pid ``pid``) runs in ``slot``: a READY of
        that process that came first is taken now."""
        if incarnation > slot.incarnation:
            slot.incarnation = incarnation
            slot.pid = pid if type(pid) is int else None
        for ident, kind, meta in self.waiting.take(slot.id):
            try:
                if kind is Kind.READY:
                    self.on_ready(ident, meta)
                else:
                    self.on_goodbye(ident, meta)
            except ValueError as exc:  # checked once it could be: it names another service
                self.core.stats["bad_frames_backend"] += 1
                self.core.warn("bad-backend", "bad READY from %r: %r", ident, exc)

    def check_waiting(self, now: float) -> None:
        """Messages no supervisor vouched for in time are forgotten (router.vouching)."""
        for ident, kind, meta in self.waiting.expire(now):
            self.core.stats["unvouched_ready" if kind is Kind.READY else "unvouched_goodbye"] += 1
            self.core.warn("unvouched", "%s from %r for slot %.80r: no supervisor vouched for "
                           "it within %gs; ignored", kind.name, ident, meta.get("slot"),
                           TIMINGS.vouch_wait)

    def tell_capacity(self, conn: Conn) -> None:
        """A worker batches from what it holds and flushes early once it holds its capacity,
        so it must know when the service's max_inflight caps it below what it declared."""
        if conn.capacity != conn.told:
            conn.told = conn.capacity
            self.core.to_backend(conn.identity, Kind.READY, {"capacity": conn.capacity})

    def on_goodbye(self, ident: bytes, meta: dict) -> None:
        conn = self.conns.get(ident)
        reason = str(meta.get("reason", "left"))
        if conn is None:
            # A worker whose setup failed leaves before it ever registered (perhaps even
            # before its supervisor's HELLO arrived: the GOODBYE names its slot itself).
            slot_id = meta.get("slot")
            if reason != GoodbyeReason.SETUP_FAILED or not isinstance(slot_id, str):
                return
            slot = self.slots.get(slot_id)
            # Only from the incarnation its supervisor vouched for: the routing id says it.
            # It may come before that word (or the slot): then it waits for it, as a READY.
            if slot is not None and ident == f"{slot.id}#{slot.incarnation}".encode():
                # Its supervisor's SLOT failed travels on another connection and may have
                # come first: its reason (last_error now) stays in front of the traceback.
                failed = slot.state is WorkerState.FAILED and slot.setup_error is None
                slot.setup_error = str(meta.get("error", reason))[-ERROR_TAIL:]
                slot.last_error = failure_error(slot.last_error if failed else None,
                                                slot.setup_error)
            elif slot is None or ident.startswith(f"{slot.id}#".encode()):
                self.waiting.park(ident, Kind.GOODBYE, meta,
                                  self.core.clock() + TIMINGS.vouch_wait)
            return
        slot = conn.slot
        if reason == GoodbyeReason.CONTEXT_POISONED:
            # It is exiting on purpose to be replaced: what it still held is answered as a
            # crash, and the slot waits for its respawn. The request that poisoned it was
            # answered by the worker itself; whatever it still held never started.
            error = str(meta.get("error", reason))
            slot.leave_reason = f"CUDA context poisoned: {error}"[-ERROR_TAIL:]
            self.lose(conn, "left with a poisoned CUDA context", running=False)
            slot.transition(WorkerState.DEAD)
            return
        # A clean leave: the slot's most recent end is not an error.
        slot.last_error = None
        slot.left_cleanly = True
        # Set the state first: losing the conn checks whether the service is still alive.
        if slot.restart_pending:  # an operator's restart: a replacement is on its way
            slot.restart_pending = False
            slot.transition(WorkerState.RESTARTING)
        else:
            slot.transition(WorkerState.STOPPED)
        self.lose(conn, reason, crashed=False)

    # -- loss ----------------------------------------------------------------------------------
    def lose(self, conn: Conn, reason: str, crashed: bool = True, running: bool = True) -> None:
        """An incarnation is gone: answer or requeue everything it held, then forget it.

        ``crashed``: it died rather than left on purpose; ``running``: its oldest request
        was still running (see ``recovery.running_when_lost``)."""
        core = self.core
        requests = core.requests
        slot = conn.slot
        self.conns.pop(conn.identity, None)
        conn.unreachable_until = None
        if self._unreachable.get(conn.identity) is conn:
            del self._unreachable[conn.identity]
        if slot.conn is conn:
            slot.conn = None
        # Before its requests are requeued: a spare promoted now takes them at once.
        core.scaling.unroute(conn)
        svc = core.services.get(slot.service)
        settings = svc.settings if svc is not None else None
        held = sorted(conn.in_flight.values(), key=lambda r: r.dispatched_at)
        started = recovery.running_when_lost(held, conn.started, crashed, running)
        where = f"worker {slot.id} (pid {conn.pid}) {reason} while running this request"
        requeued = False
        outcomes: list[tuple[Record, str]] = []  # what became of each, for the death line
        for rec in held:
            if rec.phase is not Phase.RUNNING:  # its client was already answered
                outcomes.append((rec, "answered"))
                requests.release(rec)
                continue
            if rec.rid in started:
                rec.starts += 1
                outcome = recovery.crash_outcome(rec, settings, where, slot.id)
                if outcome is not None:
                    poisoned = isinstance(outcome, PoisonedRequestError)
                    outcomes.append((rec, "poisoned" if poisoned else "crashed"))
                    if svc is not None and poisoned:
                        svc.poisoned += 1
                    slot.errored += 1
                    if svc is not None:
                        svc.errored += 1
                    core.stats["crashed_requests"] += 1
                    requests.fail(rec, outcome)
                    requests.release(rec)
                    continue
            conn.in_flight.pop(rec.rid, None)
            rec.conn = None
            if svc is None:
                outcomes.append((rec, "crashed"))
                requests.fail(rec, WorkerCrashedError(
                    f"worker {slot.id} {reason}", worker=slot.id))
                requests.records.pop(rec.rid, None)
                continue
            outcomes.append((rec, "retried" if rec.rid in started else "requeued"))
            if rec.rid in started:
                svc.retried += 1
            requests.enqueue(svc, rec, again=True)
            requeued = True
        slot.lost = (conn.incarnation, held_fields(outcomes))
        if svc is not None:
            if requeued:
                requests.pump(svc)
            core.fail_if_unservable(svc)

    def declare_dead(self, conn: Conn, why: str, last_error: str, cause: str) -> None:
        """No death notice will come (or it came too late): answer what it held now.
        ``cause``: one word for the death line (``hung``, ``disconnected``...)."""
        self.lose_dead(conn, why, cause)
        conn.slot.last_error = last_error
        conn.slot.transition(WorkerState.DEAD)

    def lose_dead(self, conn: Conn, why: str, cause: str) -> None:
        """``lose`` a worker known dead without its supervisor's word, and log its death."""
        self.lose(conn, why)
        self.log_death(conn.slot, conn.incarnation, why,
                       {"cause": cause, **exit_status(None), "worker_pid": conn.pid})

    def quarantine(self, conn: Conn) -> None:
        """The worker's socket is gone but its death notice has not arrived yet.

        Stop dispatching to it at once; give the supervisor ``TIMINGS.unreachable_grace``
        to say how it died (so its requests are answered with the real cause, e.g.
        SIGSEGV), then answer them anyway: a remote supervisor may be gone too.
        """
        self.core.scaling.unroute(conn)
        if conn.unreachable_until is None:
            conn.unreachable_until = self.core.clock() + TIMINGS.unreachable_grace
            self._unreachable[conn.identity] = conn

    def any_unreachable(self) -> bool:
        return bool(self._unreachable)

    def pending(self) -> bool:
        """Death notices, unreachable workers or READYs waiting: tick looks every turn."""
        return bool(self._deaths or self._unreachable or self.waiting)

    def check_unreachable(self, now: float) -> None:
        for ident, conn in list(self._unreachable.items()):
            if self.conns.get(ident) is not conn:  # replaced meanwhile: not ours to judge
                del self._unreachable[ident]
            elif conn.unreachable_until is not None and conn.unreachable_until <= now:
                why = "disconnected (no death notice from its supervisor)"
                self.declare_dead(conn, why, why, "disconnected")

    # -- death notices -------------------------------------------------------------------------
    def note_death(self, slot: Slot, incarnation: int, how: str, fields: dict) -> None:
        """A supervisor says the process died; acted on after ``TIMINGS.death_grace``.
        ``fields``: ``death_fields`` of its notice."""
        self._deaths.append((self.core.clock() + TIMINGS.death_grace, slot, incarnation, how,
                             fields))

    def next_death(self) -> float | None:
        return min((d[0] for d in self._deaths), default=None)

    def deaths_due(self, now: float) -> bool:
        return any(d[0] <= now for d in self._deaths)

    def apply_deaths(self, now: float) -> None:
        """Act on the death notices that are due (the caller read the backend first)."""
        due = [d for d in self._deaths if d[0] <= now]
        if not due:
            return
        self._deaths = [d for d in self._deaths if d[0] > now]
        for _, slot, incarnation, how, fields in due:
            conn = slot.conn
            if conn is not None and conn.incarnation == incarnation:
                self.lose(conn, how)
            self.log_death(slot, incarnation, how, fields)
            if incarnation != slot.incarnation or slot.state in (WorkerState.FAILED,
                                                                 WorkerState.STOPPED):
                continue  # a newer incarnation registered, or the slot's fate is settled
            if not slot.left_cleanly:
                # Why it left, if it (or we) said so before it died, then how; once each.
                why = slot.leave_reason
                slot.last_error = f"{why}; {how}" if why and why[-40:] not in how else how
            slot.leave_reason = None
            slot.transition(WorkerState.DEAD)

    def log_death(self, slot: Slot, incarnation: int, how: str, fields: dict) -> None:
        """The one line that says a worker died: who, how (``fields``: cause, exitcode,
        signal, worker_pid), and what became of the requests it held when it was lost
        (now, or earlier: a poisoned context's GOODBYE). Once per incarnation."""
        if slot.death_logged == incarnation:
            return
        slot.death_logged = incarnation
        lost = slot.lost[1] if slot.lost is not None and slot.lost[0] == incarnation \
            else held_fields([])
        slot.lost = None
        pid = fields.get("worker_pid")
        if pid is None and incarnation == slot.incarnation:
            pid = slot.pid
        tally = ", ".join(f"{n} {o}" for o, n in sorted(lost["outcomes"].items()))
        log.log(logging.INFO if fields.get("cause") == "restart" else logging.WARNING,
                "worker %s (pid %s) %s; it held %d requests%s", slot.id, pid, how,
                lost["held"], f" ({tally})" if tally else "",
                extra={"event": "worker-died", "worker": slot.id, "service": slot.service,
                       "incarnation": incarnation, "device": slot.device, "reason": how,
                       **fields, "worker_pid": pid, **lost})


def failure_error(reason: str | None, traceback: str | None) -> str:
    """A failed slot's ``last_error``: why it failed (its supervisor's SLOT ``failed``)
    and then its ``setup()`` traceback (its worker's GOODBYE), each when known."""
    return "\n".join(filter(None, (reason, traceback))).strip()[-ERROR_TAIL:]


def held_fields(outcomes: list[tuple[Record, str]]) -> dict:
    """The death line's account of the requests a worker held: ``held`` (how many),
    ``outcomes`` (how many of each), and the first LOGGED_REQUESTS as ``requests``: the
    client's request id, the client connection, the method, and what became of it
    (``requeued``: it had not started; ``retried``: run again; ``crashed`` or
    ``poisoned``: answered with that error; ``answered``: its client had its reply
    already, a timeout or a cancel)."""
    return {
        "held": len(outcomes),
        "outcomes": dict(Counter(outcome for _, outcome in outcomes)),
        "requests": [{"id": rec.client_rid, "client": rec.client.hex()[:32],
                      "method": rec.method[:64], "outcome": outcome}
                     for rec, outcome in outcomes[:LOGGED_REQUESTS]],
    }


def death_fields(meta: dict) -> dict:
    """How a worker died, from its supervisor's SLOT ``died``: ``cause`` (the
    supervisor's word for it, else one derived from the exit status), ``exitcode``,
    ``signal`` and ``worker_pid`` (None where the notice does not say)."""
    rc = meta.get("exitcode")
    rc = rc if type(rc) is int else None
    cause = meta.get("cause")
    if not isinstance(cause, str) or not cause:
        cause = "unknown" if rc is None else exit_cause(rc)
    pid = meta.get("pid")
    return {"cause": cause[:64], **exit_status(rc), "worker_pid": pid if type(pid) is int else None}

