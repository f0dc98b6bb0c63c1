"""Liveness: what no death notice can reveal. A worker that stopped beating (SIGSTOP, stuck
holding the GIL), a request that runs past its service's ``exec_timeout``, a supervisor
whose host went silent.

Each registered incarnation's heartbeat thread beats every ``heartbeat_interval``; one
silent for ``heartbeat_interval * heartbeat_liveness`` is killed through its supervisor
(SIGKILL), and its death notice then answers what it held. A kill that brings no death
notice within ``TIMINGS.kill_grace`` is declared dead here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ipc.errors import RequestTimeoutError
from ipc.lifecycle import AdminOp, WorkerState
from ipc.protocol import HEARTBEAT_SUFFIX, Kind
from router.health import Conn
from router.requests import Phase
from workerpool.config import TIMINGS

if TYPE_CHECKING:
    from router.core import RouterCore

log = logging.getLogger("workerpool.router")
MEMORY_KEYS = 8  # entries of a heartbeat's memory map kept for status


class Liveness:
    def __init__(self, core: RouterCore) -> None:
        self.core = core
        self._unknown_beats: dict[bytes, float] = {}  # heartbeats from unregistered workers
        self._next_check = 0.0
        self.draining_workers = False  # a worker may be DRAINING: see draining_started

    @property
    def limit(self) -> float:
        cfg = self.core.config
        return cfg.heartbeat_interval * cfg.heartbeat_liveness

    def forget_unknown(self, ident: bytes) -> None:
        self._unknown_beats.pop(ident, None)

    def on_heartbeat(self, ident: bytes, meta: dict) -> None:
        """A worker's heartbeat thread (``of`` names its main socket) or a supervisor.
        Pings are answered with their token; pongs never are (no ping-pong loops)."""
        core = self.core
        now = core.clock()
        of = meta.get("of")
        if isinstance(of, bytes):
            if ident != of + HEARTBEAT_SUFFIX:  # only a worker's own heartbeat socket
                core.stats["heartbeats_refused"] += 1
                return
            conn = core.registry.conns.get(of)
            if conn is not None:
                conn.last_beat = now
                conn.busy.add(meta.get("busy"), conn.slot.finished)
                batches = meta.get("batches")
                meter = core.services[conn.slot.service].meter \
                    if conn.slot.service in core.services else None
                moved = meter.batches if meter is not None else None
                if batches is not None and (ignored := conn.batches.add(batches, conn.methods,
                                                                       moved)):
                    core.stats["batch_reports_ignored"] += ignored
                mem = meta.get("mem")
                if isinstance(mem, dict):  # shown as is in status: keep only well-formed
                    conn.memory = {k: v for k, v in list(mem.items())[:MEMORY_KEYS]
                                   if isinstance(k, str) and type(v) is int}
            elif of not in self._unknown_beats:
                # Its heartbeat socket may simply have overtaken its READY: wait one beat.
                self._unknown_beats[of] = now
            else:
                # Still unknown a beat later: this router restarted and never saw its READY.
                # Ask it, on its heartbeat socket, to register again.
                self._unknown_beats[of] = now
                core.to_backend(ident, Kind.HEARTBEAT, {"register": True, "router": core.instance})
            return  # otherwise worker heartbeats are one-way
        core.supervisors.on_ping(ident, meta, now)
        if "ping" in meta:
            pong = {"pong": meta["ping"], "router": core.instance}
            if core.supervisors.asks_hello(ident):
                pong["hello"] = True  # lost, forgotten or never heard: have it describe itself
            core.to_backend(ident, Kind.HEARTBEAT, pong)

    def check(self, now: float) -> None:
        """Every ``TIMINGS.liveness_tick``: silent supervisors, hung or overdue workers."""
        if now < self._next_check:
            return
        self._next_check = now + TIMINGS.liveness_tick
        limit = self.limit
        for ident, seen in list(self._unknown_beats.items()):
            if now - seen > limit:  # it stopped beating without ever registering: gone
                del self._unknown_beats[ident]
        self.core.supervisors.check_silent(now, limit)
        for conn in list(self.core.registry.conns.values()):
            self._check_worker(conn, now, limit)

    def _check_worker(self, conn: Conn, now: float, limit: float) -> None:
        core = self.core
        if conn.kill_sent is not None:
            if now - conn.kill_sent > TIMINGS.kill_grace:  # no death notice came: answer anyway
                why = conn.slot.leave_reason or "hung"
                conn.slot.leave_reason = None
                core.registry.declare_dead(conn, f"was declared dead ({why})",
                                           f"{why}; no death notice came: declared dead", "hung")
            return
        silent = now - conn.last_beat
        if silent > limit:
            self.kill(conn, f"sent no heartbeat for {silent:.1f}s (stopped, or stuck "
                            "holding the GIL)")
            return
        svc = core.services.get(conn.slot.service)
        if svc is not None and conn in svc.conns:
            moved = svc.size_ahead(conn, core.supervisors.round_trip(conn.slot.owner), now)
            if moved > 0:
                core.requests.pump(svc)  # its room grew: queued requests may go now
            elif moved < 0:
                core.requests.shed_excess(conn)
        cap = svc.settings.exec_timeout if svc is not None else None
        if cap and conn.in_flight and now - conn.busy_since > cap:
            # The oldest is running, and so is every request of a batch (STARTED).
            running = [min(conn.in_flight.values(), key=lambda r: r.dispatched_at),
                       *(conn.in_flight[r] for r in conn.started if r in conn.in_flight)]
            why = f"ran longer than exec_timeout={cap:g}s"
            for rec in dict.fromkeys(running):
                if rec.phase is Phase.RUNNING:
                    svc.expired += 1
                    core.requests.fail(rec, RequestTimeoutError(
                        f"the request {why} on worker {conn.slot.id}; the worker is being "
                        "replaced", worker=conn.slot.id))
            self.kill(conn, f"a request {why}")

    def kill(self, conn: Conn, reason: str) -> None:
        """Have a hung worker killed (SIGKILL by its supervisor); its death then answers
        what it held. No supervisor to ask: it is declared dead here and now."""
        core = self.core
        slot = conn.slot
        log.warning("worker %s (pid %s) %s: killing it", slot.id, conn.pid, reason,
                    extra={"event": "worker-hung", "worker": slot.id, "worker_pid": conn.pid,
                           "reason": reason})
        core.stats["hung_workers_killed"] += 1
        slot.leave_reason = f"hung: {reason}"
        core.scaling.unroute(conn)  # no new work for it; a spare, if any, takes its place
        if core.supervisors.connected(slot.owner):
            conn.kill_sent = core.clock()
            core.to_backend(slot.owner, Kind.ADMIN, {"op": AdminOp.KILL, "slot": slot.id,
                                                     "incarnation": conn.incarnation,
                                                     "reason": reason})
        else:
            core.registry.declare_dead(conn, f"was declared dead: {reason}", f"hung: {reason}",
                                       "hung")

    def draining_started(self) -> None:
        """A worker was set DRAINING (admin drain, scale down): looked at every tick from
        now until none is left."""
        self.draining_workers = True

    def stop_drained_workers(self) -> None:
        """A draining worker that holds nothing any more is told to stop."""
        if not self.draining_workers:
            return
        core = self.core
        draining = False
        for conn in list(core.registry.conns.values()):
            if conn.slot.state is not WorkerState.DRAINING:
                continue
            draining = True
            if not conn.in_flight and conn.kill_sent is None:
                conn.kill_sent = core.clock()  # asked once; kill_grace bounds the wait
                conn.slot.leave_reason = "drained"
                core.to_backend(conn.identity, Kind.SHUTDOWN)
        self.draining_workers = draining
