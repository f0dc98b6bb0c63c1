"""Backend identity: a worker's slot and incarnation count only when its supervisor vouched
for them, and only a slot's own supervisor reports its events (router.vouching). Each test
plays a rogue backend peer against the router's core with a fake clock."""

from __future__ import annotations

import pytest

from ipc.lifecycle import WorkerState
from ipc.protocol import Kind
from router import vouching
from tests.router_harness import Harness
from workerpool.config import TIMINGS

C = b"client-1"


def _ready(h: Harness, ident: bytes, slot: str, incarnation: int, pid: int = 4242,
           service: str = "default") -> None:
    h.backend(ident, Kind.READY, {"slot": slot, "incarnation": incarnation, "service": service,
                                  "capacity": 1, "pid": pid, "methods": ["echo"]})


def _wait_beating(h: Harness, seconds: float, *workers: bytes) -> None:
    """Let ``seconds`` pass with the supervisor and ``workers`` beating as they do."""
    while seconds > 0:
        step = min(0.5, seconds)
        h.backend(b"sup", Kind.HEARTBEAT, {})
        for ident in workers:
            h.backend(ident + b"#hb", Kind.HEARTBEAT, {"of": ident})
        h.tick(step)
        seconds -= step


def test_a_ready_claiming_a_huge_incarnation_takes_nothing_and_locks_nobody_out():
    h = Harness()
    h.hello(workers=1)
    real = h.ready("default/0")
    _ready(h, b"rogue", "default/0", 2**62)
    for rid in range(1, 21):
        h.request(C, rid)
    assert h.dispatched_to(b"rogue") == []
    slot = h.core.registry.slots["default/0"]
    assert slot.conn.identity == real and slot.incarnation == 1
    _wait_beating(h, TIMINGS.vouch_wait + 0.1, real)
    assert len(h.core.registry.waiting) == 0 and h.core.stats["unvouched_ready"] == 1
    # The real worker dies; its respawn is not refused as stale.
    h.slot_event("default/0", "died", reason="was killed by SIGKILL")
    h.tick(0.01)
    again = h.ready("default/0", incarnation=2)
    assert slot.conn.identity == again and h.dispatched_to(again)  # it took the queue


def test_a_ready_that_overtakes_its_vouch_waits_for_it():
    h = Harness()
    h.hello(workers=1)
    ident = h.ready("default/0", vouch=False)
    assert h.core.registry.slots["default/0"].conn is None  # not vouched for yet
    h.request(C, 1)
    h.slot_event("default/0", "started", incarnation=1, pid=1001)
    assert h.core.registry.slots["default/0"].conn.identity == ident
    assert h.dispatched_to(ident)  # the queued request went to it at once


def test_a_pid_other_than_the_vouched_one_is_not_accepted():
    h = Harness()
    h.hello(workers=1)
    h.slot_event("default/0", "started", incarnation=1, pid=7)
    _ready(h, b"default/0#1", "default/0", 1, pid=8)
    assert h.core.registry.slots["default/0"].conn is None


def test_a_ready_for_a_slot_no_supervisor_described_creates_nothing():
    h = Harness()
    h.hello(workers=1)
    _ready(h, b"rogue", "other/0", 1, service="other")
    h.tick(TIMINGS.vouch_wait + 0.1)
    assert "other/0" not in h.core.registry.slots and "other" not in h.core.services
    assert b"rogue" not in h.core.registry.conns


def test_a_restarted_router_takes_a_worker_its_supervisors_hello_vouches_for():
    h = Harness()  # a fresh router: the worker's READY comes before the supervisor's HELLO
    _ready(h, b"default/0#3", "default/0", 3, pid=77)
    assert not h.core.registry.conns
    h.backend(b"sup", Kind.HELLO, {"services": [{"name": "default", "workers": 1}],
                                   "slots": [{"slot": "default/0", "service": "default",
                                              "incarnation": 3, "pid": 77}]})
    conn = h.core.registry.conns[b"default/0#3"]
    assert conn.slot.incarnation == 3 and conn.slot.state is WorkerState.READY


def test_waiting_readies_are_bounded():
    h = Harness()
    h.hello(workers=1)
    for i in range(vouching.MAX_WAITING * 4):
        _ready(h, f"rogue-{i}".encode(), f"default/{i}", 1)
    assert len(h.core.registry.waiting) == vouching.MAX_WAITING
    assert h.core.stats["unvouched_ready"] == vouching.MAX_WAITING * 3


