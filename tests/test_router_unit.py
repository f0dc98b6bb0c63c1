"""The router's core, driven through messages with a fake clock: no sockets, no sleeps.

Each test plays the peers (clients, workers, a supervisor) with plain frames and reads
back exactly what the router sent (tests/router_harness.py)."""

from __future__ import annotations

import pytest

from ipc.lifecycle import AdminOp
from ipc.protocol import Kind
from router import recovery
from router.requests import Phase, Record
from router.scaling import plan_scale
from router.service import Service, ServiceSettings
from tests.router_harness import Harness

SETTINGS = ServiceSettings("least-loaded", 100, 1, "queue", 30.0)
C = b"client-1"


def _rec(rid: int, priority: int = 0) -> Record:
    return Record(rid, b"client", rid, "default", "echo", b"", b"", [], None, 0.0, priority)


# -- the queue ------------------------------------------------------------------------------
def test_queue_heaps_stay_bounded_when_traffic_flows_through():
    svc = Service("default", SETTINGS)
    rid = 0
    for _ in range(50):
        rid += 1
        svc.queue.push(_rec(rid))
    for _ in range(100_000):
        rid += 1
        svc.queue.push(_rec(rid, priority=rid % 3))
        rec = svc.queue.pop()
        rec.phase = Phase.DONE
        svc.queue.eviction_candidate(0)
    assert svc.queued == 50
    assert svc.queue._entries <= 2 * 50 + 64 + 1
    assert len(svc.queue._low) <= 2 * 50 + 64 + 1


def test_queue_heaps_stay_bounded_when_queued_requests_time_out():
    svc = Service("default", SETTINGS)
    for rid in range(1, 10_001):
        rec = _rec(rid)
        svc.queue.push(rec)
        if rid % 2:
            rec.phase = Phase.DONE  # finished in place (timeout, cancel)
            svc.queue.forget()
    assert svc.queued == 5000
    assert svc.queue._entries <= 2 * 5000 + 64 + 1 and len(svc.queue._low) <= 2 * 5000 + 64 + 1


# -- dispatch and replies ---------------------------------------------------------------------
def test_a_request_is_dispatched_answered_and_forgotten():
    h = Harness()
    h.hello(workers=1)
    w = h.ready("default/0")
    h.request(C, 1, payload="hi")
    [rid] = h.dispatched_to(w)
    h.reply(w, rid, "hi")
    [answer] = [s for s in h.out.to(C)]
    assert (answer.kind, answer.req_id, answer.body) == (Kind.RESULT, 1, "hi")
    assert not h.core.requests.records and not h.core.requests.by_client
    assert h.core.status()["workers"][0]["completed"] == 1


def test_unroutable_dispatch_requeues_the_request_in_place():
    h = Harness()
    h.hello(workers=2)
    ghost = h.ready("default/0")
    live = h.ready("default/1")
    h.out.unreachable.add(ghost)  # its process is gone; no death notice yet
    h.request(C, 1)
    # default/0 was picked (least-loaded, lowest id), refused the send, and was quarantined;
    # the request went on to default/1 at once.
    assert h.dispatched_to(live) and h.core.stats["dispatch_unroutable"] == 1
    assert [c.slot.id for c in h.core.services["default"].conns] == ["default/1"]
    # No death notice within the grace: it is declared dead and leaves the registry.
    h.tick(1.5)
    assert ghost not in h.core.registry.conns
    assert h.core.registry.slots["default/0"].state.value == "dead"
    assert h.core.stats["internal_errors"] == 0


