"""Nodes, as the router sees them: each worker's node and host, each supervisor's round
trip, a HELLO that comes again, a node restarted under its name, a lost node forgotten,
and ``min_per_host`` in the split of a scale. Plain values and a fake clock
(tests/router_harness.py)."""

from __future__ import annotations

import os
import re
import socket

import pytest

from ipc.lifecycle import WorkerState
from ipc.protocol import Kind
from router.scaling import plan_scale
from tests.router_harness import Harness
from workerpool.config import TIMINGS
from workerpool.supervisor import routing_id

A, B, C = b"sup-a", b"sup-b", b"sup-c"
A2 = b"sup-a-restarted"  # node a's supervisor after a restart: a new process, a new routing id
CLIENT = b"client"


def _two_nodes(metrics: str | None = None, **settings: object) -> Harness:
    h = Harness(heartbeat_interval=1.0, heartbeat_liveness=3, metrics=metrics)
    h.hello(workers=1, sup=A, node="a", host="box", **settings)
    h.hello(workers=2, sup=B, node="b", host="box", **settings)
    for slot in ("default/a/0", "default/b/0", "default/b/1"):
        h.ready(slot)
    return h


def _ping(h: Harness, sup: bytes, **meta: object) -> None:
    h.backend(sup, Kind.HEARTBEAT, {"ping": 1, **meta})


def test_each_worker_row_names_its_node_and_host():
    h = _two_nodes()
    rows = {w["id"]: (w["node"], w["host"]) for w in h.core.status()["workers"]}
    assert rows == {"default/a/0": ("a", "box"), "default/b/0": ("b", "box"),
                    "default/b/1": ("b", "box")}


def test_without_a_node_name_the_node_is_the_host():
    h = Harness()
    h.hello(workers=1, host="gpu7")  # `up`: no node name
    h.hello(service="other", workers=1, sup=b"sup-x")  # nor a host: its routing id
    st = h.core.status()
    assert [(w["id"], w["node"], w["host"]) for w in st["workers"]] == [
        ("default/0", "gpu7", "gpu7"), ("other/0", "sup-x", None)]
    assert [n["node"] for n in st["nodes"]] == ["gpu7", "sup-x"]


def test_nodes_show_pid_workers_last_seen_and_the_round_trip_they_report():
    h = _two_nodes()
    h.backend(A, Kind.HELLO, {"pid": 41, "host": "box", "node": "a", "services": [],
                              "slots": []})
    h.tick(0.5)
    _ping(h, A, rtt=0.25, srtt=0.3)
    h.tick(0.2)
    nodes = {n["node"]: n for n in h.core.status()["nodes"]}
    assert nodes["a"] == {"node": "a", "host": "box", "pid": 41, "supervisor": "sup-a",
                          "state": "connected", "slots": 1, "workers": 1, "seen": 0.2,
                          "rtt_ms": 0.25, "rtt_smoothed_ms": 0.3}
    assert (nodes["b"]["slots"], nodes["b"]["workers"], nodes["b"]["seen"],
            nodes["b"]["rtt_ms"]) == (2, 2, 0.7, None)
    for bad in ({"rtt": "1"}, {"rtt": True, "srtt": 1}, {"rtt": -1, "srtt": 1},
                {"rtt": float("nan"), "srtt": 1}, {"rtt": 1e12, "srtt": 1}, {"rtt": 2}):
        _ping(h, A, **bad)  # kept as it was: none of these is a pair of round trips
    assert {n["node"]: n["rtt_ms"] for n in h.core.status()["nodes"]}["a"] == 0.25
    assert h.core.stats.get("bad_frames_backend", 0) == 0


