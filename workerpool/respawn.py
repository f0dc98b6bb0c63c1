"""A worker slot's life in the supervisor, and what happens when its process exits.

::

    supervisor loop --spawned / registered / drain / restart / retire--> SlotLife --> Action
    supervisor loop --exited(rc, how, now, stopping)-------------------> SlotLife --> Exit
                    <-- spawn, SIGTERM, remove; SLOT events for the router; respawn delay --

No processes, sockets or clock here: ``workerpool/supervisor.py`` spawns, signals and
reaps, passes the time in, and carries out what comes back, so the respawn policy is
tested with plain values and a fake clock (``tests/test_respawn.py``).

A slot's state is an ``ipc.lifecycle.WorkerState``, the router's vocabulary, changed only
through ``SlotLife.transition`` (an illegal move raises ``IllegalTransition``). The
supervisor uses the states that say something about a process (``busy`` and ``spare`` are
the router's business):

============== ======= =====================================================================
state          process meaning in the supervisor
============== ======= =====================================================================
``stopped``    none    not started yet, or left on purpose (drained, the pool stopping)
``starting``   running the first incarnation, not registered with the router yet
``restarting`` running a later incarnation, not registered yet; or one leaving (SIGTERM)
                       for an operator's restart, replaced at once when it exits (not
                       replaced if an operator drained it meanwhile and it exits cleanly)
``ready``      running registered with the router
``draining``   running registered, and not respawned once it exits cleanly (operator
                       drain, or scaled away)
``dead``       none    exited unasked: respawned after a backoff
``failed``     none    not respawned until an operator's restart: setup() failed, or it
                       died more than ``max_restarts`` times within ``restart_window``
============== ======= =====================================================================
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from ipc.errors import IllegalTransition
from ipc.lifecycle import SlotEvent, WorkerState, check
from workerpool._proc import EXIT_SETUP_FAILED
from workerpool.config import SupervisorConfig

S = WorkerState
RUNNING = frozenset({S.STARTING, S.RESTARTING, S.READY, S.DRAINING})
"""The states in which the slot has a process (the supervisor holds its pidfd)."""


class Action(enum.Enum):
    """What the supervisor does after an operator's request or a scale."""

    NOTHING = "nothing"
    SPAWN = "spawn"  # start a new incarnation now
    TERMINATE = "terminate"  # SIGTERM the process: it finishes what it holds, then exits
    REMOVE = "remove"  # forget the slot and tell the router (SLOT removed)


class Next(enum.Enum):
    """What becomes of a slot whose process exited."""

    REMOVE = "remove"  # scaled away: the slot leaves (SLOT removed)
    STOP = "stop"  # it left on purpose (or the pool is stopping): not respawned
    RESPAWN = "respawn"  # an operator's restart: its successor starts at once
    BACKOFF = "backoff"  # it died: respawned after ``Exit.delay`` seconds
    FAIL = "fail"  # not respawned until an operator's restart


@dataclass(frozen=True)
class Exit:
    """The decision about an exited process: what next, and what to tell the router."""

    next: Next
    events: tuple[tuple[SlotEvent, str], ...]  # SLOT events to send, in order, with reasons
    delay: float = 0.0  # BACKOFF: seconds from the death to the respawn
    why: str = ""  # FAIL: why it is not respawned, for the log


