"""One vocabulary for a worker's life, shared by the router, the supervisor and the worker.

A worker *slot* (``default/2``) moves through ``WorkerState``; only the moves in ``LEGAL``
are allowed, and ``check`` is the one place that says so. The supervisor reports what
happened to a slot's process with a ``SlotEvent``, the router asks for things with an
``AdminOp``, and a worker says why it leaves with a ``GoodbyeReason``. Each enum's values
are the strings that travel in the meta of SLOT, ADMIN and GOODBYE (docs/protocol.md).
"""

from __future__ import annotations

import enum

from ipc.errors import IllegalTransition


class WorkerState(enum.StrEnum):
    """A slot's state, as ``workerpool status`` shows it."""

    STARTING = "starting"  # process spawned, not yet registered
    READY = "ready"  # registered, nothing in flight
    BUSY = "busy"  # registered, at least one request in flight
    DEAD = "dead"  # process gone; its requests were answered; respawn pending
    RESTARTING = "restarting"  # replacement spawned, not yet registered
    FAILED = "failed"  # will not be respawned (setup failed, host lost); see last_error
    STOPPED = "stopped"  # left on purpose (shutdown, drain)
    DRAINING = "draining"  # takes no new work; finishes what it holds, then stops
    SPARE = "spare"  # registered and set up, held back idle until a worker is lost


S = WorkerState
LEGAL: dict[WorkerState, frozenset[WorkerState]] = {
    S.STARTING: frozenset({S.READY, S.SPARE, S.DEAD, S.FAILED, S.STOPPED, S.RESTARTING}),
    S.RESTARTING: frozenset({S.READY, S.SPARE, S.DEAD, S.FAILED, S.STOPPED}),
    S.READY: frozenset({S.BUSY, S.SPARE, S.DEAD, S.STOPPED, S.RESTARTING, S.FAILED,
                        S.DRAINING}),
    S.BUSY: frozenset({S.READY, S.DEAD, S.STOPPED, S.RESTARTING, S.FAILED, S.DRAINING}),
    S.SPARE: frozenset({S.READY, S.DEAD, S.STOPPED, S.RESTARTING, S.FAILED, S.DRAINING}),
    S.DRAINING: frozenset({S.STOPPED, S.DEAD, S.FAILED, S.RESTARTING}),
    S.DEAD: frozenset({S.RESTARTING, S.FAILED, S.STOPPED, S.READY, S.SPARE}),
    S.FAILED: frozenset({S.RESTARTING, S.STOPPED, S.READY, S.SPARE}),
    S.STOPPED: frozenset({S.STARTING, S.RESTARTING, S.READY, S.SPARE}),
}
"""From each state, the states a slot may move to."""

LIVE = frozenset({S.STARTING, S.RESTARTING, S.DEAD, S.READY, S.BUSY, S.SPARE})
"""States of a slot that serves or is expected back (starting, or respawning)."""


def check(who: str, old: WorkerState, new: WorkerState) -> WorkerState:
    """``new`` if ``old -> new`` is legal (or no move at all), else IllegalTransition."""
    if new is not old and new not in LEGAL[old]:
        raise IllegalTransition(f"worker {who}: {old} -> {new} is not allowed")
    return new


class SlotEvent(enum.StrEnum):
    """SLOT ``event``: what happened to a slot's process (supervisor -> router)."""

    STARTED = "started"  # a new incarnation was spawned
    DIED = "died"  # it exited abnormally, or was killed; a respawn follows
    FAILED = "failed"  # it will not be respawned (setup failed, or crash loop)
    STOPPED = "stopped"  # it exited cleanly on request
    REMOVED = "removed"  # scaled away: the slot leaves the table


class AdminOp(enum.StrEnum):
    """ADMIN ``op``: operator commands (client -> router) and the router's requests to a
    supervisor (router -> supervisor)."""

    RESTART = "restart"
    DRAIN = "drain"
    SCALE = "scale"
    KILL = "kill"  # router -> supervisor only: the worker hangs

    @classmethod
    def from_client(cls) -> tuple[AdminOp, ...]:
        """The operations a client may ask for."""
        return (cls.RESTART, cls.DRAIN, cls.SCALE)


class GoodbyeReason(enum.StrEnum):
    """GOODBYE ``reason``: why a worker leaves on purpose (worker -> router)."""

    STOPPED = "stopped"  # told to stop (SHUTDOWN, SIGTERM), and stopped cleanly
    SETUP_FAILED = "setup-failed"  # its handler's setup() raised; ``error`` says how
    CONTEXT_POISONED = "context-poisoned"  # a sticky CUDA error: replace me