def test_a_lost_node_keeps_its_name_and_shows_lost_until_it_is_back():
    h = _two_nodes()
    _ping(h, A, rtt=1.5, srtt=1.5)
    for _ in range(4):  # only b beats
        h.tick(1.0)
        _ping(h, B)
    st = h.core.status()
    nodes = {n["node"]: n for n in st["nodes"]}
    assert nodes["a"]["state"] == "lost" and nodes["a"]["workers"] == 0
    assert nodes["a"]["seen"] == 4.0 and nodes["a"]["rtt_ms"] == 1.5
    assert {w["id"]: w["node"] for w in st["workers"]}["default/a/0"] == "a"
    assert st["router"]["supervisors"] == 1
    h.hello(workers=1, sup=A, node="a", host="box")
    assert {n["node"]: n["state"] for n in h.core.status()["nodes"]} == {
        "a": "connected", "b": "connected"}


def test_a_leaving_node_says_so():
    h = _two_nodes()
    h.backend(A, Kind.DRAIN, {"scope": "supervisor"})
    assert {n["node"]: n["state"] for n in h.core.status()["nodes"]}["a"] == "leaving"


@pytest.mark.parametrize("node", ["", "x" * 256])
def test_workerpool_worker_refuses_a_node_name_the_router_would(node):
    from click.testing import CliRunner

    from workerpool.cli import main

    out = CliRunner().invoke(main, ["worker", "--router", "tcp://127.0.0.1:1", "--node", node])
    assert out.exit_code == 2
    assert f"'--node': must be 1 to 255 characters, not {len(node)}" in out.output


@pytest.mark.parametrize("node", ["", 7, "x" * 256, ["a"]])
def test_a_hello_with_a_bad_node_name_registers_nothing(node):
    h = Harness()
    h.backend(A, Kind.HELLO, {"node": node, "services": [{"name": "svc", "workers": 1}],
                              "slots": [{"slot": "svc/0", "service": "svc"}]})
    assert h.core.supervisors.known == {} and h.core.registry.slots == {}
    assert h.core.stats["bad_frames_backend"] == 1
    # Told why, once, so that it stops instead of saying HELLO again at every ping.
    (drained,) = h.out.to(A)
    assert drained.kind is Kind.DRAINED and drained.meta["refused"] is True
    assert drained.meta["reason"].startswith("HELLO refused: ") and "node name" in \
        drained.meta["reason"]
    assert h.core.stats["hellos_refused"] == 1


def test_a_bad_hello_from_a_connected_supervisor_changes_nothing_and_stops_nothing():
    h = _two_nodes()
    h.out.take()
    h.backend(A, Kind.HELLO, {"node": "a", "services": [{"name": "default", "workers": -1}],
                              "slots": []})
    assert h.out.to(A) == [] and "hellos_refused" not in h.core.stats
    assert h.core.stats["bad_frames_backend"] == 1 and h.core.supervisors.connected(A)


def test_a_hello_from_a_supervisor_taken_back_again_changes_nothing():
    """A returning supervisor may send HELLO more than once (a pong per queued ping, from
    a supervisor of an older version): the slots, roles and counters stay as one made."""
    h = Harness(heartbeat_interval=1.0, heartbeat_liveness=3)
    h.hello(workers=1, spares=1, sup=A, node="a")
    h.hello(workers=1, sup=B, node="b")
    a0, _, b0 = (h.ready(s) for s in ("default/a/0", "default/a/1", "default/b/0"))
    for _ in range(4):  # a is silent: lost, its workers given up, its targets dropped
        h.tick(1.0)
        _ping(h, B)
        h.backend(b0 + b"#hb", Kind.HEARTBEAT, {"of": b0})
    assert h.core.stats["supervisors_lost"] == 1
    h.hello(workers=1, spares=1, sup=A, node="a")  # back
    for slot in ("default/a/0", "default/a/1"):  # its workers register again, same incarnation
        h.backend(f"{slot}#1".encode(), Kind.READY,
                  {"slot": slot, "incarnation": 1, "service": "default", "capacity": 1,
                   "pid": 1001, "methods": ["echo"]})
    core = h.core
    svc = core.services["default"]

    def picture() -> tuple:
        st = core.status()
        return (sorted((w["id"], w["state"], w["incarnation"]) for w in st["workers"]),
                [c.slot.id for c in svc.conns], dict(core.stats),
                core.scaling.active_target("default"), st["router"]["supervisors"],
                [(n["node"], n["state"], n["slots"], n["workers"]) for n in st["nodes"]],
                st["services"][0]["workers"], st["services"][0]["spares"])

    before = picture()
    assert before[1] == ["default/a/0", "default/b/0"] and before[3] == 2
    assert sorted(w[1] for w in before[0]) == ["ready", "ready", "spare"]
    for _ in range(3):
        h.hello(workers=1, spares=1, sup=A, node="a")
        assert picture() == before
    h.request(b"client", 1)
    h.request(b"client", 2)
    assert len(h.dispatched_to(a0)) == 1  # each serving worker once in the rotation


