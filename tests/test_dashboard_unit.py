"""The dashboard's history with plain values: rates, latency quantiles, deaths, what a sample
holds and what is dropped (snapshots built by hand, times given, no clock); and the
listener's dashboard pages, which never ask the poll loop for anything."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from router.history import (
    LATENCY_WINDOW,
    MIN_GAP,
    History,
    counts_between,
    new_deaths,
    outcome_counts,
    quantile,
    rate,
)
from router.metrics import SECONDS_BUCKETS, ServiceFigures, Snapshot
from workerpool.histogram import HistogramValues

pytest.importorskip("prometheus_client",
                    reason="prometheus-client is not installed (the 'metrics' extra)")
from router.listener import Listener

EMPTY = HistogramValues((), (0,), 0.0)


def _durations(*seconds: float) -> HistogramValues:
    counts = [0] * (len(SECONDS_BUCKETS) + 1)
    for s in seconds:
        counts[next((i for i, b in enumerate(SECONDS_BUCKETS) if s <= b), len(SECONDS_BUCKETS))] += 1
    return HistogramValues(SECONDS_BUCKETS, tuple(counts), sum(seconds))


def _snap(taken_at: float, ok: int = 0, errors: int = 0, durations: tuple[float, ...] = (),
          queued: int = 0, in_flight: int = 0, restarts: tuple = (), workers: tuple = (),
          services: tuple[str, ...] = ("svc",)) -> Snapshot:
    """A snapshot of services named ``services`` (the first with the given figures, the
    others idle), and the worker rows ``workers``."""
    figures = []
    rows = []
    for i, name in enumerate(services):
        requests = [("m", "ok", ok), ("m", "HandlerError", errors), ("m", "cancelled", 7)] if i == 0 \
            else []
        figures.append(ServiceFigures(
            name, tuple(requests),
            (("m", _durations(*durations)),) if i == 0 and durations else (),
            (), EMPTY, EMPTY))
        rows.append({"name": name, "queued": queued if i == 0 else 0,
                     "in_flight": in_flight if i == 0 else 0})
    return Snapshot(taken_at, {"services": rows, "workers": list(workers)}, tuple(figures),
                    restarts, 0, 0, EMPTY, 0)


# -- the pure parts ---------------------------------------------------------------------------
def test_a_rate_is_per_second_and_never_negative():
    assert rate(10, 25, 1.5) == 10.0
    assert rate(25, 10, 1.0) == 0.0  # a counter that went back (a slot removed and re-added)
    assert rate(0, 5, 0.0) == 0.0


def test_quantiles_interpolate_within_their_bucket_like_prometheus():
    bounds = (1.0, 2.0, 4.0)
    assert quantile(bounds, (0, 0, 0, 0), 0.5) is None
    assert quantile(bounds, (4, 0, 0, 0), 0.5) == 0.5  # half of the first bucket, from 0
    assert quantile(bounds, (2, 2, 0, 0), 0.75) == 1.5
    assert quantile(bounds, (0, 0, 10, 0), 0.99) == pytest.approx(3.98)
    assert quantile(bounds, (1, 0, 0, 9), 0.99) == 4.0  # above every bound: the highest
    assert quantile((), (3,), 0.5) is None


def test_outcomes_split_into_replies_and_errors_without_cancelled_or_dropped():
    fig = ServiceFigures("svc", (("a", "ok", 5), ("a", "HandlerError", 2), ("b", "ok", 1),
                                 ("b", "BackpressureError", 3), ("b", "cancelled", 4),
                                 ("b", "dropped", 6)), (), (), EMPTY, EMPTY)
    assert outcome_counts(fig) == (6, 5)


def test_bucket_counts_between_two_readings():
    assert counts_between((), (1, 2)) == (1, 2)
    assert counts_between((1, 1), (3, 1)) == (2, 0)
    assert counts_between((1,), (3, 1)) == ()  # other bounds: nothing comparable
    assert counts_between((5, 0), (1, 0)) == (0, 0)


def test_new_deaths_are_the_restart_counters_that_rose():
    before = {("s", "s/0", "SIGKILL"): 1, ("s", "s/1", "exit"): 2}
    after = {("s", "s/0", "SIGKILL"): 3, ("s", "s/1", "exit"): 2, ("s", "s/1", "hung"): 1}
    assert new_deaths(before, after) == [(("s", "s/0", "SIGKILL"), 2), (("s", "s/1", "hung"), 1)]
    assert new_deaths(after, before) == []


# -- the history ------------------------------------------------------------------------------
def test_the_first_sample_has_no_rates_and_the_next_ones_do():
    h = History()
    assert h.record(_snap(100.0, ok=10, queued=3, in_flight=2), wall=1000.0)
    assert h.record(_snap(101.0, ok=30, errors=4, queued=1), wall=1001.0)
    first, second = h.export(1001.5)["samples"]
    assert first == {"t": 1000.0, "restarts": 0, "services": {"svc": {
        "queued": 3, "in_flight": 2, "requests_per_s": None, "errors_per_s": None,
        "p50_s": None, "p99_s": None}}}
    assert second["services"]["svc"]["requests_per_s"] == 20.0
    assert second["services"]["svc"]["errors_per_s"] == 4.0
    assert second["services"]["svc"]["queued"] == 1


def test_rates_are_over_the_time_between_the_snapshots_not_the_wall_clock():
    h = History()
    h.record(_snap(100.0, ok=0), wall=1000.0)
    h.record(_snap(102.0, ok=10), wall=5000.0)  # the wall clock jumped: rates do not care
    assert h.export(5000.0)["samples"][1]["services"]["svc"]["requests_per_s"] == 5.0


def test_latency_is_over_the_requests_of_the_last_samples():
    h = History()
    slow = (0.2,) * 10
    h.record(_snap(100.0, durations=slow), wall=1000.0)
    fast = slow + (0.001,) * 10
    h.record(_snap(101.0, durations=fast), wall=1001.0)
    svc = h.export(1001.0)["samples"][1]["services"]["svc"]
    # Only the 10 fast ones are new: all in the bucket (0.5 ms, 1 ms].
    assert svc["p50_s"] == pytest.approx(0.00075)
    assert svc["p99_s"] == pytest.approx(0.000995)
    # A window without requests has no latency; the slow ones leave it after LATENCY_WINDOW.
    for i in range(2, 2 + LATENCY_WINDOW):
        h.record(_snap(100.0 + i, durations=fast), wall=1000.0 + i)
    assert h.export(0)["samples"][-1]["services"]["svc"]["p50_s"] is None


def test_a_snapshot_too_close_to_the_last_sample_is_not_recorded():
    h = History()
    assert h.record(_snap(100.0), wall=1000.0)
    assert not h.record(_snap(100.0), wall=1000.0)  # the same snapshot again
    assert not h.record(_snap(100.0 + MIN_GAP / 2), wall=1000.1)
    assert h.record(_snap(100.0 + MIN_GAP), wall=1000.5)
    assert len(h.export(0)["samples"]) == 2


def test_a_death_is_recorded_once_with_its_worker_cause_and_last_error():
    h = History()
    worker = {"id": "svc/1", "last_error": "x" * 1000 + " was killed by SIGKILL"}
    h.record(_snap(100.0, restarts=(("svc", "svc/0", "exit", 1),)), wall=1000.0)
    h.record(_snap(101.0, restarts=(("svc", "svc/0", "exit", 1), ("svc", "svc/1", "SIGKILL", 2)),
                   workers=(worker,)), wall=1001.0)
    h.record(_snap(102.0, restarts=(("svc", "svc/0", "exit", 1), ("svc", "svc/1", "SIGKILL", 2)),
                   workers=(worker,)), wall=1002.0)
    out = h.export(1002.0)
    assert [s["restarts"] for s in out["samples"]] == [1, 3, 3]
    # The router's first sample holds the deaths it saw before it: they happened in its life.
    first, second = out["deaths"]
    assert first == {"t": 1000.0, "service": "svc", "worker": "svc/0", "cause": "exit",
                     "count": 1, "last_error": None}
    assert (second["t"], second["worker"], second["cause"], second["count"]) == \
        (1001.0, "svc/1", "SIGKILL", 2)
    assert second["last_error"].endswith("was killed by SIGKILL")
    assert len(second["last_error"]) == 301 and second["last_error"][0] == "…"


def test_the_ring_and_the_deaths_stay_bounded():
    h = History(samples=5, max_deaths=3)
    for i in range(50):
        h.record(_snap(100.0 + i, ok=i, restarts=(("svc", "svc/0", "SIGSEGV", i + 1),)),
                 wall=1000.0 + i)
    out = h.export(1050.0)
    assert [s["t"] for s in out["samples"]] == [1045.0, 1046.0, 1047.0, 1048.0, 1049.0]
    assert [d["t"] for d in out["deaths"]] == [1047.0, 1048.0, 1049.0]
    assert out["span"] == 5.0 and out["interval"] == 1.0 and out["now"] == 1050.0


def test_deaths_older_than_every_sample_are_dropped():
    h = History(samples=2)
    h.record(_snap(100.0, restarts=(("svc", "svc/0", "exit", 1),)), wall=1000.0)
    h.record(_snap(101.0, restarts=(("svc", "svc/0", "exit", 1),)), wall=1001.0)
    assert len(h.export(0)["deaths"]) == 1
    h.record(_snap(102.0, restarts=(("svc", "svc/0", "exit", 1),)), wall=1002.0)
    assert h.export(0)["deaths"] == []


def test_a_service_that_appears_later_starts_without_rates():
    h = History()
    h.record(_snap(100.0, ok=5), wall=1000.0)
    h.record(_snap(101.0, ok=9, services=("svc", "late")), wall=1001.0)
    services = h.export(0)["samples"][1]["services"]
    assert services["svc"]["requests_per_s"] == 4.0
    assert services["late"]["requests_per_s"] is None and services["late"]["queued"] == 0


# -- the listener's pages ---------------------------------------------------------------------
def _address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_the_dashboard_pages_are_served_without_asking_the_loop():
    wakes = []
    listener = Listener(_address(), lambda: wakes.append(1))
    listener.sample = lambda: None  # no sampling during this test: only the pages
    listener.start()
    try:
        base = f"http://{listener.address}"
        code, ctype, body = _get(base + "/")
        assert (code, ctype) == (200, "text/html; charset=utf-8")
        assert b'<script src="dashboard.js">' in body and b'href="dashboard.css"' in body
        assert _get(base + "/dashboard.js")[:2] == (200, "text/javascript; charset=utf-8")
        assert _get(base + "/dashboard.css")[:2] == (200, "text/css; charset=utf-8")
        code, ctype, body = _get(base + "/api/history")
        assert (code, ctype) == (200, "application/json")
        assert json.loads(body)["samples"] == []
        code, _, body = _get(base + "/nope")
        assert code == 404 and b"/, /api/history, /api/status, /dashboard.css" in body
        assert wakes == []  # none of them asked the loop for a snapshot
    finally:
        listener.close()


def test_the_listener_samples_the_loop_at_most_once_an_interval():
    listener = Listener(_address(), lambda: None)
    asked = []

    def get(max_age: float) -> Snapshot:
        asked.append(max_age)
        return _snap(100.0, queued=4)

    listener.snapshots.get = get  # the loop's answer
    try:
        listener.sample(now=10.0)
        listener.sample(now=10.9)  # not due yet: nothing asked, nothing recorded
        assert asked == [MIN_GAP]  # a scrape's snapshot will do if it is fresh enough
        samples = json.loads(listener.pages["/api/history"]()[2])["samples"]
        assert len(samples) == 1 and samples[0]["services"]["svc"]["queued"] == 4
        listener.sample(now=11.0)
        assert asked == [MIN_GAP, MIN_GAP]
    finally:
        listener.close()