def test_a_worker_dying_with_requests_answers_each_exactly_once():
    """Five requests on one worker: the oldest running and idempotent, two more started as
    a batch (one idempotent), two never started. Exactly five outcomes, each once."""
    h = Harness()
    h.hello(workers=2, max_inflight=8, max_attempts=3)
    a = h.ready("default/0", capacity=8)
    for i in range(1, 6):
        h.request(C, i, idempotent=i in (1, 3))
    rids = h.dispatched_to(a)  # least-loaded: default/0 first, then default/1...
    held = sorted(h.core.registry.conns[a].in_flight)
    assert len(held) == 5 and rids == held
    h.backend(a, Kind.STARTED, {"ids": [held[1], held[2]]})  # a batch of the 2nd and 3rd
    h.out.take()
    b = h.ready("default/1", capacity=8)  # a second worker to take what is requeued
    h.out.take()
    h.slot_event("default/0", "died", reason="was killed by SIGKILL")
    h.tick(0.01)
    errors = {s.req_id: s for s in h.out.sent if s.peer == C}
    # Running and not idempotent (2nd): WorkerCrashedError. Running and idempotent (1st,
    # 3rd) and never started (4th, 5th): run again on default/1.
    assert set(errors) == {2}
    assert errors[2].kind is Kind.ERROR and errors[2].body["type"] == "WorkerCrashedError"
    assert sorted(h.dispatched_to(b)) == sorted([held[0], held[2], held[3], held[4]])
    for rid in h.dispatched_to(b):
        h.reply(b, rid, rid)
    answers = [s.req_id for s in h.out.to(C)]
    assert sorted(answers) == [1, 2, 3, 4, 5]  # one final reply each, no more
    svc = h.core.status()["services"][0]
    assert svc["retried"] == 2 and svc["errored"] == 1 and svc["completed"] == 4


def test_a_reply_that_comes_after_the_death_notice_is_dropped_and_counted():
    h = Harness()
    h.hello(workers=1)
    w = h.ready("default/0")
    h.request(C, 1)
    [rid] = h.dispatched_to(w)
    h.slot_event("default/0", "died", reason="was killed by SIGSEGV")
    h.tick(0.01)
    h.reply(w, rid, "late")  # its socket's last message, read after the death
    assert [s.kind for s in h.out.to(C)] == [Kind.ERROR]
    assert h.core.stats["replies_from_unknown_worker"] == 1


def test_a_death_notice_is_acted_on_only_after_a_read_of_the_backend_once_it_is_due():
    """The loop asks ``deaths_due`` and reads the backend once more when it says yes; a
    notice that comes due after that question waits for the next pass and its read, so
    the dead worker's last reply still wins over the crash."""
    h = Harness()
    h.hello(workers=1)
    w = h.ready("default/0")
    h.request(C, 1)
    [rid] = h.dispatched_to(w)
    h.slot_event("default/0", "died", reason="was killed by SIGKILL")
    h.clock.advance(0.002)
    assert not h.core.deaths_due()  # not due yet: the loop reads nothing more
    h.clock.advance(0.002)  # due now, on the way to tick
    h.core.tick()
    assert not h.out.to(C)  # no read of the backend since it came due: not yet
    assert h.core.deaths_due()  # the next pass reads the backend first...
    h.reply(w, rid, "done")  # ...and takes the dead worker's last reply
    h.core.tick()
    assert [(s.kind, s.body) for s in h.out.to(C)] == [(Kind.RESULT, "done")]
    assert h.core.registry.slots["default/0"].state.value == "dead"

def test_a_worker_is_not_sent_cancel_for_a_request_it_answered():
    h = Harness()
    h.hello(workers=1)
    w = h.ready("default/0")
    h.request(C, 1)
    h.reply(w, h.dispatched_to(w)[0], 1)
    assert Kind.CANCEL not in [s.kind for s in h.out.to(w)]
    # A request the router answers itself (its deadline) while the worker holds it is.
    h.request(C, 2, timeout=1.0)
    h.tick(1.5)
    assert h.out.errors_to(C)[0].type == "RequestTimeoutError"
    assert [s.kind for s in h.out.to(w)].count(Kind.CANCEL) == 1