def test_metrics_label_each_worker_with_its_node_and_give_each_nodes_round_trip():
    pytest.importorskip("prometheus_client",
                        reason="prometheus-client is not installed (the 'metrics' extra)")
    from prometheus_client.parser import text_string_to_metric_families

    from router import exposition
    from router.metrics import LoopMeter, take_snapshot

    h = _two_nodes(metrics="127.0.0.1:1")
    _ping(h, A, rtt=2.0, srtt=2.5)
    text = exposition.render(take_snapshot(h.core, LoopMeter(), h.clock()), 0.0).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    in_flight = {dict(k[1])["worker"]: dict(k[1])["node"] for k in samples
                 if k[0] == "workerpool_in_flight"}
    assert in_flight == {"default/a/0": "a", "default/b/0": "b", "default/b/1": "b"}
    rtt = {k[1]: v for k, v in samples.items() if k[0] == "workerpool_node_rtt_seconds"}
    assert rtt == {(("host", "box"), ("node", "a")): 0.0025}  # b reported none yet


# -- a node restarted under its name ----------------------------------------------------------
def _beat(h: Harness, seconds: float, *sups: bytes) -> None:
    """Let ``seconds`` pass in steps of 1 s with ``sups`` and every registered worker beating."""
    for _ in range(int(seconds)):
        h.tick(1.0)
        for sup in sups:
            _ping(h, sup)
        for ident in list(h.core.registry.conns):
            h.backend(ident + b"#hb", Kind.HEARTBEAT, {"of": ident})


def _finals(h: Harness) -> dict[int, list[str]]:
    """The client's final answers by its request id: the kind, or the error's type."""
    out: dict[int, list[str]] = {}
    for s in h.out.to(CLIENT):
        if s.kind in (Kind.RESULT, Kind.ERROR):
            out.setdefault(s.req_id, []).append(s.body["type"] if s.kind is Kind.ERROR
                                                else "result")
    return out


@pytest.mark.parametrize("old_state", ["connected", "lost", "leaving"])
def test_a_node_restarted_under_its_name_takes_its_slots_over_from_incarnation_1(old_state):
    """`workerpool worker --node a` killed and started again (its pod's container restarted)
    while its slot was at incarnation 3: the new supervisor's first workers register at once,
    nothing is refused as stale, and what the old one's worker held is answered once."""
    h = _two_nodes()
    slot = h.core.registry.slots["default/a/0"]
    old = h.ready("default/a/0", incarnation=3)  # two respawns behind it
    h.request(CLIENT, 1)
    h.request(CLIENT, 2)
    assert h.dispatched_to(old) and slot.conn.in_flight
    if old_state == "lost":
        _beat(h, 4, B)
        assert list(_finals(h).values()) == [["WorkerCrashedError"]]  # answered as it was lost
    elif old_state == "leaving":
        h.backend(A, Kind.DRAIN, {"scope": "supervisor"})
    h.out.take()
    held = {r.client_rid for r in slot.conn.in_flight.values()} if slot.conn else set()
    assert held or old_state == "lost"

    h.hello(workers=1, sup=A2, node="a", host="box")
    sent = h.out.take()
    assert [(s.peer, s.kind) for s in sent if s.peer in (A, old, old + b"#hb")] == [
        (old, Kind.SHUTDOWN), (old + b"#hb", Kind.SHUTDOWN), (A, Kind.DRAINED)]
    drained = next(s for s in sent if s.peer == A)
    assert drained.meta["reason"] == "replaced: another supervisor registered as node 'a'"
    answered = [s for s in sent if s.peer == CLIENT and s.kind is Kind.ERROR]
    assert sorted(s.req_id for s in answered) == sorted(held)  # those it still held, once
    for s in answered:
        assert "its supervisor was replaced (node a registered again)" in s.body["message"]
    assert h.core.stats["supervisors_replaced"] == 1
    st = h.core.status()
    assert [(n["node"], n["supervisor"], n["state"], n["slots"]) for n in st["nodes"]] == [
        ("a", A2.decode(), "connected", 1), ("b", "sup-b", "connected", 2)]
    new_slot = h.core.registry.slots["default/a/0"]
    assert (new_slot.owner, new_slot.incarnation, new_slot.conn) == (A2, 0, None)

    new = h.ready("default/a/0", incarnation=1)  # vouched for by A2's SLOT started
    assert new_slot.conn.identity == new and new_slot.state is WorkerState.READY
    row = {w["id"]: w for w in h.core.status()["workers"]}["default/a/0"]
    assert (row["incarnation"], row["restarts"], row["node"]) == (1, 0, "a")
    assert "stale_ready" not in h.core.stats and "stale_slot_events" not in h.core.stats
    assert all(len(v) == 1 for v in _finals(h).values())  # no request answered twice
    h.request(CLIENT, 3)
    h.request(CLIENT, 4)
    assert h.dispatched_to(new)


