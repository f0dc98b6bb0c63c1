"""The STATUS reply: the router's, each service's, each worker's and each node's
figures as one map (docs/protocol.md, section 6, defines every field)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ipc import protocol
from ipc.lifecycle import WorkerState
from router.health import Slot
from router.service import Service

if TYPE_CHECKING:
    from router.core import RouterCore


def status(core: RouterCore) -> dict:
    now = core.clock()
    return {
        "router": {
            "pid": os.getpid(),
            "version": protocol.VERSION,
            "frontend": core.addresses[0],
            "backend": core.addresses[1],
            "uptime": round(now - core.started, 3),
            "draining": core.draining,
            "requests": len(core.requests),
            "clients": len(core.requests.per_client),
            "clients_cut_off": len(core.clients.cut_off_until),
            "supervisors": len(core.supervisors.known),
            "counters": dict(core.stats),
        },
        "services": [_service_row(core, s) for s in sorted(core.services.values(),
                                                           key=lambda s: s.name)],
        "workers": [_worker_row(core, s, now) for s in sorted(core.registry.slots.values(),
                                                             key=lambda s: s.sort_key)],
        "nodes": core.supervisors.rows(now),
    }


def _worker_row(core: RouterCore, slot: Slot, now: float) -> dict:
    row = slot.row(now)
    row["node"], row["host"] = core.supervisors.placement(slot.owner)
    return row


def _service_row(core: RouterCore, svc: Service) -> dict:
    row = svc.row()
    row["spares"] = sum(1 for s in core.registry.slots.values()
                        if s.service == svc.name and s.state is WorkerState.SPARE)
    row["target_workers"] = core.scaling.active_target(svc.name)
    # The mean over its serving workers: what the service's GPUs are doing now.
    busy = [u for c in svc.conns if (u := c.busy.recent()) is not None]
    row["utilization"] = round(sum(busy) / len(busy), 3) if busy else None
    return row