def test_deadline_in_the_queue_and_max_wait_are_separate_timers():
    h = Harness()
    h.hello(workers=1, max_wait=2.0)
    w = h.ready("default/0")
    h.request(C, 1)  # runs on the worker, no deadline
    h.request(C, 2, timeout=1.0)  # queued: its deadline passes first
    h.request(C, 3)  # queued: waits max_wait
    h.tick(1.1)
    assert [e.type for e in h.out.errors_to(C)] == ["RequestTimeoutError"]
    assert "in the queue" in h.out.errors_to(C)[0].message
    h.tick(1.0)
    assert [e.type for e in h.out.errors_to(C)] == ["RequestTimeoutError", "BackpressureError"]
    assert len(h.dispatched_to(w)) == 1


def test_timers_of_answered_requests_do_not_pile_up():
    """Long deadlines at a high rate: the heap keeps about the live requests' timers."""
    h = Harness()
    h.hello(workers=1)
    w = h.ready("default/0")
    for i in range(1, 5001):
        h.request(C, i, timeout=86_000)
        h.reply(w, h.dispatched_to(w)[-1], i)
        h.out.sent.clear() if i % 500 == 0 else None
    assert not h.core.requests.records
    assert len(h.core.requests.timers) <= 1024 + 1


# -- ids and ordering rules (protocol.md, sections 2.1 and 9) ---------------------------------
def test_request_id_zero_is_refused_and_a_cancel_with_it_ignored():
    h = Harness()
    h.hello(workers=1)
    h.ready("default/0")
    for kind, meta in ((Kind.REQUEST, {"method": "echo"}), (Kind.STATUS, None),
                       (Kind.ADMIN, {"op": "drain", "worker": "default/0"})):
        h.client_msg(C, kind, 0, meta)
    h.client_msg(C, Kind.CANCEL, 0)
    sent = h.out.to(C)
    assert [(s.kind, s.req_id, s.body["code"]) for s in sent] == [
        (Kind.ERROR, 0, "bad-request-id")] * 3
    assert not h.core.requests.records


def test_status_or_admin_reusing_the_id_of_a_request_in_flight_is_refused():
    h = Harness()
    h.hello(workers=1)
    w = h.ready("default/0")
    h.request(C, 7)
    h.client_msg(C, Kind.STATUS, 7)
    h.client_msg(C, Kind.ADMIN, 7, {"op": "drain", "worker": "default/0"})
    assert [e.code for e in h.out.errors_to(C)] == ["duplicate-id", "duplicate-id"]
    assert h.core.registry.slots["default/0"].state.value == "busy"  # not drained
    h.reply(w, h.dispatched_to(w)[0], "ok")
    assert [s.kind for s in h.out.to(C)][-1] is Kind.RESULT  # the request still answered
    h.client_msg(C, Kind.STATUS, 7)  # no longer in flight: answered
    assert h.out.to(C)[-1].kind is Kind.RESULT and "router" in h.out.to(C)[-1].body


def test_a_client_ping_lists_only_integer_ids_it_does_not_hold():
    h = Harness()
    h.hello(workers=1)
    h.ready("default/0")
    h.request(C, 5)
    h.client_msg(C, Kind.HEARTBEAT, 0, {"held": [5, 6, "7", 8.0, None, True]})
    h.client_msg(C, Kind.HEARTBEAT, 0, {"held": "garbage"})
    pongs = [s.body for s in h.out.to(C) if s.kind is Kind.HEARTBEAT]
    assert [p["unknown"] for p in pongs] == [[6], []]


# -- workers' health ----------------------------------------------------------------------------
def test_a_silent_worker_is_killed_through_its_supervisor_then_declared_dead():
    h = Harness(heartbeat_interval=1.0, heartbeat_liveness=3)
    h.hello(workers=1)
    w = h.ready("default/0")
    h.request(C, 1)
    for _ in range(7):  # the supervisor beats; the worker is silent for 3.5 s
        h.backend(b"sup", Kind.HEARTBEAT, {"ping": 1})
        h.tick(0.5)
    kills = [s for s in h.out.to(b"sup") if s.kind is Kind.ADMIN]
    assert [k.meta["op"] for k in kills] == [AdminOp.KILL]
    assert h.core.stats["hung_workers_killed"] == 1
    assert not h.out.to(C)  # its request waits for the death notice...
    for _ in range(11):  # ...which never comes (kill_grace): answered anyway
        h.backend(b"sup", Kind.HEARTBEAT, {"ping": 1})
        h.tick(0.5)
    assert [e.type for e in h.out.errors_to(C)] == ["WorkerCrashedError"]
    assert w not in h.core.registry.conns
    assert "no death notice came" in h.core.registry.slots["default/0"].last_error