def test_the_replaced_supervisor_cannot_take_anything_back():
    h = _two_nodes()
    old = h.ready("default/a/0", incarnation=3)
    h.hello(workers=1, sup=A2, node="a")
    new = h.ready("default/a/0", incarnation=1)
    h.out.take()
    # Its late word on the slot, its worker registering again, its pings, a DRAIN.
    h.slot_event("default/a/0", "died", incarnation=3, sup=A, reason="was killed by SIGKILL")
    h.slot_event("default/a/0", "started", incarnation=4, sup=A, pid=99)
    h.backend(old, Kind.READY, {"slot": "default/a/0", "incarnation": 3, "service": "default",
                                "capacity": 1, "pid": 1003, "methods": ["echo"]})
    _ping(h, A)
    h.backend(A, Kind.DRAIN, {"scope": "supervisor"})
    _beat(h, TIMINGS.vouch_wait + 1, A2, B)
    slot = h.core.registry.slots["default/a/0"]
    assert (slot.owner, slot.incarnation, slot.conn.identity) == (A2, 1, new)
    assert h.core.stats["slot_events_not_owner"] == 2 and h.core.stats["drains_refused"] == 1
    assert h.core.stats["unvouched_ready"] == 1
    pong = next(s for s in h.out.to(A) if s.kind is Kind.HEARTBEAT)
    assert "hello" not in pong.meta  # it must not describe itself again: the name is taken
    assert [n["supervisor"] for n in h.core.status()["nodes"]] == [A2.decode(), "sup-b"]


def _ready_from(h: Harness, sup: bytes, incarnation: int) -> bytes:
    """default/a/0's READY from a worker that supervisor ``sup`` started (READY
    ``supervisor``), without the vouch that Harness.ready sends first."""
    ident = f"default/a/0#{sup.decode()}#{incarnation}".encode()
    h.backend(ident, Kind.READY, {"slot": "default/a/0", "incarnation": incarnation,
                                  "service": "default", "capacity": 1,
                                  "pid": 1000 + incarnation, "methods": ["echo"],
                                  "supervisor": sup.decode()})
    return ident