def test_slot_events_only_from_the_slots_supervisor():
    h = Harness()
    h.hello(workers=1)
    ident = h.ready("default/0")
    h.slot_event("default/0", "failed", sup=b"rogue", reason="forged")
    h.slot_event("default/0", "died", sup=b"rogue", reason="forged")
    h.tick(0.01)
    slot = h.core.registry.slots["default/0"]
    assert slot.state is WorkerState.READY and slot.conn.identity == ident
    assert h.core.stats["slot_events_not_owner"] == 2
    # A slot nobody described is not created by a peer that never said HELLO either.
    h.slot_event("ghost/0", "started", sup=b"rogue")
    assert "ghost/0" not in h.core.registry.slots


def test_drain_only_from_a_supervisor():
    h = Harness()
    h.hello(workers=1)
    h.ready("default/0")
    h.backend(b"rogue", Kind.DRAIN, {})
    h.backend(b"rogue", Kind.DRAIN, {"scope": "supervisor"})
    assert not h.core.draining and not h.core.supervisors.draining
    assert h.core.stats["drains_refused"] == 2
    h.backend(b"sup", Kind.DRAIN, {})
    assert h.core.draining


def test_heartbeats_count_only_from_the_workers_own_heartbeat_socket():
    h = Harness()
    h.hello(workers=1)
    ident = h.ready("default/0")
    conn = h.core.registry.conns[ident]
    h.tick(1.0)
    before = conn.last_beat
    h.backend(b"rogue", Kind.HEARTBEAT, {"of": ident})
    assert conn.last_beat == before and h.core.stats["heartbeats_refused"] == 1
    h.backend(ident + b"#hb", Kind.HEARTBEAT, {"of": ident})
    assert conn.last_beat > before


def test_a_setup_failure_that_overtakes_the_hello_waits_for_the_vouch():
    """The worker's socket may connect before its supervisor's: its setup-failed GOODBYE,
    with the traceback, comes before the router knows the slot at all."""
    h = Harness()
    h.backend(b"default/0#1", Kind.GOODBYE, {"reason": "setup-failed", "slot": "default/0",
                                             "error": "ImportError: no cupy"})
    h.hello(workers=1)
    assert h.core.registry.slots["default/0"].setup_error is None  # not vouched yet
    h.slot_event("default/0", "started", incarnation=1, pid=1001)
    h.slot_event("default/0", "failed", reason="setup() failed; process exited with code 78")
    slot = h.core.registry.slots["default/0"]
    assert slot.setup_error == "ImportError: no cupy"
    assert slot.last_error == "setup() failed; process exited with code 78\nImportError: no cupy"


def test_a_setup_failure_is_recorded_only_from_the_vouched_incarnation():
    h = Harness()
    h.hello(workers=1)
    h.slot_event("default/0", "started", incarnation=1, pid=1001)
    h.backend(b"rogue", Kind.GOODBYE, {"reason": "setup-failed", "slot": "default/0",
                                       "error": "forged"})
    assert h.core.registry.slots["default/0"].setup_error is None
    h.backend(b"default/0#1", Kind.GOODBYE, {"reason": "setup-failed", "slot": "default/0",
                                             "error": "ImportError: no torch"})
    assert h.core.registry.slots["default/0"].setup_error == "ImportError: no torch"


@pytest.mark.parametrize("notice_first", [False, True], ids=["goodbye-first", "notice-first"])
def test_a_setup_failure_keeps_its_reason_and_its_traceback_in_either_order(notice_first):
    """The worker's GOODBYE (the traceback) and its supervisor's SLOT failed (the reason)
    travel on two connections; under load the notice can come first. Either way the slot
    ends failed with the reason, then the traceback."""
    h = Harness()
    h.hello(workers=1)
    h.slot_event("default/0", "started", incarnation=1, pid=1001)
    reason = "setup() failed; process exited with code 78"
    messages = [
        lambda: h.backend(b"default/0#1", Kind.GOODBYE, {
            "reason": "setup-failed", "slot": "default/0",
            "error": "Traceback ...\nFileNotFoundError: weights not found"}),
        lambda: h.slot_event("default/0", "failed", reason=reason),
    ]
    for message in reversed(messages) if notice_first else messages:
        message()
    row = h.core.registry.slots["default/0"].row(h.clock())
    assert row["state"] == "failed"
    assert row["last_error"] == f"{reason}\nTraceback ...\nFileNotFoundError: weights not found"