def test_heartbeats_of_workers_that_never_registered_are_forgotten():
    h = Harness()
    h.backend(b"gone#1#hb", Kind.HEARTBEAT, {"of": b"gone#1"})
    h.tick(60)  # silent for a minute: that process is gone
    h.backend(b"live#1#hb", Kind.HEARTBEAT, {"of": b"live#1"})
    h.tick(0.2)
    assert set(h.core.liveness._unknown_beats) == {b"live#1"}
    h.backend(b"live#1#hb", Kind.HEARTBEAT, {"of": b"live#1"})  # a beat later: ask it to register
    assert h.out.to(b"live#1#hb")[-1].meta["register"] is True


def test_last_error_is_the_most_recent_abnormal_end_and_a_clean_end_clears_it():
    h = Harness()
    h.hello(workers=1)
    h.ready("default/0")
    h.slot_event("default/0", "died", reason="was killed by SIGKILL")
    h.tick(0.01)
    slot = h.core.registry.slots["default/0"]
    assert slot.last_error == "was killed by SIGKILL"
    h.slot_event("default/0", "started", incarnation=2, pid=1002)
    w2 = h.ready("default/0", incarnation=2)
    assert slot.last_error == "was killed by SIGKILL"  # still its most recent end
    # An operator restart: GOODBYE "stopped", then the process exits and is respawned.
    h.client_msg(C, Kind.ADMIN, 1, {"op": "restart", "worker": "default/0"})
    h.backend(w2, Kind.GOODBYE, {"reason": "stopped"})
    h.slot_event("default/0", "died", incarnation=2, reason="restarted (exit code 0)")
    h.tick(0.01)
    assert slot.last_error is None
    h.slot_event("default/0", "started", incarnation=3, pid=1003)
    h.ready("default/0", incarnation=3)
    assert slot.last_error is None and slot.state.value == "ready"


def test_spares_are_held_back_and_promoted_when_a_worker_is_lost():
    h = Harness()
    h.hello(workers=2, spares=1)
    for i in range(3):
        h.ready(f"default/{i}")
    states = {s.id: s.state.value for s in h.core.registry.slots.values()}
    assert states == {"default/0": "ready", "default/1": "ready", "default/2": "spare"}
    h.slot_event("default/0", "died", reason="was killed by SIGKILL")
    h.tick(0.01)
    svc = h.core.services["default"]
    assert [c.slot.id for c in svc.conns] == ["default/1", "default/2"]
    assert h.core.stats["spares_promoted"] == 1
    assert h.core.status()["services"][0]["spares"] == 0


def test_a_hello_with_bad_counts_registers_nothing():
    h = Harness()
    for bad in ({"workers": "2"}, {"workers": 2, "spares": -1}, {"workers": 10**6}):
        h.backend(b"sup", Kind.HELLO, {"services": [{"name": "svc", **bad}],
                                       "slots": [{"slot": "svc/0", "service": "svc"}]})
    core = h.core
    assert core.supervisors.known == {} and "svc" not in core.services
    assert core.registry.slots == {} and core.stats["bad_frames_backend"] == 3


@pytest.mark.parametrize("bad", [{"prefetch": "3"}, {"prefetch": True}, {"prefetch": 2.0},
                                 {"max_inflight": "4"}, {"queue_capacity": 1.5},
                                 {"idempotent": 1}, {"max_wait": "5"}, {"policy": 7}])