@pytest.mark.parametrize("old_state", ["connected", "lost", "leaving"])
def test_a_restarted_nodes_worker_may_register_before_its_supervisors_hello(old_state):
    """The new supervisor's worker and the new supervisor talk on two sockets: its READY
    (incarnation 1, naming its supervisor) may come while the slot is still the old one's,
    at incarnation 3. It waits for its own supervisor's word instead of being refused as
    stale (or stopped because the old supervisor is leaving), and registers once that
    comes."""
    h = _two_nodes()
    h.ready("default/a/0", incarnation=3)
    if old_state == "lost":
        _beat(h, 4, B)
    elif old_state == "leaving":
        h.backend(A, Kind.DRAIN, {"scope": "supervisor"})
    h.out.take()
    new = _ready_from(h, A2, 1)
    assert h.out.to(new) == [] and "stale_ready" not in h.core.stats
    h.hello(workers=1, sup=A2, node="a", host="box")
    h.slot_event("default/a/0", "started", incarnation=1, sup=A2, pid=1001)
    slot = h.core.registry.slots["default/a/0"]
    assert (slot.owner, slot.incarnation, slot.conn.identity) == (A2, 1, new)
    assert slot.state is WorkerState.READY and "stale_ready" not in h.core.stats
    h.request(CLIENT, 1)
    assert len(h.dispatched_to(new)) == 1


def test_a_ready_naming_a_supervisor_that_left_is_told_to_stop():
    """After the takeover, a late worker of the replaced supervisor that names it is
    stopped, as before; one that names another supervisor waits for that one's word and
    is forgotten when it never comes, taking nothing."""
    h = _two_nodes()
    h.ready("default/a/0", incarnation=3)
    h.hello(workers=1, sup=A2, node="a", host="box")
    new = h.ready("default/a/0", incarnation=1)
    h.out.take()
    late = _ready_from(h, A, 4)
    assert [s.kind for s in h.out.to(late)] == [Kind.SHUTDOWN]
    stranger = _ready_from(h, b"sup-nobody", 9)
    _beat(h, TIMINGS.vouch_wait + 1, A2, B)
    assert h.out.to(stranger) == [] and h.core.stats["unvouched_ready"] == 1
    slot = h.core.registry.slots["default/a/0"]
    assert (slot.owner, slot.incarnation, slot.conn.identity) == (A2, 1, new)


def test_a_restarted_node_with_fewer_slots_keeps_the_queue_and_drops_the_rest():
    """Its queued requests are not failed in the moment between the old slots leaving and
    the new ones coming: they wait for the new workers. A slot the new one does not run
    (the old one had been scaled up) leaves the table."""
    h = Harness(heartbeat_interval=1.0, heartbeat_liveness=3)
    h.hello(workers=2, sup=A, node="a")
    h.ready("default/a/0")
    h.ready("default/a/1")
    for rid in range(1, 6):
        h.request(CLIENT, rid)
    h.hello(workers=1, sup=A2, node="a")
    assert sorted(h.core.registry.slots) == ["default/a/0"]
    finals = _finals(h)
    assert sorted(finals) == [1, 2] and {v[0] for v in finals.values()} == {
        "WorkerCrashedError"}  # the two that were running; 3, 4 and 5 wait
    h.out.take()  # the old worker's routing id was "default/a/0#1" too
    new = h.ready("default/a/0", incarnation=1)
    assert len(h.dispatched_to(new)) == 1
    h.reply(new, h.dispatched_to(new)[0], "ok")
    assert len(h.dispatched_to(new)) == 2
    assert sorted(_finals(h)) == [3]


def test_only_a_named_node_is_replaced():
    """A supervisor without a node name (``up``'s) is not taken for a node's predecessor,
    even when its host is another supervisor's node name."""
    h = Harness()
    h.hello(workers=1, sup=A, host="gpu1")
    h.ready("default/0")
    h.hello(service="other", workers=1, sup=B, node="gpu1")
    assert h.core.registry.slots["default/0"].conn is not None
    assert "supervisors_replaced" not in h.core.stats
    assert [(n["node"], n["supervisor"]) for n in h.core.status()["nodes"]] == [
        ("gpu1", "sup-a"), ("gpu1", "sup-b")]


