"""The supervisor's slot state machine and respawn policy, with plain values and a fake
clock: no processes, no sockets (workerpool/respawn.py)."""

from __future__ import annotations

import pytest

from ipc.errors import IllegalTransition
from ipc.lifecycle import SlotEvent, WorkerState
from workerpool._proc import EXIT_SETUP_FAILED
from workerpool.config import SupervisorConfig
from workerpool.respawn import Action, Next, SlotLife

S = WorkerState
KILLED = -9
CFG = SupervisorConfig(restart_backoff=0.5, restart_backoff_max=4.0, stable_after=10.0,
                       max_restarts=3, restart_window=60.0)


def ready_slot(now: float = 0.0, cfg: SupervisorConfig = CFG) -> SlotLife:
    life = SlotLife("default/0", cfg)
    life.registered_now(life.spawned(now))
    return life


def events(end) -> list[SlotEvent]:
    return [event for event, _ in end.events]


def test_a_slot_starts_registers_and_respawns_under_a_new_incarnation():
    life = SlotLife("default/0", CFG)
    assert (life.state, life.incarnation, life.running) == (S.STOPPED, 0, False)
    assert life.spawned(now=1.0) == 1 and life.state is S.STARTING and life.running
    assert not life.registered
    assert life.registered_now(1) and life.state is S.READY and life.registered
    assert not life.registered_now(1)  # the router confirming again after a HELLO
    end = life.exited(KILLED, "was killed by SIGKILL", now=2.0)
    assert (end.next, events(end), end.delay) == (Next.BACKOFF, [SlotEvent.DIED], 0.5)
    assert life.state is S.DEAD and not life.running and not life.registered
    assert life.spawned(now=2.5) == 2 and life.state is S.RESTARTING
    assert not life.registered_now(1)  # a stale incarnation's READY
    assert life.registered_now(2) and life.state is S.READY


def test_the_backoff_doubles_up_to_its_cap_and_resets_after_a_stable_run():
    cfg = SupervisorConfig(restart_backoff=0.5, restart_backoff_max=4.0, stable_after=10.0,
                           max_restarts=100, restart_window=60.0)
    life, now, delays = ready_slot(cfg=cfg), 0.0, []
    for _ in range(6):
        now += 1
        delays.append(life.exited(1, "exited with code 1", now).delay)
        life.spawned(now)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    now += 10  # up for stable_after: the next death starts the backoff again
    assert life.exited(1, "exited with code 1", now).delay == 0.5


def test_a_crash_loop_marks_the_slot_failed_after_max_restarts_within_the_window():
    life, now = ready_slot(), 0.0
    for _ in range(3):  # max_restarts=3 respawns are allowed...
        now += 1
        assert life.exited(KILLED, "was killed by SIGKILL", now).next is Next.BACKOFF
        life.spawned(now)
    end = life.exited(KILLED, "was killed by SIGKILL", now + 1)  # ...the 4th death is one too many
    assert end.next is Next.FAIL and life.state is S.FAILED
    assert events(end) == [SlotEvent.DIED, SlotEvent.FAILED]
    assert "died 4 times within 60s (max_restarts=3)" in end.why
    assert "workerpool restart default/0" in end.why


def test_deaths_outside_the_window_do_not_count():
    life, now = ready_slot(), 0.0
    for _ in range(10):
        now += 30  # two deaths per restart_window at most
        assert life.exited(KILLED, "was killed by SIGKILL", now).next is Next.BACKOFF
        life.spawned(now)
    assert len(life.deaths) == 3  # now, now-30 and now-60: still within the window


def test_an_operator_restart_respawns_at_once_without_counting_a_death():
    life = ready_slot()
    assert life.restart() is Action.TERMINATE and life.state is S.RESTARTING
    assert life.registered  # it still serves what it holds until it exits
    end = life.exited(0, "exited with code 0", now=1.0)
    assert end.next is Next.RESPAWN and end.events == ((SlotEvent.DIED,
                                                        "restarted (exited with code 0)"),)
    assert not life.deaths and life.failures == 0
    life.spawned(now=1.0)
    assert life.state is S.RESTARTING and life.registered_now(2) and life.state is S.READY
    # The next death of the new incarnation is an ordinary one again.
    assert life.exited(KILLED, "was killed by SIGKILL", now=2.0).next is Next.BACKOFF


def test_a_restart_leaving_before_it_registered_is_still_a_restart():
    life = SlotLife("default/0", CFG)
    life.spawned(0.0)
    assert life.restart() is Action.TERMINATE and life.state is S.RESTARTING
    assert life.registered_now(1) and life.state is S.RESTARTING  # registered, still leaving
    assert life.exited(0, "exited with code 0", now=1.0).next is Next.RESPAWN