def test_a_hello_whose_settings_only_convert_to_their_types_is_refused(bad):
    """The routed settings are checked as protocol.md types them: a string, a boolean or
    a float where an int belongs is refused, not read as one (pydantic's lax mode would)."""
    h = Harness()
    h.backend(b"sup", Kind.HELLO, {"services": [{"name": "svc", "workers": 1, **bad}],
                                   "slots": [{"slot": "svc/0", "service": "svc"}]})
    assert "svc" not in h.core.services and h.core.stats["bad_frames_backend"] == 1
    h.backend(b"sup", Kind.HELLO, {"services": [{"name": "svc", "workers": 1, "max_wait": 5,
                                                 "prefetch": 2}],
                                   "slots": [{"slot": "svc/0", "service": "svc"}]})
    settings = h.core.services["svc"].settings  # an int where a float belongs is one
    assert (settings.max_wait, settings.prefetch) == (5.0, 2)


def test_a_lost_supervisor_fails_its_workers_requests_and_is_taken_back():
    h = Harness(heartbeat_interval=1.0, heartbeat_liveness=3)
    h.hello(workers=1)
    w = h.ready("default/0")
    h.request(C, 1)
    for _ in range(3):
        h.backend(w + b"#hb", Kind.HEARTBEAT, {"of": w})  # the worker beats, its host's
        h.tick(1.1)                                       # supervisor is silent
    assert [e.type for e in h.out.errors_to(C)] == ["WorkerCrashedError"]
    assert h.core.registry.slots["default/0"].state.value == "failed"
    h.backend(b"sup", Kind.HEARTBEAT, {"ping": 1})
    assert h.out.to(b"sup")[-1].meta.get("hello") is True


def test_a_late_worker_of_a_departed_supervisor_is_told_to_stop_even_if_its_slot_came_back():
    """A supervisor that drained away: its slots leave the table, and one of its workers
    that registers late is told to stop. A SLOT event it sent before reading DRAINED can
    bring the row back; the worker is still not taken in (it has no supervisor here)."""
    h = Harness()
    h.hello(workers=1)
    h.ready("default/0")
    h.backend(b"sup", Kind.DRAIN, {"scope": "supervisor"})
    h.tick(0.05)
    assert "default/0" not in h.core.registry.slots
    h.slot_event("default/0", "started", incarnation=2, pid=1002)  # sent before DRAINED came
    assert "default/0" in h.core.registry.slots
    late = h.ready("default/0", incarnation=2)
    assert [s.kind for s in h.out.to(late)] == [Kind.SHUTDOWN]
    assert late not in h.core.registry.conns and not h.core.services["default"].conns

# -- pure rules ---------------------------------------------------------------------------------
def test_recovery_rule():
    s = ServiceSettings("least-loaded", 10, 1, "queue", None, None, False, 3, 2)
    rec = _rec(1)
    rec.idempotent, rec.starts = True, 1
    assert recovery.crash_outcome(rec, s, "died", "w/0") is None  # retried
    rec.starts = 2
    assert recovery.crash_outcome(rec, s, "died", "w/0").type == "PoisonedRequestError"
    rec.starts, rec.streamed = 1, True
    err = recovery.crash_outcome(rec, s, "died", "w/0")
    assert err.type == "WorkerCrashedError" and "partial replies" in err.message
    held = [_rec(1), _rec(2), _rec(3)]
    assert recovery.running_when_lost(held, {3}, crashed=True, running=True) == {1, 3}
    assert recovery.running_when_lost(held, {3}, crashed=False, running=True) == set()
    assert recovery.running_when_lost(held, {3}, crashed=True, running=False) == set()


def test_scale_plan_keeps_hosts_even_and_refuses_too_few_for_spares():
    a, b = b"a", b"b"
    plan = plan_scale("svc", {a: (1, 0), b: (1, 0)}, {a: [], b: []}, 5)
    assert sorted(n for n, _ in plan.values()) == [2, 3]
    with pytest.raises(ValueError, match="needs at least 2 workers"):
        plan_scale("svc", {a: (1, 1), b: (1, 1)}, {a: [], b: []}, 1)