def test_a_lost_nodes_requeued_request_is_not_lost_again_with_its_next_worker():
    """Its workers are given up one after another: a request held ahead and requeued from
    the first must not be sent to the second, to fail with it as if it had run."""
    h = Harness(heartbeat_interval=1.0, heartbeat_liveness=3)
    h.hello(workers=2, sup=A, node="a", prefetch=1)
    h.hello(workers=1, sup=B, node="b", prefetch=1)
    a0, b0 = h.ready("default/a/0"), h.ready("default/b/0")
    for rid in range(1, 5):  # each worker runs one and holds one ahead
        h.request(CLIENT, rid)
    a1 = h.ready("default/a/1")  # idle
    assert len(h.dispatched_to(a0)) == 2
    _beat(h, 4, B)
    assert h.core.stats["supervisors_lost"] == 1
    assert h.dispatched_to(a1) == []
    assert h.core.stats["crashed_requests"] == 1  # only the one that ran on a0
    assert h.core.stats.get("spares_promoted", 0) == 0
    h.reply(b0, h.dispatched_to(b0)[0], "ok")
    assert len(h.dispatched_to(b0)) == 3  # a0's unstarted one runs on b


def test_a_supervisors_routing_id_is_new_for_every_process_even_with_the_same_pid():
    """Containers share a host name and each has pid 1: the nonce keeps their routing ids
    apart, and makes a supervisor restarted with the same pid a new peer to the router."""
    ids = {routing_id() for _ in range(50)}
    assert len(ids) == 50
    pattern = rf"sup-{re.escape(socket.gethostname())}-{os.getpid()}-[0-9a-f]{{8}}"
    assert all(re.fullmatch(pattern, i.decode()) for i in ids)


# -- a lost node forgotten ---------------------------------------------------------------------
def test_a_lost_node_is_forgotten_after_ten_minutes_and_may_still_come_back():
    h = _two_nodes()
    a0 = h.core.registry.slots["default/a/0"].conn.identity
    _beat(h, 4, B)
    assert {n["node"]: n["state"] for n in h.core.status()["nodes"]}["a"] == "lost"
    _beat(h, TIMINGS.forget_lost_node - 5, B)
    assert [n["node"] for n in h.core.status()["nodes"]] == ["a", "b"]
    _beat(h, 2, B)
    st = h.core.status()
    assert [n["node"] for n in st["nodes"]] == ["b"]
    assert sorted(w["id"] for w in st["workers"]) == ["default/b/0", "default/b/1"]
    assert h.core.stats["supervisors_forgotten"] == 1
    # It speaks again (a partition of 11 minutes healed): asked to describe itself, it does,
    # vouching for the worker it still runs, which registers again.
    h.out.take()
    _ping(h, A)
    assert h.out.to(A)[-1].meta.get("hello") is True
    h.backend(A, Kind.HELLO, {"node": "a", "services": [{"name": "default", "workers": 1}],
                              "slots": [{"slot": "default/a/0", "service": "default",
                                         "incarnation": 1, "pid": 1001}]})
    h.backend(a0, Kind.READY, {"slot": "default/a/0", "incarnation": 1, "service": "default",
                               "capacity": 1, "pid": 1001, "methods": ["echo"]})
    assert {n["node"]: n["state"] for n in h.core.status()["nodes"]} == {
        "a": "connected", "b": "connected"}
    assert h.core.registry.slots["default/a/0"].conn.identity == a0


def test_a_ping_asks_for_hello_unless_the_sender_is_connected_or_left():
    h = Harness()
    h.hello(workers=1, sup=A, node="a")
    h.hello(workers=0, sup=B, node="b")
    h.backend(B, Kind.DRAIN, {"scope": "supervisor"})  # nothing to wait for: it left at once
    for sup in (A, B, C):  # connected, departed, never heard of
        _ping(h, sup)
    hello = {s.peer: s.meta.get("hello", False) for s in h.out.sent if s.kind is Kind.HEARTBEAT}
    assert hello == {A: False, B: False, C: True}


# -- min_per_host ------------------------------------------------------------------------------
def _plan(counts: dict[bytes, int], workers: int, min_per_host: int,
          spares: dict[bytes, int] | None = None) -> dict[bytes, int]:
    per = {o: (n, (spares or {}).get(o, 0)) for o, n in counts.items()}
    plan = plan_scale("svc", per, {o: [] for o in counts}, workers, min_per_host)
    return {o: n for o, (n, _) in plan.items()}


