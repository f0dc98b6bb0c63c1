"""Spares and scaling: how many of a service's registered workers serve, and which.

Each supervisor's HELLO says, per service, how many workers it runs and how many spares it
keeps (``workers``, ``spares``). With no spares anywhere every registered worker serves;
otherwise ``target`` = the sum of ``workers`` serve and the rest wait set up and idle
(state SPARE) until a serving one is lost, when one is promoted in the same loop turn.
``workerpool scale`` changes the counts: spares are promoted at once, supervisors start
the rest, and on the way down the idlest workers drain and leave.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ipc.lifecycle import AdminOp, WorkerState
from ipc.protocol import Kind
from router.health import Conn, Slot
from router.service import Service

if TYPE_CHECKING:
    from router.core import RouterCore

log = logging.getLogger("workerpool.router")


class Scaling:
    def __init__(self, core: RouterCore) -> None:
        self.core = core
        # service -> supervisor -> (workers, spares) from its HELLO (or a scale since).
        self.targets: dict[str, dict[bytes, tuple[int, int]]] = {}

    def set_target(self, service: str, ident: bytes, workers: int, spares: int) -> None:
        self.targets.setdefault(service, {})[ident] = (workers, spares)

    def active_target(self, service: str) -> int | None:
        """How many workers of ``service`` serve, or None (no spares: every one serves)."""
        per = self.targets.get(service)
        if not per or not any(spares for _, spares in per.values()):
            return None
        return sum(workers for workers, _ in per.values())

    def holds_back(self, svc: Service) -> bool:
        """Whether a worker of ``svc`` registering now starts as a spare."""
        target = self.active_target(svc.name)
        return target is not None and len(svc.conns) >= target

    def unroute(self, conn: Conn) -> None:
        """Send ``conn`` no new work (it died, hangs, drains or leaves); a spare takes its
        place if its service has one. The one way a worker leaves its service's rotation."""
        svc = self.core.services.get(conn.slot.service)
        if svc is not None and conn in svc.conns:
            svc.remove_conn(conn)
            self.rebalance(svc)

    def rebalance(self, svc: Service) -> None:
        """Promote spares while ``svc`` serves from fewer workers than its target; hold
        back idle ones while it has more (a router that restarted saw them all register)."""
        core = self.core
        target = self.active_target(svc.name)
        spares = sorted((s for s in core.registry.slots.values()
                         if s.service == svc.name and s.state is WorkerState.SPARE
                         and s.conn is not None and core.supervisors.connected(s.owner)
                         and s.owner not in core.supervisors.draining),
                        key=lambda s: s.sort_key)
        promoted = False
        for slot in spares:
            if target is not None and len(svc.conns) >= target:
                break
            slot.transition(WorkerState.READY)
            svc.add_conn(slot.conn)
            core.stats["spares_promoted"] += 1
            promoted = True
            log.info("spare %s (pid %s) now serves %s", slot.id, slot.pid, svc.name,
                     extra={"event": "spare-promoted", "worker": slot.id,
                            "worker_pid": slot.pid, "service": svc.name})
        if target is not None and len(svc.conns) > target:
            for conn in sorted((c for c in svc.conns if not c.in_flight),
                               key=lambda c: c.slot.sort_key, reverse=True):
                if len(svc.conns) <= target:
                    break
                svc.remove_conn(conn)
                conn.slot.transition(WorkerState.SPARE)
        if promoted:
            core.requests.pump(svc)

    def drop_targets(self, ident: bytes) -> None:
        for service, per in self.targets.items():
            if per.pop(ident, None) is not None and service in self.core.services:
                self.rebalance(self.core.services[service])

    def scale(self, svc: Service, workers: int) -> dict:
        """Scale ``svc`` to ``workers``; the RESULT body. Raises ValueError when it cannot."""
        core = self.core
        name = svc.name
        owners = sorted(i for i in self.targets.get(name, {})
                        if core.supervisors.connected(i) and i not in core.supervisors.draining)
        if not owners:
            raise ValueError(f"service {name!r} has no supervisor connected to this router")
        per = self.targets[name]
        candidates: dict[bytes, list[Slot]] = {o: [] for o in owners}
        for slot in sorted(core.registry.slots.values(), key=lambda s: s.sort_key, reverse=True):
            if slot.service == name and slot.owner in candidates and not slot.retiring:
                candidates[slot.owner].append(slot)
        plan = plan_scale(name, {o: per[o] for o in owners}, candidates, workers,
                          svc.settings.min_per_host)
        current = sum(per[o][0] for o in owners)
        retire = [slot for _, slots in plan.values() for slot in slots]
        for owner, (count, _) in plan.items():
            per[owner] = (count, per[owner][1])
        for slot in retire:
            slot.retiring = True
            if slot.conn is not None and slot.state is not WorkerState.DRAINING:
                slot.transition(WorkerState.DRAINING)  # finishes what it holds, then stops
                core.liveness.draining_started()
                svc.remove_conn(slot.conn)
        self.rebalance(svc)
        for owner, (count, slots) in plan.items():
            core.to_backend(owner, Kind.ADMIN, {"op": AdminOp.SCALE, "service": name,
                                                "workers": count, "retire": [s.id for s in slots]})
        ids = [s.id for s in retire]
        split = {o.decode(errors="replace"): count for o, (count, _) in plan.items()}
        log.info("scaling %s from %d to %d workers%s", name, current, workers,
                 f"; retiring {', '.join(ids)}" if ids else "")
        message = (f"{name}: {current} -> {workers} workers"
                   + (f" ({', '.join(f'{o}: {n}' for o, n in split.items())})"
                      if len(split) > 1 else "")
                   + (f"; retiring {', '.join(ids)} (they finish what they hold)" if ids else ""))
        return {"op": "scale", "service": name, "workers": workers, "previous": current,
                "retire": ids, "supervisors": split, "message": message}


