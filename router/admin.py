"""Operator commands from clients (ADMIN): restart or drain a worker, scale a service.

The router checks the command and answers it; the supervisor that runs the worker carries
it out (router -> supervisor ADMIN), and reports the outcome with SLOT events like any
other process event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgpack

from ipc.errors import AdminError, ProtocolError
from ipc.lifecycle import AdminOp, WorkerState
from ipc.protocol import Kind
from router.supervisors import MAX_WORKERS, worker_count

if TYPE_CHECKING:
    from router.core import RouterCore

CLIENT_OPS = AdminOp.from_client()


def on_admin(core: RouterCore, client: bytes, client_rid: int, meta: dict) -> None:
    """Carry out one client ADMIN message and answer it (RESULT or ERROR)."""
    try:
        body = _carry_out(core, meta)
    except AdminError as err:
        core.reply_error(client, client_rid, err)
    except ProtocolError as err:
        core.reply_error(client, client_rid, err)
    else:
        core.to_client(client, Kind.RESULT, client_rid, b"", msgpack.packb(body))


def _carry_out(core: RouterCore, meta: dict) -> dict:
    op = meta.get("op")
    if op not in CLIENT_OPS:
        raise ProtocolError(f"unknown admin op {op!r}; ops: {', '.join(CLIENT_OPS)}",
                            code="bad-meta")
    if op == AdminOp.SCALE:
        return _scale(core, meta)
    registry = core.registry
    slot_id = meta.get("worker")
    slot = registry.slots.get(slot_id) if isinstance(slot_id, str) else None
    if slot is None:
        raise AdminError(f"no worker {slot_id!r}; workers: "
                         f"{', '.join(sorted(registry.slots)) or 'none'}")
    if not core.supervisors.connected(slot.owner):
        raise AdminError(f"worker {slot.id} has no supervisor connected to this router")
    if op == AdminOp.DRAIN:
        if slot.conn is None or slot.state is WorkerState.DRAINING:
            raise AdminError(f"worker {slot.id} is {slot.state}: only a registered worker drains")
        # No new work from now on; what it holds finishes, then it is told to stop
        # (Liveness.stop_drained_workers), and its supervisor will not respawn it.
        slot.transition(WorkerState.DRAINING)
        core.liveness.draining_started()
        core.scaling.unroute(slot.conn)
    if op == AdminOp.RESTART and slot.conn is not None:
        slot.restart_pending = True  # its GOODBYE means "coming back", not "gone"
    core.to_backend(slot.owner, Kind.ADMIN, {"op": op, "slot": slot.id})
    return {"op": op, "worker": slot.id, "state": str(slot.state),
            "message": f"{op} of {slot.id} sent to its supervisor"}


def _scale(core: RouterCore, meta: dict) -> dict:
    name, workers = meta.get("service"), meta.get("workers")
    svc = core.services.get(name) if isinstance(name, str) else None
    if svc is None:
        raise AdminError(f"no service {name!r}; services: "
                         f"{', '.join(sorted(core.services)) or 'none'}")
    try:
        worker_count(workers)
    except ValueError:
        raise AdminError(f"workers must be an integer in 0..{MAX_WORKERS}, "
                         f"got {workers!r}") from None
    try:
        return core.scaling.scale(svc, workers)
    except ValueError as exc:
        raise AdminError(str(exc)) from None
