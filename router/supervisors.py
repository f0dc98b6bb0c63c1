"""Supervisors: the processes that start, reap and respawn workers, one per host or pool.

A supervisor describes itself and its slots with HELLO, reports each process event with
SLOT, beats like a worker, and leaves with DRAIN (scope ``supervisor``). One that goes
silent for the liveness limit is *lost*: its workers cannot be reached or respawned from
here, so what they held is answered and its slots are marked failed; if it speaks again
it is taken back and describes itself anew.

Each supervisor is a *node* to operators: its name (HELLO ``node``, else its host), its
host, and the round trip of its pings as it measures them (``Peer``), shown per node in
STATUS ``nodes`` and on each of its workers' rows. A lost node that stays silent for
``TIMINGS.forget_lost_node`` is forgotten, slots and all.

A node name belongs to one supervisor at a time. A HELLO that names the node of another
supervisor (``workerpool worker --node`` restarted: a Kubernetes pod, a systemd unit)
*replaces* it: the old one's workers are given up as for a lost node, its slots leave the
table, and it is told to stop (DRAINED) in case it still runs. The new one's HELLO then
describes the slots afresh, so the incarnations it vouches for count from 1 again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ipc.errors import SUPERVISOR_LEFT, ServiceUnavailableError
from ipc.lifecycle import SlotEvent, WorkerState
from ipc.protocol import HEARTBEAT_SUFFIX, Kind
from router.health import Slot
from router.metrics import death_cause
from router.registry import death_fields, failure_error
from router.requests import Phase
from workerpool.config import ROUTED_FIELDS, TIMINGS, ServiceConfig

if TYPE_CHECKING:
    from router.core import RouterCore

log = logging.getLogger("workerpool.router")
MAX_WORKERS = 1024  # per service and supervisor, as ServiceConfig.workers allows
MAX_NAME = 255  # characters of a node or host name kept (a hostname has at most 253)
MAX_RTT_MS = 3_600_000.0  # a reported round trip above an hour is not one


@dataclass
class Peer:
    """One supervisor that described itself (HELLO), while connected or lost."""

    pid: int | None
    host: str | None  # its hostname, as it said
    node: str  # its node name; else its host; else its routing id
    seen: float  # when the router last heard from it (HELLO or heartbeat)
    rtt: float | None = None  # ms: the last round trip of its pings, as it measured it
    srtt: float | None = None  # ms: the same, smoothed
    named: bool = False  # its HELLO gave ``node``: a successor under that name replaces it

    def row(self, ident: bytes, state: str, slots: list[Slot], now: float) -> dict:
        """Its entry of STATUS ``nodes`` (docs/protocol.md 6.5)."""
        return {"node": self.node, "host": self.host, "pid": self.pid,
                "supervisor": ident.decode(errors="replace"), "state": state,
                "slots": len(slots), "workers": sum(1 for s in slots if s.conn is not None),
                "seen": round(now - self.seen, 3), "rtt_ms": self.rtt,
                "rtt_smoothed_ms": self.srtt}


def node_name(value: object) -> str | None:
    """HELLO's ``node``: absent, or 1 to MAX_NAME characters; anything else is refused."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise ValueError(f"bad node name {str(value)[:80]!r}")
    return value


def _round_trip(value: object) -> float | None:
    """A ping's ``rtt`` or ``srtt`` in ms, or None for anything that is not one."""
    if type(value) not in (int, float) or not math.isfinite(value) \
            or not 0 <= value <= MAX_RTT_MS:
        return None
    return round(float(value), 3)