@dataclass
class SlotLife:
    """One slot's state, incarnation and recent deaths; every change goes through here."""

    slot: str
    config: SupervisorConfig = field(default_factory=SupervisorConfig)
    state: WorkerState = S.STOPPED
    incarnation: int = 0  # of the current (or last) process; 0 before the first spawn
    retiring: bool = False  # scaled away: the slot leaves when its process ends
    started_at: float = 0.0
    died_at: float = 0.0
    failures: int = 0  # consecutive short-lived incarnations, for the backoff
    deaths: deque[float] = field(default_factory=deque)  # unasked deaths within the window
    # Facts about one incarnation, kept by number so that a new spawn makes them stale:
    _registered: int = 0  # the last incarnation that registered with the router
    _replacing: int = 0  # the incarnation an operator's restart replaces once it exits
    _drained: int = 0  # the incarnation an operator drained while a restart was replacing it

    def transition(self, new: WorkerState) -> None:
        """Move to ``new``; IllegalTransition if ``ipc.lifecycle.LEGAL`` forbids it."""
        self.state = check(self.slot, self.state, new)

    @property
    def running(self) -> bool:
        return self.state in RUNNING

    @property
    def registered(self) -> bool:
        """The router knows the current incarnation: it registered, and has not died.
        (A process that left on purpose still counts: its slot is not ours to retire.)"""
        return (self._registered == self.incarnation > 0
                and self.state not in (S.DEAD, S.FAILED))

    # -- the process ---------------------------------------------------------------------------
    def spawned(self, now: float) -> int:
        """A new process was started for the slot; returns its incarnation."""
        if self.running:
            raise IllegalTransition(f"worker {self.slot}: spawned while {self.state}")
        self.incarnation += 1
        self.transition(S.STARTING if self.incarnation == 1 else S.RESTARTING)
        self.started_at = now
        return self.incarnation

    def registered_now(self, incarnation: object) -> bool:
        """The router says ``incarnation`` registered. True when that is news about the
        running process; a repeat (after a HELLO) or a stale incarnation is False."""
        if incarnation != self.incarnation or not self.running or self.registered:
            return False
        self._registered = self.incarnation
        if self._replacing != self.incarnation:  # one leaving for a restart stays restarting
            self.transition(S.READY)
        return True

    def exited(self, rc: int, how: str, now: float, stopping: bool = False) -> Exit:
        """The process ended with status ``rc`` (``how`` says how, in words). Decides
        whether the slot leaves, stops, fails or is respawned, and after how long."""
        if not self.running:
            raise IllegalTransition(f"worker {self.slot}: exited while {self.state}")
        setup_failed = rc == EXIT_SETUP_FAILED and not self.registered
        replaced = self._replacing == self.incarnation
        drained = self.state is S.DRAINING or self._drained == self.incarnation
        self.died_at = now
        if self.retiring and not stopping:
            self.transition(S.STOPPED)
            return Exit(Next.REMOVE, ((SlotEvent.REMOVED, f"scaled away; process {how}"),))
        if stopping or (drained and rc == 0):
            # Exiting on request is "stopped"; a crash during the drain is still a crash.
            if rc == 0:
                self.transition(S.STOPPED)
                return Exit(Next.STOP, ((SlotEvent.STOPPED, how),))
            self.transition(S.DEAD)
            return Exit(Next.STOP, ((SlotEvent.DIED, how),))
        if setup_failed:
            # Only before registering does 78 mean "setup() failed": respawning would fail
            # the same way, so the slot is marked failed instead of looping.
            self.transition(S.FAILED)
            return Exit(Next.FAIL, ((SlotEvent.FAILED, f"setup() failed; process {how}"),),
                        why="failed in setup(); not respawning it")
        if replaced:  # an operator's restart: no backoff, and not counted as a death
            self.transition(S.DEAD)
            return Exit(Next.RESPAWN, ((SlotEvent.DIED, f"restarted ({how})"),))
        cfg = self.config
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - cfg.restart_window:
            self.deaths.popleft()
        if len(self.deaths) > cfg.max_restarts:
            self.transition(S.FAILED)
            why = (f"{how}; died {len(self.deaths)} times within {cfg.restart_window:g}s "
                   f"(max_restarts={cfg.max_restarts}): not respawned; "
                   f"reset with `workerpool restart {self.slot}`")
            return Exit(Next.FAIL, ((SlotEvent.DIED, how), (SlotEvent.FAILED, why)), why=why)
        if now - self.started_at >= cfg.stable_after:
            self.failures = 0  # it had stayed up: this is not a crash loop
        delay = min(cfg.restart_backoff * (2 ** self.failures), cfg.restart_backoff_max)
        self.failures += 1
        self.transition(S.DEAD)
        return Exit(Next.BACKOFF, ((SlotEvent.DIED, how),), delay=delay)

    # -- requests ------------------------------------------------------------------------------
    def restart(self) -> Action:
        """An operator's restart: the deaths are forgotten. A running process is asked to
        leave and replaced at once when it exits; a slot without one starts now."""
        self.deaths.clear()
        self.failures = 0
        self._drained = 0  # a restart after a drain brings the slot back
        if not self.running:
            return Action.SPAWN
        self.transition(S.RESTARTING)
        self._replacing = self.incarnation
        return Action.TERMINATE

    def drain(self) -> bool:
        """An operator's drain: a registered process is not respawned once it exits
        cleanly. False when there is nothing to drain (the router drains registered
        workers only, so this is a race: the process died, or has not registered). A
        drain while an operator's restart is replacing the process wins: it exits and is
        not replaced (the router saw it drain, then stop)."""
        if self.state is S.READY:
            self.transition(S.DRAINING)
        elif self.state is S.RESTARTING and self._replacing == self.incarnation:
            self._drained = self.incarnation
            return True
        return self.state is S.DRAINING

    def retire(self) -> Action:
        """Scaled away: a slot with no process leaves at once, one that never registered
        is stopped (nothing to drain), a registered one drains at the router, which then
        tells it to stop."""
        self.retiring = True
        if not self.running:
            self.transition(S.STOPPED)
            return Action.REMOVE
        if not self.registered:
            return Action.TERMINATE
        if self.state is S.READY:
            self.transition(S.DRAINING)
        return Action.NOTHING
