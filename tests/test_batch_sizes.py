"""Batch sizes of @batched methods: counted by the worker (workerpool.batching), carried
by its heartbeats (8.3 ``batches``), kept per worker by the router (router.health) and
shown by status; and the histogram a Prometheus exporter makes of them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc import protocol
from ipc.protocol import Kind
from router.health import BatchSizes, batch_histogram
from tests.router_harness import Harness
from workerpool.backlog import Backlog
from workerpool.batching import BatchSizeMeter, size_edges
from workerpool.busy import BusyMeter
from workerpool.worker import WorkerSpec, _Heartbeat


# -- the worker's count --------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch_size, edges", [
    (1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (4, (1, 2, 3, 4)), (8, (1, 2, 4, 7, 8)),
    (12, (1, 2, 4, 8, 11, 12)), (32, (1, 2, 4, 8, 16, 31, 32)),
])
def test_size_edges_are_powers_of_two_then_one_short_of_full_and_full(max_batch_size, edges):
    assert size_edges(max_batch_size) == edges


def test_size_edges_stay_few_at_the_largest_batch():
    edges = size_edges(65536)
    assert len(edges) == 18 and edges[-3:] == (32768, 65535, 65536)
    assert len(edges) <= BatchSizes.MAX_BUCKETS


def test_meter_counts_sizes_into_cumulative_buckets_and_reports_only_what_moved():
    m = BatchSizeMeter({"work": 8, "other": 4, "idle": 2})
    assert m.report() == {}  # nothing ran: a beat carries no batches
    for size in (8, 8, 5, 1, 3):
        m.record("work", size)
    m.record("other", 4)
    report = m.report()
    assert report == {
        "work": {"count": 5, "sum": 25, "buckets": [[1, 1], [2, 1], [4, 2], [7, 3], [8, 5]]},
        "other": {"count": 1, "sum": 4, "buckets": [[1, 0], [2, 0], [3, 0], [4, 1]]},
    }
    assert m.report() == report  # not sent yet (the send failed): offered again
    m.sent(report)
    assert m.report() == {}
    m.record("work", 2)
    assert m.report() == {"work": {"count": 6, "sum": 27,
                                   "buckets": [[1, 1], [2, 2], [4, 3], [7, 4], [8, 6]]}}
    m.sent(m.report())
    m.resend()  # a router that lost it all hears every method that ran, never `idle`
    assert set(m.report()) == {"work", "other"}


def test_a_batch_over_the_largest_bound_stays_in_the_last_bucket():
    m = BatchSizeMeter({"work": 2})
    m.record("work", 3)  # cannot happen (batches hold at most max_batch_size): no crash
    assert m.report()["work"]["buckets"] == [[1, 0], [2, 1]]


def test_heartbeats_carry_the_figures_once_and_all_again_when_asked_to_register(
        standin_router):
    """The real heartbeat thread against a ROUTER socket standing in for the router."""
    ctx, router, address = standin_router.ctx, standin_router.sock, standin_router.address
    spec = WorkerSpec(slot="default/0", service="default", incarnation=1, handler="x:Y",
                      device="cpu", backend=address, heartbeat_interval=0.02)
    sizes = BatchSizeMeter({"work": 8})
    busy = BusyMeter()
    heart = _Heartbeat(ctx, spec, busy, sizes, Backlog())
    heart.start()

    def beat() -> tuple[bytes, dict]:
        assert router.poll(5000), "no heartbeat within 5 s"
        ident, *frames = router.recv_multipart()
        return ident, protocol.decode(frames).meta

    try:
        ident, first = beat()
        assert ident == spec.identity + protocol.HEARTBEAT_SUFFIX
        assert first["of"] == spec.identity and "batches" not in first
        sizes.record("work", 8)
        sizes.record("work", 3)
        beats = [beat()[1] for _ in range(3)]
        carried = [b["batches"] for b in beats if "batches" in b]
        assert carried == [{"work": {"count": 2, "sum": 11,
                                     "buckets": [[1, 0], [2, 0], [4, 1], [7, 1], [8, 2]]}}]
        assert "batches" not in beats[-1]  # sent once, then left out until it moves
        router.send_multipart([ident, *protocol.encode(Kind.HEARTBEAT, 0, {"register": True})])
        again = None
        for _ in range(20):
            meta = beat()[1]
            if "batches" in meta:
                again = meta["batches"]
                break
        assert again == carried[0]  # a restarted router hears it all again
        assert heart.register_again.is_set()
    finally:
        heart.stop()


# -- the router's record -------------------------------------------------------------------------
FIG = {"count": 3, "sum": 20, "buckets": [[1, 0], [2, 0], [4, 1], [7, 1], [8, 3]]}


def test_router_keeps_the_latest_figures_per_method_with_their_mean():
    b = BatchSizes()
    assert b.add({"work": FIG}, frozenset({"work", "plain"})) == 0
    assert b.figures == {"work": {**FIG, "mean": 6.667}}
    later = {"count": 4, "sum": 21, "buckets": [[1, 1], [2, 1], [4, 2], [7, 2], [8, 4]]}
    assert b.add({"work": later}, frozenset({"work"})) == 0  # replaces: figures are cumulative
    assert b.figures["work"]["count"] == 4 and b.figures["work"]["mean"] == 5.25


@pytest.mark.parametrize("entry", [
    None, 3, "x", [], {},
    {**FIG, "count": 0}, {**FIG, "count": -1}, {**FIG, "count": True}, {**FIG, "count": 3.0},
    {**FIG, "sum": 2},  # fewer requests than batches
    {**FIG, "sum": 25},  # more than 3 batches of at most 8 can hold
    {**FIG, "buckets": []}, {**FIG, "buckets": "x"}, {**FIG, "buckets": [[1, 0], [8]]},
    {**FIG, "buckets": [[1, 0], [8, 3, 0]]}, {**FIG, "buckets": [[0, 0], [8, 3]]},
    {**FIG, "buckets": [[4, 1], [2, 2], [8, 3]]},  # bounds not rising
    {**FIG, "buckets": [[4, 2], [7, 1], [8, 3]]},  # cumulative going down
    {**FIG, "buckets": [[4, 1], [8, 2]]},  # a batch outside the largest bucket
    {**FIG, "buckets": [["4", 1], [8, 3]]}, {**FIG, "buckets": [[4, 1.0], [8, 3]]},
    {**FIG, "buckets": [[k, 0] for k in range(1, 40)] + [[40, 3]]},  # over MAX_BUCKETS
])
def test_router_ignores_a_malformed_entry_and_keeps_the_rest(entry):
    b = BatchSizes()
    assert b.add({"work": entry, "other": FIG}, frozenset({"work", "other"})) == 1
    assert set(b.figures) == {"other"}


def test_router_bounds_what_a_worker_can_make_it_keep():
    methods = frozenset(f"m{i}" for i in range(100))
    b = BatchSizes()
    assert b.add({"unknown": FIG}, methods) == 1  # a method it did not announce
    assert b.add("not a map", methods) == 1 and b.add([FIG], methods) == 1
    assert b.add({f"m{i}": FIG for i in range(33)}, methods) == 1  # too many at once: all out
    assert b.figures == {}
    for i in range(40):  # a few at a time: the first MAX_METHODS are kept, no more
        b.add({f"m{i}": FIG}, methods)
    assert len(b.figures) == BatchSizes.MAX_METHODS
    assert b.add({"m0": FIG, "m39": FIG}, methods) == 1  # known ones still update
    went_back = {"count": 2, "sum": 9, "buckets": [[4, 1], [8, 2]]}
    assert b.add({"m0": went_back}, methods) == 1  # cumulative figures never go back
    assert b.figures["m0"]["count"] == 3


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**64 - 1) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.sampled_from(["count", "sum", "buckets", "work", "x"]), inner,
                      max_size=5),
    max_leaves=16)
_buckets = st.lists(st.lists(st.integers(-1, 40), min_size=2, max_size=2), max_size=6)
_entries = _values | st.fixed_dictionaries(
    {"count": st.integers(-1, 40), "sum": st.integers(-1, 200), "buckets": _buckets})


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["work", "other", "x"]) | st.text(max_size=4), _entries,
                       max_size=4) | _values)
def test_router_takes_any_batches_field_without_raising(report):
    b = BatchSizes()
    ignored = b.add(report, frozenset({"work", "other"}))
    assert ignored >= 0 and set(b.figures) <= {"work", "other"}
    for f in b.figures.values():  # what it keeps is consistent
        assert f["buckets"][-1][1] == f["count"] >= 1 and f["count"] <= f["sum"]
        assert batch_histogram([f]).count == f["count"]


def _beat(h: Harness, ident: bytes, **meta: object) -> None:
    h.backend(ident + protocol.HEARTBEAT_SUFFIX, Kind.HEARTBEAT, {"of": ident, **meta})


def _row(h: Harness) -> dict:
    return h.core.status()["workers"][0]


def test_status_shows_each_worker_s_figures_and_a_new_incarnation_starts_at_zero():
    h = Harness()
    h.hello(workers=1)
    w = h.ready("default/0", methods=("work", "plain"))
    assert _row(h)["batches"] == {}
    _beat(h, w, busy=[0.5, 1.0])  # no batches: nothing ran yet
    _beat(h, w, batches={"work": FIG})
    assert _row(h)["batches"] == {"work": {**FIG, "mean": 6.667}}
    _beat(h, w)  # a beat without batches keeps what is known
    assert _row(h)["batches"]["work"]["count"] == 3
    h.slot_event("default/0", "died", reason="was killed by SIGKILL")
    h.tick(1.0)  # past the death grace
    assert _row(h)["batches"] == {}
    w2 = h.ready("default/0", incarnation=2, methods=("work",))
    assert _row(h)["batches"] == {}
    _beat(h, w2, batches={"work": {"count": 1, "sum": 2, "buckets": [[1, 0], [2, 1]]}})
    assert _row(h)["batches"]["work"]["count"] == 1  # counted anew, not "going back"
    assert "batch_reports_ignored" not in h.core.stats


def test_a_malformed_or_huge_batches_field_is_counted_and_never_hurts_the_router():
    h = Harness()
    h.hello(workers=1)
    w = h.ready("default/0", methods=("work",))
    _beat(h, w, batches={"work": FIG})
    for bad in ("x", 7, [1, 2], {"work": "x"}, {"work": {**FIG, "count": "3"}},
                {"nope": FIG}, {f"m{i}": FIG for i in range(40)},
                {"work": {**FIG, "buckets": [[k, 0] for k in range(1, 40)] + [[40, 3]]}}):
        _beat(h, w, batches=bad)
    assert h.core.stats["batch_reports_ignored"] == 8
    # Huger ones never reach it: the meta frame's own bounds drop the whole beat (9.3).
    for huge in ({f"m{i}": FIG for i in range(10_000)},
                 {"work": {**FIG, "buckets": [[k, 0] for k in range(1, 5000)]}}):
        _beat(h, w, batches=huge)
    assert h.core.stats["bad_frames_backend"] == 2
    assert h.core.stats["internal_errors"] == 0
    row = _row(h)
    assert row["batches"] == {"work": {**FIG, "mean": 6.667}}
    assert row["state"] == "ready"


# -- what a Prometheus histogram needs -----------------------------------------------------------
def test_histogram_of_one_worker():
    hist = batch_histogram([FIG])
    assert hist.buckets == [(1.0, 0), (2.0, 0), (4.0, 1), (7.0, 1), (8.0, 3), (math.inf, 3)]
    assert (hist.count, hist.sum) == (3, 20.0)


def test_histogram_merges_workers_and_keeps_only_bounds_exact_for_all():
    other = {"count": 2, "sum": 3, "buckets": [[1, 1], [2, 1], [4, 2], [7, 2], [8, 2]]}
    assert batch_histogram([FIG, other]).buckets == [
        (1.0, 1), (2.0, 1), (4.0, 3), (7.0, 3), (8.0, 5), (math.inf, 5)]
    # A worker whose max_batch_size is 4: its bound 3 is not one of FIG's, and FIG's 7 is
    # not one of its (but 7 and 8 are past its largest, which holds all it ran).
    small = {"count": 2, "sum": 5, "buckets": [[1, 0], [2, 1], [3, 1], [4, 2]]}
    hist = batch_histogram([FIG, small])
    assert hist.buckets == [(1.0, 0), (2.0, 1), (4.0, 3), (7.0, 3), (8.0, 5), (math.inf, 5)]
    assert (hist.count, hist.sum) == (5, 25.0)


def test_histogram_of_no_worker_is_empty():
    assert batch_histogram([]) == ([(math.inf, 0)], 0, 0.0)


def test_status_rows_feed_the_histogram():
    h = Harness()
    h.hello(workers=2)
    a, b = h.ready("default/0", methods=("work",)), h.ready("default/1", methods=("work",))
    _beat(h, a, batches={"work": FIG})
    _beat(h, b, batches={"work": FIG})
    figures = [w["batches"]["work"] for w in h.core.status()["workers"]]
    hist = batch_histogram(figures)
    assert hist.count == 6 and hist.buckets[-2] == (8.0, 6)