# -- retry_after (protocol.md, section 5) -------------------------------------------------------
def test_retry_after_follows_the_queue_and_the_measured_completion_rate():
    """A flood on one worker: retry_after predicts when the queue ahead has drained, which
    the fake clock then shows."""
    h = Harness()
    h.hello(workers=1, queue_capacity=200)
    w = h.ready("default/0")
    per_request = 0.0035  # seconds the worker takes for one
    for i in range(1, 203):  # one runs, 200 wait, the last is refused
        h.request(C, i)
    rejected = h.out.errors_to(C)
    assert [e.type for e in rejected] == ["BackpressureError"]
    assert rejected[0].retry_after == pytest.approx(201 * 0.01, rel=0.01)  # no rate yet
    served = 0
    for _ in range(100):  # the worker gets through half of it at its own pace
        h.clock.advance(per_request)
        h.reply(w, h.dispatched_to(w)[served], None)
        served += 1
    rid = 1000
    while len(h.out.errors_to(C)) < 2:  # the queue fills up again, then one is refused
        rid += 1
        h.request(C, rid)
    retry_after = h.out.errors_to(C)[-1].retry_after
    t0, drained = h.clock.now, 0
    while h.core.services["default"].queued:
        h.clock.advance(per_request)
        h.reply(w, h.dispatched_to(w)[served], None)
        served += 1
        drained += 1
    observed = h.clock.now - t0
    assert retry_after == pytest.approx(observed, rel=0.05)


def test_a_meta_map_with_a_non_string_key_is_bad_meta():
    h = Harness()
    h.client_msg(C, Kind.STATUS, 3, {b"k": 1})
    h.client_msg(C, Kind.STATUS, 4, {1: 1})
    assert [(e.code, s.req_id) for e, s in zip(h.out.errors_to(C), h.out.to(C), strict=True)] == [
        ("bad-meta", 3), ("bad-meta", 4)]


# -- bounded decoding (hostile clients) --------------------------------------------------------
def test_a_meta_frame_over_the_limit_is_refused_before_it_is_decoded():
    import msgpack

    from ipc import protocol

    h = Harness(max_meta_bytes=1024)
    big = msgpack.packb({"method": "echo", "pad": [[] for _ in range(2000)]})
    h.core.on_frontend([C, *protocol.encode(Kind.REQUEST, 5, big)])
    [err] = h.out.errors_to(C)
    assert err.code == "meta-too-large" and h.out.to(C)[0].req_id == 5
    assert not h.core._meta_cache._maps  # nothing of it kept
    assert not h.core.requests.records


def test_only_small_metas_are_cached():
    from ipc import protocol

    cache = protocol.MetaCache(size=8)
    for i in range(100):
        cache.unpack(protocol.pack_meta({"method": "echo", "i": i}))
        cache.unpack(protocol.pack_meta({"method": "echo", "pad": "x" * 300, "i": i}))
    assert len(cache._maps) <= 8
    assert all(len(frame) <= protocol.CACHED_META_BYTES for frame in cache._maps)


def test_a_message_with_too_many_frames_is_refused_under_its_id():
    from ipc import protocol
    from ipc.transport import Truncated

    h = Harness(max_buffer_frames=2)
    frames = Truncated([C, *protocol.encode(Kind.REQUEST, 9, {"method": "echo"}, b"\xc0",
                                            [b"", b""])])
    frames.dropped = 999_997  # 3 kept (head and 2 buffers) + 999,997 let go
    h.core.on_frontend(frames)
    [err] = h.out.errors_to(C)
    assert err.code == "too-many-frames" and h.out.to(C)[0].req_id == 9
    assert "1000000 frames" in err.message
    garbage = Truncated([C, b"no header"])
    garbage.dropped = 10
    h.core.on_frontend(garbage)
    assert h.out.to(C)[-1].req_id == 0 and h.core.stats["bad_frames_frontend"] == 2