def test_scaling_up_fills_the_hosts_below_the_minimum_first():
    assert _plan({A: 3, B: 0}, 4, 2) == {A: 3, B: 1}
    assert _plan({A: 3, B: 0}, 5, 2) == {A: 3, B: 2}
    assert _plan({A: 3, B: 0}, 7, 2) == {A: 4, B: 3}  # then evenly
    assert _plan({A: 5, B: 1, C: 0}, 9, 2) == {A: 5, B: 2, C: 2}


def test_scaling_down_takes_no_host_below_the_minimum_it_has():
    assert _plan({A: 3, B: 1}, 3, 2) == {A: 2, B: 1}  # b keeps its one, a its two
    assert _plan({A: 3, B: 1}, 2, 0) == {A: 1, B: 1}  # without a minimum a goes lower
    for workers in (2, 0):
        with pytest.raises(ValueError, match=r"keeps min_per_host=2 on each supervisor that "
                                             r"has them: it needs at least 3 workers"):
            _plan({A: 3, B: 1}, workers, 2)
    assert _plan({A: 4, B: 4}, 4, 2) == {A: 2, B: 2}
    # A host that keeps spares keeps one worker whatever the minimum.
    assert _plan({A: 2, B: 2}, 2, 0, spares={A: 1, B: 1}) == {A: 1, B: 1}
    assert _plan({A: 1, B: 2}, 3, 3, spares={A: 1}) == {A: 1, B: 2}
    with pytest.raises(ValueError, match="at least 3 workers"):
        _plan({A: 1, B: 2}, 2, 3, spares={A: 1})


def test_scale_honours_the_services_min_per_host():
    h = Harness()
    h.hello(workers=2, sup=A, node="a", min_per_host=2)
    h.hello(workers=1, sup=B, node="b", min_per_host=2)
    for slot in ("default/a/0", "default/a/1", "default/b/0"):
        h.ready(slot)
    assert h.core.status()["services"][0]["min_per_host"] == 2
    h.client_msg(b"admin", Kind.ADMIN, 1, {"op": "scale", "service": "default", "workers": 2})
    (err,) = h.out.errors_to(b"admin")
    assert err.type == "AdminError" and "min_per_host=2" in err.message
    h.client_msg(b"admin", Kind.ADMIN, 2, {"op": "scale", "service": "default", "workers": 5})
    scales = {s.peer: s.meta["workers"] for s in h.out.take()
              if s.kind is Kind.ADMIN and s.side == "backend"}
    assert scales == {A: 3, B: 2}  # b, below the minimum, got the first new one


def test_a_bad_min_per_host_is_refused_at_the_edge_and_in_a_hello():
    from click.testing import CliRunner

    from workerpool.cli import main

    out = CliRunner().invoke(main, ["worker", "--router", "tcp://127.0.0.1:1",
                                    "--min-per-host", "-1"])
    assert out.exit_code == 2 and "min_per_host" in out.output
    h = Harness()
    for bad in (-1, 1025, "many"):
        h.backend(A, Kind.HELLO, {"services": [{"name": "svc", "workers": 1,
                                                "min_per_host": bad}],
                                  "slots": [{"slot": "svc/0", "service": "svc"}]})
    assert "svc" not in h.core.services and h.core.stats["bad_frames_backend"] == 3


def test_departed_supervisors_are_remembered_up_to_a_bound(monkeypatch):
    """Every restart of a node leaves one departed supervisor behind: the router keeps the
    newest MAX_DEPARTED of them (told to stop, never asked for HELLO), not all forever."""
    from router import supervisors

    monkeypatch.setattr(supervisors, "MAX_DEPARTED", 3)
    h = _two_nodes()
    sups = [A] + [b"sup-a-%d" % i for i in range(5)]
    for sup in sups[1:]:  # node a restarted five times
        h.hello(workers=1, sup=sup, node="a")
    table = h.core.supervisors
    assert h.core.stats["supervisors_replaced"] == 5
    assert [table.leaving(s) for s in sups] == [False, False, True, True, True, False]
    assert not table.asks_hello(sups[4]) and table.asks_hello(A)
