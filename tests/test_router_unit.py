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