def test_a_backend_message_with_too_many_frames_is_dropped_and_its_request_answered():
    from ipc import protocol
    from ipc.transport import Truncated

    h = Harness(max_buffer_frames=2)
    h.hello(workers=1, max_inflight=4)
    w = h.ready("default/0", capacity=4)
    h.request(C, 1)
    h.request(C, 2)
    first, second = h.dispatched_to(w)

    def huge(kind: Kind, rid: int) -> Truncated:
        frames = Truncated([w, *protocol.encode(kind, rid, b"", b"\xc0", [b"", b""])])
        frames.dropped = 10_000
        return frames

    h.core.on_backend(huge(Kind.RESULT, first))  # a final reply: the request ends here
    [err] = h.out.errors_to(C)
    assert err.type == "PayloadError" and "10003 frames" in err.message
    assert first not in h.core.registry.conns[w].in_flight
    h.core.on_backend(huge(Kind.PARTIAL, second))  # an item: the client is answered, and
    assert len(h.out.errors_to(C)) == 2             # the worker still owes its final reply
    assert h.out.to(w)[-1].kind is Kind.CANCEL
    h.reply(w, second, "done")
    assert not h.core.registry.conns[w].in_flight and not h.core.requests.records
    h.core.on_backend(huge(Kind.HEARTBEAT, 0))  # anything else: dropped
    assert h.core.stats["bad_frames_backend"] == 3 and len(h.out.to(C)) == 2
    assert h.core.stats["late_replies"] == 1


def test_a_stalled_loop_does_not_take_its_own_stall_for_silent_workers():
    """One client message may keep the loop from the backend for seconds (a million
    frames): heartbeats sent meanwhile are unread, not missing. Silence counts from the
    loop's last turn to its sockets."""
    h = Harness()
    h.hello(workers=1)
    ident = h.ready("default/0")
    h.backend(b"sup", Kind.HEARTBEAT, {})
    h.core.backend_read_at = h.clock()  # the loop turned to its sockets...
    h.tick(30)  # ...then spent 30 s on one message
    assert h.core.registry.conns[ident].kill_sent is None
    assert h.core.supervisors.connected(b"sup")
    h.core.backend_read_at = h.clock()  # it reads again, and still hears nothing
    h.tick(0.2)
    assert not h.core.supervisors.connected(b"sup") and ident not in h.core.registry.conns


# -- ServiceUnavailableError says which case it is ------------------------------------------
def test_service_unavailable_carries_a_code_for_each_case():
    """An HTTP gateway answers an unknown service 404 and the others 503: the code tells."""
    h = Harness()
    h.hello("default", workers=1)
    h.ready("default/0")
    h.tick()  # the registration grace (0 s here) is over
    h.request(C, 1, service="nope")
    h.slot_event("default/0", "failed", reason="setup() failed")
    h.backend(b"default/0#1", Kind.GOODBYE, {"reason": "setup-failed"})
    h.request(C, 2, service="default")
    h.core.begin_drain("test")
    h.request(C, 3, service="default")
    errs = h.out.errors_to(C)
    assert [(e.type, e.code) for e in errs] == [
        ("ServiceUnavailableError", "unknown-service"),
        ("ServiceUnavailableError", "no-live-workers"),
        ("ServiceUnavailableError", "shutting-down")]


def test_a_service_described_with_no_worker_outlives_the_registration_grace():
    """A supervisor's HELLO for a service scaled to 0 makes it known: after the grace it
    is still in status, and a request is told it has no live worker (not that it is
    unknown). A service only a request named during the grace is forgotten."""
    h = Harness(registration_grace=5.0)
    h.hello(service="later", workers=0)
    h.request(C, 1, service="nobody")  # waits out the grace, then fails as unknown
    h.tick(6.0)
    assert "later" in h.core.services and "nobody" not in h.core.services
    assert [s["name"] for s in h.core.status()["services"]] == ["later"]
    h.out.take()
    h.request(C, 2, service="later")
    [reply] = [s for s in h.out.take() if s.peer == C]
    assert reply.body["type"] == "ServiceUnavailableError"
    assert reply.body["code"] == "no-live-workers"