def test_a_restart_forgets_the_deaths_and_brings_a_failed_or_dead_slot_back():
    life, now = ready_slot(), 0.0
    for _ in range(4):
        now += 1
        life.exited(KILLED, "was killed by SIGKILL", now)
        if life.state is S.DEAD:
            life.spawned(now)
    assert life.state is S.FAILED
    assert life.restart() is Action.SPAWN and not life.deaths and life.failures == 0
    life.spawned(now)
    assert life.state is S.RESTARTING
    life.exited(KILLED, "was killed by SIGKILL", now + 1)
    assert life.state is S.DEAD and life.restart() is Action.SPAWN  # no need to wait


def test_a_drained_slot_is_not_respawned_but_a_crash_during_the_drain_is():
    life = ready_slot()
    assert life.drain() and life.state is S.DRAINING
    end = life.exited(0, "exited with code 0", now=1.0)
    assert (end.next, events(end), life.state) == (Next.STOP, [SlotEvent.STOPPED], S.STOPPED)
    assert life.restart() is Action.SPAWN  # `workerpool restart` brings it back
    life.spawned(2.0)
    life.registered_now(2)
    assert life.drain()
    assert life.exited(KILLED, "was killed by SIGKILL", now=3.0).next is Next.BACKOFF


def test_a_drain_during_an_operator_restart_wins_and_a_later_restart_wins_again():
    """Restart, then drain, before the process has left: it is not replaced (the router
    drained it and shows it stopped). A restart after that drain replaces it again."""
    life = ready_slot()
    assert life.restart() is Action.TERMINATE
    assert life.drain()
    end = life.exited(0, "exited with code 0", now=1.0)
    assert (end.next, events(end), life.state) == (Next.STOP, [SlotEvent.STOPPED], S.STOPPED)
    life = ready_slot()
    life.restart()
    life.drain()
    assert life.restart() is Action.TERMINATE
    assert life.exited(0, "exited with code 0", now=1.0).next is Next.RESPAWN

def test_a_drain_that_finds_no_registered_process_is_refused():
    life = SlotLife("default/0", CFG)
    life.spawned(0.0)
    assert not life.drain() and life.state is S.STARTING  # the router drains registered ones
    life.registered_now(1)
    life.exited(KILLED, "was killed by SIGKILL", now=1.0)
    assert not life.drain() and life.state is S.DEAD  # it died meanwhile: respawn as planned


def test_a_retiring_slot_is_removed_when_it_exits_however_it_exits():
    for rc in (0, KILLED):
        life = ready_slot()
        assert life.retire() is Action.NOTHING and life.state is S.DRAINING  # router drains it
        end = life.exited(rc, "how", now=1.0)
        assert end.next is Next.REMOVE and events(end) == [SlotEvent.REMOVED]
        assert end.events[0][1] == "scaled away; process how"


def test_retiring_a_slot_that_never_registered_stops_it_and_one_without_a_process_leaves():
    life = SlotLife("default/0", CFG)
    life.spawned(0.0)
    assert life.retire() is Action.TERMINATE and life.state is S.STARTING and life.retiring
    assert life.exited(0, "exited with code 0", now=1.0).next is Next.REMOVE
    dead = ready_slot()
    dead.exited(KILLED, "was killed by SIGKILL", now=1.0)
    assert dead.retire() is Action.REMOVE and dead.state is S.STOPPED


def test_while_the_pool_stops_nothing_is_respawned():
    life = ready_slot()
    end = life.exited(0, "exited with code 0", now=1.0, stopping=True)
    assert (end.next, events(end), life.state) == (Next.STOP, [SlotEvent.STOPPED], S.STOPPED)
    life = ready_slot()
    end = life.exited(KILLED, "was killed by SIGKILL", now=1.0, stopping=True)
    assert (end.next, events(end)) == (Next.STOP, [SlotEvent.DIED])
    life = ready_slot()
    life.retire()
    assert life.exited(0, "exited with code 0", 1.0, stopping=True).next is Next.STOP


def test_exit_78_means_setup_failed_only_before_the_worker_registered():
    life = SlotLife("default/0", CFG)
    life.spawned(0.0)
    end = life.exited(EXIT_SETUP_FAILED, "exited with code 78", now=1.0)
    assert (end.next, events(end), life.state) == (Next.FAIL, [SlotEvent.FAILED], S.FAILED)
    assert end.events[0][1] == "setup() failed; process exited with code 78"
    assert "failed in setup()" in end.why
    life = ready_slot()
    assert life.exited(EXIT_SETUP_FAILED, "exited with code 78", 1.0).next is Next.BACKOFF


def test_an_illegal_transition_raises_and_keeps_the_state():
    life = SlotLife("default/0", CFG)
    life.spawned(0.0)
    with pytest.raises(IllegalTransition, match="starting -> draining"):
        life.transition(S.DRAINING)
    assert life.state is S.STARTING
    with pytest.raises(IllegalTransition):
        life.spawned(1.0)  # a second process while one runs
    life.exited(KILLED, "was killed by SIGKILL", 1.0)
    with pytest.raises(IllegalTransition):
        life.exited(KILLED, "was killed by SIGKILL", 2.0)  # no process to exit
