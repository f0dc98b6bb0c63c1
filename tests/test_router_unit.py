"""Router internals that are hard to reach from outside: bounded queue memory and the
re-queue of a request whose worker vanished between pick and send."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from router.health import Conn
from router.requests import Phase, Record
from router.router import Router
from router.service import Service, ServiceSettings
from workerpool.config import RouterConfig

SETTINGS = ServiceSettings("least-loaded", 100, 1, "queue", 30.0)


def _rec(rid: int, priority: int = 0) -> Record:
    return Record(rid, b"client", rid, "default", "echo", b"", b"", [], None, 0.0, priority)


def test_queue_heaps_stay_bounded_when_traffic_flows_through():
    svc = Service("default", SETTINGS)
    rid = 0
    for _ in range(50):
        rid += 1
        svc.enqueue(_rec(rid))
    for _ in range(100_000):
        rid += 1
        svc.enqueue(_rec(rid, priority=rid % 3))
        rec = svc.dequeue()
        rec.phase = Phase.DONE
        svc.eviction_candidate(0)
    assert svc.queued == 50
    assert len(svc._heap) <= 2 * 50 + 64 + 1
    assert len(svc._low) <= 2 * 50 + 64 + 1


def test_queue_heaps_stay_bounded_when_queued_requests_time_out():
    svc = Service("default", SETTINGS)
    for rid in range(1, 10_001):
        rec = _rec(rid)
        svc.enqueue(rec)
        if rid % 2:
            rec.phase = Phase.DONE  # finished in place (timeout, cancel)
            svc.forget_queued()
    assert svc.queued == 5000
    assert len(svc._heap) <= 2 * 5000 + 64 + 1 and len(svc._low) <= 2 * 5000 + 64 + 1


@pytest.fixture
def router():
    tmp = tempfile.mkdtemp(prefix="wpr-")
    r = Router(RouterConfig(frontend=f"ipc://{tmp}/f", backend=f"ipc://{tmp}/b"))
    try:
        yield r
    finally:
        r.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_unroutable_dispatch_requeues_the_request_in_place(router):
    svc = router._service("default")
    slot = router._slot("default/0", "default", "cpu")
    ghost = Conn(b"default/0#1", slot, 1, 12345, 1, frozenset({"echo"}))
    slot.conn = ghost
    router.conns[ghost.identity] = ghost
    svc.add_conn(ghost)
    rec = _rec(7)
    router.records[rec.rid] = rec
    router._dispatch(rec, ghost)  # nobody is connected with that identity
    assert rec.phase is Phase.QUEUED and svc.queued == 1
    assert ghost not in svc.conns  # quarantined: no more dispatches to it
    assert svc.dequeue() is rec
    assert router.stats["dispatch_unroutable"] == 1
    assert router.stats["internal_errors"] == 0


def _ready(router, slot: str, pid: int) -> None:
    router._on_ready(f"{slot}#1".encode(), {"slot": slot, "incarnation": 1, "service": "default",
                                             "capacity": 1, "pid": pid, "methods": ["echo"]})


def test_spares_are_held_back_and_promoted_when_a_worker_is_lost(router):
    slots = [{"slot": f"default/{i}", "service": "default"} for i in range(3)]
    router._on_hello(b"sup", {"services": [{"name": "default", "workers": 2, "spares": 1}],
                              "slots": slots})
    for i in range(3):
        _ready(router, f"default/{i}", 100 + i)
    states = {s.id: s.state.value for s in router.slots.values()}
    assert states == {"default/0": "ready", "default/1": "ready", "default/2": "spare"}
    svc = router.services["default"]
    assert [c.slot.id for c in svc.conns] == ["default/0", "default/1"]
    router._lose_conn(router.slots["default/0"].conn, "was killed by SIGKILL")
    assert [c.slot.id for c in svc.conns] == ["default/1", "default/2"]
    assert router.slots["default/2"].state.value == "ready"
    assert router.stats["spares_promoted"] == 1
    assert router._service_row(svc)["spares"] == 0


def test_a_hello_with_bad_counts_registers_nothing(router):
    for bad in ({"workers": "2"}, {"workers": 2, "spares": -1}, {"workers": 10**6}):
        with pytest.raises(ValueError, match="bad worker count"):
            router._on_hello(b"sup", {"services": [{"name": "svc", **bad}],
                                      "slots": [{"slot": "svc/0", "service": "svc"}]})
    assert router.supervisors == {} and "svc" not in router.services and router.slots == {}


def test_heartbeats_of_workers_that_never_registered_are_forgotten(router):
    import time

    router._on_heartbeat(b"hb-gone", {"of": b"gone#1"})
    router._on_heartbeat(b"hb-live", {"of": b"live#1"})
    assert set(router._unknown_beats) == {b"gone#1", b"live#1"}
    router._unknown_beats[b"gone#1"] -= 60  # silent for a minute: that process is gone
    router._next_liveness = 0.0
    router._check_liveness()
    assert set(router._unknown_beats) == {b"live#1"}
    assert time.monotonic() - router._unknown_beats[b"live#1"] < 5


def test_a_worker_is_not_sent_cancel_for_a_request_it_answered(router, monkeypatch):
    from ipc.protocol import Kind

    slots = [{"slot": "default/0", "service": "default"}]
    router._on_hello(b"sup", {"services": [{"name": "default", "workers": 1}], "slots": slots})
    _ready(router, "default/0", 100)
    conn = router.slots["default/0"].conn
    sent = []
    monkeypatch.setattr(router, "_send_backend", lambda ident, kind, *a, **k: sent.append(kind))
    monkeypatch.setattr("router.router.transport.send", lambda *a, **k: None)
    rec = _rec(9)
    router.records[rec.rid] = rec
    router._by_client[(rec.client, rec.client_rid)] = rec
    router._dispatch(rec, conn)
    router._on_worker_reply(conn, Kind.RESULT, rec.rid, b"", b"\xc0", [])
    assert rec.rid not in router.records and not conn.in_flight
    assert Kind.CANCEL not in sent  # it answered: nothing to cancel (it once got one each time)
    # A request the router answers itself (its deadline) while the worker holds it does.
    rec = _rec(10)
    router.records[rec.rid] = rec
    router._dispatch(rec, conn)
    router._finish(rec, None)
    assert sent == [Kind.CANCEL]


def test_timers_of_answered_requests_do_not_pile_up(router, monkeypatch):
    """Long deadlines at a high rate: the heap keeps about the live requests' timers."""
    from ipc.protocol import Kind

    router._on_hello(b"sup", {"services": [{"name": "default", "workers": 1}],
                              "slots": [{"slot": "default/0", "service": "default"}]})
    _ready(router, "default/0", 100)
    conn = router.slots["default/0"].conn
    monkeypatch.setattr("router.router.transport.send", lambda *a, **k: None)
    for rid in range(1, 20_001):
        rec = Record(rid, b"client", rid, "default", "echo", b"", b"", [], 1e9 + rid, 0.0, 0)
        router.records[rid] = rec
        router._add_timer(rec.deadline, rid, 0)
        router._dispatch(rec, conn)
        router._on_worker_reply(conn, Kind.RESULT, rid, b"", b"\xc0", [])
    assert not router.records
    assert len(router._timers) <= 1024 + 1
    # A live request keeps its timer through every rebuild.
    live = Record(99_999, b"client", 99_999, "default", "echo", b"", b"", [], 5e9, 0.0, 0)
    router.records[live.rid] = live
    router._add_timer(live.deadline, live.rid, 0)
    for rid in range(100_000, 102_000):
        router._add_timer(1e9, rid, 0)  # no record: disarmed at once
    assert (5e9, 99_999, 0) in router._timers
