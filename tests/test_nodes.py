"""Nodes, as the router sees them: each worker's node and host, each supervisor's round
trip, a HELLO that comes again, and ``min_per_host`` in the split of a scale. Plain
values and a fake clock (tests/router_harness.py)."""

from __future__ import annotations

import pytest

from ipc.protocol import Kind
from router.scaling import plan_scale
from tests.router_harness import Harness

A, B, C = b"sup-a", b"sup-b", b"sup-c"


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


@pytest.mark.parametrize("node", ["", 7, "x" * 256, ["a"]])
def test_a_hello_with_a_bad_node_name_registers_nothing(node):
    h = Harness()
    h.backend(A, Kind.HELLO, {"node": node, "services": [{"name": "svc", "workers": 1}],
                              "slots": [{"slot": "svc/0", "service": "svc"}]})
    assert h.core.supervisors.known == {} and h.core.registry.slots == {}
    assert h.core.stats["bad_frames_backend"] == 1


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