def worker_count(value: object) -> int:
    """A worker count from a peer; anything else is refused as a bad message."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WORKERS:
        raise ValueError(f"bad worker count {value!r}")
    return value


def _running(slot: dict) -> tuple[int, object] | None:
    """(incarnation, pid) of the process a HELLO says runs in a slot, if any."""
    inc = slot.get("incarnation")
    if isinstance(inc, bool) or not isinstance(inc, int) or inc < 1:
        return None
    return inc, slot.get("pid")


MAX_DEPARTED = 4096
"""Departed supervisors remembered (their late workers told to stop, never asked for HELLO)."""


class Supervisors:
    def __init__(self, core: RouterCore) -> None:
        self.core = core
        self.known: dict[bytes, Peer] = {}  # connected supervisors
        self.draining: dict[bytes, float] = {}  # leaving supervisor -> drain deadline
        # Supervisors that drained and left, or were replaced: the newest MAX_DEPARTED, in
        # order (each restart of a node adds one; the oldest are long gone).
        self._departed: dict[bytes, None] = {}
        self._lost: dict[bytes, Peer] = {}  # declared lost; taken back if they speak

    def _depart(self, ident: bytes) -> None:
        departed = self._departed
        departed.pop(ident, None)
        departed[ident] = None
        if len(departed) > MAX_DEPARTED:
            del departed[next(iter(departed))]

    def connected(self, ident: bytes | None) -> bool:
        return ident is not None and ident in self.known

    def leaving(self, ident: bytes | None) -> bool:
        """Whether ``ident`` drains or drained away (its workers must not register)."""
        return ident in self.draining or ident in self._departed

    def asks_hello(self, ident: bytes) -> bool:
        """Whether a ping from ``ident`` is answered with ``hello``: it is not connected and
        did not leave or get replaced (a lost supervisor, one forgotten, one never heard)."""
        return ident not in self.known and ident not in self._departed

    def on_ping(self, ident: bytes, meta: dict, now: float) -> None:
        """A supervisor's HEARTBEAT: when it was heard, and the round trip it reports
        (a value that is not a round trip keeps the one before)."""
        peer = self.known.get(ident) or self._lost.get(ident)
        if peer is None:
            return
        peer.seen = now
        rtt, srtt = _round_trip(meta.get("rtt")), _round_trip(meta.get("srtt"))
        if rtt is not None and srtt is not None:
            peer.rtt, peer.srtt = rtt, srtt

    def round_trip(self, ident: bytes | None) -> float | None:
        """The smoothed round trip in seconds that the supervisor ``ident`` last reported
        (its workers' path to the router), or None."""
        peer = None if ident is None else self.known.get(ident) or self._lost.get(ident)
        return None if peer is None or peer.srtt is None else peer.srtt / 1000

    def placement(self, ident: bytes | None) -> tuple[str | None, str | None]:
        """(node, host) of the supervisor ``ident``, if it described itself and has not
        left."""
        peer = None if ident is None else self.known.get(ident) or self._lost.get(ident)
        return (None, None) if peer is None else (peer.node, peer.host)

    def rows(self, now: float) -> list[dict]:
        """STATUS ``nodes``: every supervisor connected, leaving or lost, by node name."""
        owned: dict[bytes | None, list[Slot]] = {}
        for slot in self.core.registry.slots.values():
            owned.setdefault(slot.owner, []).append(slot)
        peers = [(i, p, "leaving" if i in self.draining else "connected")
                 for i, p in self.known.items()]
        peers += [(i, p, "lost") for i, p in self._lost.items()]
        return sorted((p.row(i, state, owned.get(i, []), now) for i, p, state in peers),
                      key=lambda r: (r["node"], r["supervisor"]))

    # -- messages ------------------------------------------------------------------------------
    def on_hello(self, ident: bytes, meta: dict) -> None:
        core = self.core
        services = list(meta.get("services", ()))
        slots = [(str(s["slot"]), str(s["service"]), str(s.get("device", "?")), _running(s))
                 for s in meta.get("slots", ())]
        for s in services:  # all or nothing: check every service before applying any
            # Strict: the wire's types as protocol.md states them, not what converts to
            # them ("3", true or 2.0 for an int).
            ServiceConfig.model_validate(
                {k: v for k, v in s.items() if k in ROUTED_FIELDS} | {"name": str(s["name"])},
                strict=True)
            for key in ("workers", "spares"):
                if key in s:
                    worker_count(s[key])
        node = node_name(meta.get("node"))
        host = meta.get("host")
        host = host[:MAX_NAME] if isinstance(host, str) else None
        pid = meta.get("pid")
        replaced = [i for i, p in [*self.known.items(), *self._lost.items()]
                    if node is not None and p.named and p.node == node and i != ident]
        for old in replaced:
            self._replace(old, ident, node)
        # A HELLO again (a scale, a router that lost it, a return) keeps the round trips.
        peer = self.known.get(ident) or self._lost.get(ident)
        if peer is None:
            peer = Peer(None, None, "", core.clock())
        peer.pid = pid if type(pid) is int else None
        peer.host = host
        peer.node = node or host or ident.decode(errors="replace")
        peer.named = node is not None
        peer.seen = core.clock()
        self.known[ident] = peer
        self._departed.pop(ident, None)
        if ident in self._lost:
            del self._lost[ident]
            log.warning("supervisor %r, declared lost, is back: taking its workers back", ident,
                        extra={"event": "supervisor-back", "supervisor": ident})
        for s in services:
            core.described(core.service(str(s["name"]), s))
            if "workers" in s:
                core.scaling.set_target(str(s["name"]), ident, worker_count(s["workers"]),
                                        worker_count(s.get("spares", 0)))
        for slot_id, service, device, running in slots:
            slot = core.registry.slot(slot_id, service, device)
            if slot.owner not in (None, ident) and self.connected(slot.owner):
                core.stats["slots_taken_over"] += 1
                log.warning("supervisor %r takes slot %s over from supervisor %r, which is "
                            "still connected", ident, slot_id, slot.owner)
            slot.owner = ident
            core.registry.departed_owner.pop(slot_id, None)
            if running is not None:  # the process it runs there now (a restarted router)
                core.registry.vouch(slot, *running)
            if slot.conn is not None:  # its worker registered before our HELLO arrived
                core.to_backend(ident, Kind.READY,
                                {"slot": slot.id, "incarnation": slot.conn.incarnation})
        for s in services:
            core.scaling.rebalance(core.services[str(s["name"])])
        if replaced:  # only now: until its slots were listed, a service had none left
            for svc in core.services.values():
                core.fail_if_unservable(svc)
        if core.draining:
            core.to_backend(ident, Kind.DRAINED)

    def on_slot(self, ident: bytes, meta: dict) -> None:
        """A supervisor reports a slot's process event (``ipc.lifecycle.SlotEvent``). Only
        the slot's own supervisor may; a slot nobody described yet becomes the sender's."""
        core = self.core
        registry = core.registry
        slot_id = str(meta["slot"])
        owner = registry.owner(slot_id)
        if owner != ident and (owner is not None or not self.connected(ident)):
            core.stats["slot_events_not_owner"] += 1
            core.warn("not-owner", "SLOT for %.80s from %r, which is not its supervisor; "
                      "ignored", slot_id, ident)
            return
        slot = registry.slot(slot_id, str(meta["service"]), str(meta.get("device", "?")))
        slot.owner = ident
        incarnation = int(meta["incarnation"])
        event = SlotEvent(meta["event"])  # an unknown event is a ValueError: a bad message
        if incarnation < slot.incarnation:
            core.stats["stale_slot_events"] += 1
            return
        if event is SlotEvent.STARTED:
            if incarnation > slot.incarnation:
                slot.left_cleanly = False
                slot.transition(WorkerState.RESTARTING if incarnation > 1 else WorkerState.STARTING)
                registry.vouch(slot, incarnation, meta.get("pid"))
        elif event is SlotEvent.DIED:
            reason = str(meta.get("reason", "died"))
            fields = death_fields(meta)
            cause = death_cause(meta.get("exitcode"), reason, said=fields["cause"])
            slot.deaths[cause] = slot.deaths.get(cause, 0) + 1
            registry.note_death(slot, incarnation, reason, fields)
        elif event is SlotEvent.FAILED:
            reason = str(meta.get("reason", "failed"))
            if slot.conn is not None:
                registry.lose(slot.conn, reason)
            # Keep the traceback its GOODBYE carried: it says *why* setup() failed.
            slot.last_error = failure_error(reason, slot.setup_error)
            slot.transition(WorkerState.FAILED)
            core.fail_if_unservable(core.services.get(slot.service))
        elif event is SlotEvent.STOPPED:
            slot.transition(WorkerState.STOPPED)
            slot.last_error = None  # stopped on request: its most recent end is clean
            if slot.conn is not None:
                registry.lose(slot.conn, "stopped", crashed=False)
            core.fail_if_unservable(core.services.get(slot.service))
        elif event is SlotEvent.REMOVED:
            # Scaled away: its process is gone (normally after draining). Its row goes too.
            if slot.conn is not None:
                registry.lose(slot.conn, str(meta.get("reason", "was scaled away")),
                              crashed=meta.get("exitcode") != 0)
            registry.slots.pop(slot.id, None)
            if registry.departed_owner.get(slot.id) == ident:
                del registry.departed_owner[slot.id]
            core.fail_if_unservable(core.services.get(slot.service))

    def on_drain(self, ident: bytes, meta: dict) -> None:
        """scope "router": the whole pool stops (``up``). scope "supervisor": only that
        supervisor's workers leave; the router and other supervisors keep serving. Only
        from a supervisor that said HELLO."""
        core = self.core
        if not self.connected(ident) and ident not in self.draining:
            core.stats["drains_refused"] += 1
            core.warn("not-owner", "DRAIN from %r, which is not a supervisor; ignored", ident)
            return
        if meta.get("scope", "router") == "router":
            core.begin_drain(f"requested by supervisor {ident!r}")
            return
        if ident in self.draining:
            return
        self.draining[ident] = core.clock() + core.config.drain_timeout
        for conn in core.registry.conns_of(ident):
            core.scaling.unroute(conn)  # no new work; what it holds finishes
        log.info("supervisor %r is leaving: draining its workers", ident,
                 extra={"event": "supervisor-drain", "supervisor": ident})

    # -- timers --------------------------------------------------------------------------------
    def check_drains(self, now: float) -> None:
        """A leaving supervisor whose workers finished (or ran out of time) is let go."""
        core = self.core
        for ident, deadline in list(self.draining.items()):
            conns = core.registry.conns_of(ident)
            running = [r for c in conns for r in c.in_flight.values() if r.phase is Phase.RUNNING]
            if running and now < deadline:
                continue
            for rec in running:
                core.requests.fail(rec, ServiceUnavailableError(
                    "the worker's supervisor left before this request finished (drain_timeout)",
                    code=SUPERVISOR_LEFT))
            for conn in conns:
                core.to_backend(conn.identity, Kind.SHUTDOWN)
            core.to_backend(ident, Kind.DRAINED)
            del self.draining[ident]
            self._forget(ident, "its supervisor left", departed=True)

    def _forget(self, ident: bytes, reason: str, departed: bool) -> None:
        """A supervisor left on purpose (``departed``: a worker of its that registers late
        is told to stop), or was lost too long ago to keep: its slots leave the table with
        it, and admin commands no longer go to it."""
        core = self.core
        self.known.pop(ident, None)
        self._lost.pop(ident, None)
        if departed:
            self._depart(ident)
        for slot in core.registry.owned_by(ident):
            core.registry.slots.pop(slot.id, None)
            if departed:
                core.registry.departed_owner[slot.id] = ident
            if slot.conn is not None:
                core.registry.lose(slot.conn, reason, crashed=False)
        core.scaling.drop_targets(ident)
        for svc in core.services.values():
            core.fail_if_unservable(svc)

    def _replace(self, old: bytes, new: bytes, node: str) -> None:
        """``new`` said HELLO as node ``node``, which ``old`` held: ``old`` is taken for the
        same node's previous process (killed, its container restarted). Its workers are
        given up as for a lost node and told to stop; its slots leave the table, for
        ``new``'s HELLO to describe afresh; ``old`` is told to stop too, should it still run.
        The caller fails what became unservable once the new slots are in."""
        core = self.core
        state = "lost" if old in self._lost else "leaving" if old in self.draining \
            else "connected"
        log.warning("supervisor %r registers as node %r, which supervisor %r (%s) held: "
                    "taking the node over; the old supervisor's workers are given up",
                    new, node, old, state,
                    extra={"event": "supervisor-replaced", "supervisor": old,
                           "successor": new, "node": node})
        core.stats["supervisors_replaced"] += 1
        self.known.pop(old, None)
        self._lost.pop(old, None)
        self.draining.pop(old, None)
        self._depart(old)  # not asked for HELLO again: it must not take the name back
        self._unroute_all(old)
        reason = f"its supervisor was replaced (node {node} registered again)"
        for slot in core.registry.owned_by(old):
            # Its processes stop if they still run. If its host vanished and came back at
            # the same address, the router's side of the old connections, whose routing ids
            # the new workers' (from incarnation 1 again) may repeat, is reset.
            idents = {f"{slot.id}#{slot.incarnation}".encode()} if slot.incarnation else set()
            if slot.conn is not None:  # given up before its slot goes: nothing is unservable yet
                idents.add(slot.conn.identity)
                core.registry.lose_dead(slot.conn, reason, "supervisor-replaced")
            for ident in sorted(idents):
                core.to_backend(ident, Kind.SHUTDOWN)
                core.to_backend(ident + HEARTBEAT_SUFFIX, Kind.SHUTDOWN)
            core.registry.slots.pop(slot.id, None)
            core.registry.departed_owner.pop(slot.id, None)
        core.scaling.drop_targets(old)
        core.to_backend(old, Kind.DRAINED, {"reason": f"replaced: another supervisor "
                                                      f"registered as node {node!r}"})

    def _unroute_all(self, ident: bytes) -> None:
        """Take every worker of ``ident``, no longer connected, out of dispatch before any is
        given up: a request requeued from one must not be sent to the next, to be lost with
        it as if it had run (nor are its spares promoted: only a connected owner's are)."""
        for conn in self.core.registry.conns_of(ident):
            self.core.scaling.unroute(conn)

    def check_silent(self, now: float, limit: float) -> None:
        """Declare silent supervisors lost, and forget those lost for too long."""
        for ident, peer in list(self.known.items()):
            if now - peer.seen > limit:
                self._declare_lost(ident, now - peer.seen)
        for ident, peer in list(self._lost.items()):
            if now - peer.seen > TIMINGS.forget_lost_node:
                log.warning("node %r (supervisor %r) lost for %.0fs: forgotten", peer.node,
                            ident, now - peer.seen,
                            extra={"event": "supervisor-forgotten", "supervisor": ident,
                                   "node": peer.node})
                self.core.stats["supervisors_forgotten"] += 1
                self._forget(ident, "its supervisor was lost and forgotten", departed=False)

    def _declare_lost(self, ident: bytes, silent: float) -> None:
        """A supervisor stopped answering: its host is gone or cut off. Its workers cannot
        be reached or respawned from here: answer what they held and mark them failed."""
        core = self.core
        log.error("supervisor %r silent for %.1fs: its workers are lost", ident, silent,
                  extra={"event": "supervisor-lost", "supervisor": ident, "silent": silent})
        core.stats["supervisors_lost"] += 1
        self._lost[ident] = self.known.pop(ident)
        self._unroute_all(ident)
        for slot in core.registry.owned_by(ident):
            reason = f"its supervisor was silent for {silent:.1f}s (host lost?)"
            if slot.conn is not None:
                core.registry.lose_dead(slot.conn, reason, "supervisor-lost")
            slot.last_error = reason
            if slot.state is not WorkerState.STOPPED:
                slot.transition(WorkerState.FAILED)
            core.fail_if_unservable(core.services.get(slot.service))
        core.scaling.drop_targets(ident)