def _retire_cost(slot: Slot) -> tuple[int, int]:
    """The cheapest slots to lose first: not running, then serving ones holding the fewest
    requests, then spares (a spare may sit on any supervisor, since promotion ignores
    hosts)."""
    if slot.conn is None:
        return 0, 0
    return (2, 0) if slot.state is WorkerState.SPARE else (1, len(slot.conn.in_flight))


def plan_scale(name: str, per: dict[bytes, tuple[int, int]],
               candidates: dict[bytes, list[Slot]], workers: int,
               min_per_host: int = 0) -> dict[bytes, tuple[int, list[Slot]]]:
    """Split ``workers`` over the supervisors running ``name``: each supervisor's new count
    and the slots it retires.

    ``per``: each supervisor's (workers, spares); ``candidates``: its slots, highest id
    first. Workers are added to the supervisors below ``min_per_host`` first, then where
    there are fewest, and taken where there are most (ties: where it stops the least), so
    hosts stay even. None is taken from a supervisor at ``min_per_host`` or below it (it
    keeps what it has), nor from one that keeps spares and has one worker. Each supervisor
    ends with (its count + its spares) slots: the ones above that retire, cheapest first.
    Raises ValueError when ``workers`` cannot be met."""
    owners = list(per)
    counts = {o: per[o][0] for o in owners}
    spares = {o: per[o][1] for o in owners}
    floor = {o: max(1 if spares[o] else 0, min(min_per_host, counts[o])) for o in owners}
    held = sum(floor.values())
    if workers < held:
        if any(floor[o] > (1 if spares[o] else 0) for o in owners):
            raise ValueError(f"service {name!r} keeps min_per_host={min_per_host} on each "
                             f"supervisor that has them: it needs at least {held} workers")
        if held == 1:
            raise ValueError(f"service {name!r} keeps {max(spares.values())} spares: it "
                             "needs at least one worker")
        raise ValueError(f"service {name!r} keeps spares on {held} supervisors: it needs "
                         f"at least {held} workers")
    ordered = {o: sorted(candidates[o], key=_retire_cost) for o in owners}

    def excess(o: bytes, count: int) -> int:
        return max(0, len(ordered[o]) - count - spares[o])

    def loss(o: bytes) -> tuple[int, ...]:
        """What one worker fewer on ``o`` stops: nothing (it runs fewer slots than its
        count), else its next slot in cost order."""
        k = excess(o, counts[o] - 1)
        return (0,) if k == 0 else (1, *_retire_cost(ordered[o][k - 1]))

    while sum(counts.values()) < workers:
        counts[min(owners, key=lambda o: (counts[o] >= min_per_host, counts[o]))] += 1
    while sum(counts.values()) > workers:
        owner = max((o for o in owners if counts[o] > floor[o]),
                    key=lambda o: (counts[o], tuple(-x for x in loss(o))))
        counts[owner] -= 1
    return {o: (counts[o], ordered[o][:excess(o, counts[o])]) for o in owners}
