"""The metrics' pure parts with plain values: bucket counting, death causes, error types,
address parsing, counting in the core (fake clock, no sockets), snapshot to exposition,
and the hand-over between the loop and the listener thread."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import msgpack
import pytest

from ipc.errors import HandlerError
from ipc.protocol import Kind
from router.metrics import (
    LAG_BUCKETS,
    SECONDS_BUCKETS,
    LoopMeter,
    ServiceFigures,
    ServiceMeter,
    Snapshot,
    death_cause,
    error_type,
    take_snapshot,
)
from tests.router_harness import Harness
from workerpool.config import RouterConfig, parse_http_address
from workerpool.histogram import Histogram, HistogramValues

prometheus_client = pytest.importorskip(
    "prometheus_client", reason="prometheus-client is not installed (the 'metrics' extra)")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from router import exposition  # noqa: E402
from router.listener import Snapshots  # noqa: E402

C = b"client-1"


# -- buckets ----------------------------------------------------------------------------------
def test_a_value_on_a_bound_counts_in_that_bucket_and_above_all_in_inf():
    h = Histogram((1.0, 2.0, 5.0))
    for v in (0.5, 1.0, 1.5, 2.0, 5.0, 7.0, 100.0):
        h.observe(v)
    assert h.counts == [2, 2, 1, 2]
    assert h.sum == pytest.approx(117.0)
    values = h.freeze()
    assert values.count == 7
    assert values.cumulative() == [(1.0, 2), (2.0, 4), (5.0, 5), (float("inf"), 7)]


def test_frozen_values_do_not_follow_later_observations():
    h = Histogram((1.0,))
    h.observe(0.5)
    frozen = h.freeze()
    h.observe(0.5)
    assert frozen.counts == (1, 0) and h.counts == [2, 0]


def test_bucket_bounds_are_sorted():
    for bounds in (SECONDS_BUCKETS, LAG_BUCKETS):
        assert list(bounds) == sorted(set(bounds))


# -- causes and error types -------------------------------------------------------------------
@pytest.mark.parametrize(("exitcode", "reason", "cause"), [
    (-9, "was killed by SIGKILL", "SIGKILL"),
    (-11, "was killed by SIGSEGV", "SIGSEGV"),
    (-9, "was killed (SIGKILL) as hung: sent no heartbeat for 3.1s", "hung"),
    (75, "exited with code 75 (its CUDA context was poisoned)", "context-poisoned"),
    (3, "exited with code 3", "exit"),
    (0, "restarted (exited with code 0)", "restart"),
    (-200, "was killed by signal 200", "signal"),
    (None, "died", "exit"),
    ("-9", "anything a peer sends", "exit"),
    (True, "a bool is no exit status", "exit"),
])
def test_death_causes_are_a_small_fixed_set(exitcode, reason, cause):
    assert death_cause(exitcode, reason) == cause


def test_the_error_type_is_read_from_a_worker_error_body():
    body = msgpack.packb(HandlerError("ValueError: boom", worker="default/0",
                                      traceback="x" * 100_000).to_wire())
    assert error_type(body) == "HandlerError"
    # Not first among the keys: still found.
    assert error_type(msgpack.packb({"message": "m", "type": "WorkerCrashedError"})) \
        == "WorkerCrashedError"


@pytest.mark.parametrize("body", [
    msgpack.packb({"type": "NoSuchErrorFromANewerPeer" * 10}),
    msgpack.packb({"type": 7}),
    msgpack.packb(["type", "HandlerError"]),
    msgpack.packb({f"k{i}": i for i in range(20)} | {"type": "HandlerError"}),
    b"",
    b"\xc1\xff\x00",
])
def test_an_error_body_without_a_known_type_counts_as_the_base_type(body):
    assert error_type(body) == "WorkerPoolError"


# -- addresses --------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("9464", ("127.0.0.1", 9464)),
    (":9464", ("127.0.0.1", 9464)),
    ("0.0.0.0:9464", ("0.0.0.0", 9464)),
    ("metrics.internal:80", ("metrics.internal", 80)),
    ("[::1]:9464", ("::1", 9464)),
    (" 127.0.0.1:1 ", ("127.0.0.1", 1)),
])
def test_metrics_addresses(text, expected):
    assert parse_http_address(text) == expected


@pytest.mark.parametrize("text", ["", ":", "x", "host:", ":0", "65536", "::1:9464", "[]:80",
                                  "[zz]:80", "a b:80", "٩٤٦٤", "tcp://127.0.0.1:9464"])
def test_bad_metrics_addresses_are_refused(text):
    with pytest.raises(ValueError):
        parse_http_address(text)


def test_the_config_keeps_the_address_normalised():
    assert RouterConfig().metrics is None
    assert RouterConfig(metrics=":9464").metrics == "127.0.0.1:9464"
    assert RouterConfig(metrics="[::1]:9464").metrics == "[::1]:9464"
    with pytest.raises(ValueError, match=r"port in 1\.\.65535"):
        RouterConfig(metrics="127.0.0.1:99999")


# -- counting in the core ---------------------------------------------------------------------
def _metered() -> Harness:
    h = Harness(metrics="127.0.0.1:1")
    h.hello(workers=1)
    return h


def _scrape(h: Harness, loop: LoopMeter | None = None, age: float = 0.0) -> dict:
    """The exposition of the core's figures now, parsed: {(name, labels...): value}."""
    snap = take_snapshot(h.core, loop or LoopMeter(), h.clock())
    text = exposition.render(snap, age).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def _requests(scrape: dict) -> dict:
    return {tuple(v for _, v in k[1:]): n for k, n in scrape.items()
            if k[0] == "workerpool_requests_total"}


def test_without_metrics_the_core_counts_nothing_extra():
    h = Harness()
    h.hello(workers=1)
    assert h.core.meters is None and h.core.services["default"].meter is None


def test_outcomes_durations_and_waits_are_counted_per_service_and_method():
    h = _metered()
    w = h.ready("default/0", capacity=1, methods=("echo", "fail"))
    h.request(C, 1)
    h.request(C, 2, method="fail")  # queued behind request 1
    rid1, = h.dispatched_to(w)
    h.clock.advance(0.003)
    h.reply(w, rid1, "ok")
    rid2 = h.dispatched_to(w)[-1]
    h.clock.advance(0.2)
    h.backend(w, Kind.ERROR, req_id=rid2, body=msgpack.packb(HandlerError("E: x").to_wire()))
    s = _scrape(h)
    assert _requests(s) == {("echo", "ok", "default"): 1, ("fail", "HandlerError", "default"): 1}
    dur = "workerpool_request_duration_seconds"
    assert s[(f"{dur}_count", ("method", "echo"), ("service", "default"))] == 1
    assert s[(f"{dur}_bucket", ("le", "0.0025"), ("method", "echo"), ("service", "default"))] == 0
    assert s[(f"{dur}_bucket", ("le", "0.005"), ("method", "echo"), ("service", "default"))] == 1
    assert s[(f"{dur}_sum", ("method", "fail"), ("service", "default"))] == pytest.approx(0.203)
    # Request 2 waited in the queue 3 ms, then ran 200 ms.
    qw = "workerpool_queue_wait_seconds"
    assert s[(f"{qw}_count", ("service", "default"))] == 2
    assert s[(f"{qw}_sum", ("service", "default"))] == pytest.approx(0.003)
    st = "workerpool_service_time_seconds"
    assert s[(f"{st}_sum", ("service", "default"))] == pytest.approx(0.203)


def test_router_made_errors_cancels_and_dropped_clients_have_their_outcomes():
    h = _metered()
    w = h.ready("default/0", capacity=1)
    h.request(C, 1, timeout=1.0)  # runs, then times out
    h.request(C, 2)  # queued, then cancelled
    h.request(b"gone", 3)  # queued, then its client is gone
    h.client_msg(C, Kind.CANCEL, 2)
    h.core.clients.gone(b"gone")
    h.tick(1.5)
    h.reply(w, h.dispatched_to(w)[0], "late")  # dropped: already answered
    assert _requests(_scrape(h)) == {("echo", "RequestTimeoutError", "default"): 1,
                                     ("echo", "cancelled", "default"): 1,
                                     ("echo", "dropped", "default"): 1}


def test_a_crash_counts_the_request_and_the_restart_by_cause():
    h = _metered()
    w = h.ready("default/0", capacity=1)
    h.request(C, 1)
    h.slot_event("default/0", "died", exitcode=-9, reason="was killed by SIGKILL")
    h.tick(0.01)
    h.ready("default/0", incarnation=2)
    h.slot_event("default/0", "died", exitcode=-11, reason="was killed by SIGSEGV")
    h.tick(0.01)
    s = _scrape(h)
    assert _requests(s) == {("echo", "WorkerCrashedError", "default"): 1}
    restarts = {k: v for k, v in s.items() if k[0] == "workerpool_worker_restarts_total"}
    assert restarts == {
        ("workerpool_worker_restarts_total", ("cause", "SIGKILL"), ("node", "sup"),
         ("service", "default"), ("worker", "default/0")): 1,
        ("workerpool_worker_restarts_total", ("cause", "SIGSEGV"), ("node", "sup"),
         ("service", "default"), ("worker", "default/0")): 1}
    assert w not in h.core.registry.conns


def test_backpressure_is_counted_as_an_outcome_and_a_rejection():
    h = Harness(metrics="127.0.0.1:1")
    h.hello(workers=1, capacity_policy="reject")
    h.ready("default/0", capacity=1)
    h.request(C, 1)
    h.request(C, 2)  # refused: the one worker is full
    s = _scrape(h)
    assert _requests(s)[("echo", "BackpressureError", "default")] == 1
    assert s[("workerpool_backpressure_rejections_total", ("service", "default"))] == 1
    assert s[("workerpool_queue_depth", ("service", "default"))] == 0
    # node: the supervisor's routing id, as this HELLO names neither a node nor a host
    assert s[("workerpool_in_flight", ("node", "sup"), ("service", "default"),
              ("worker", "default/0"))] == 1
    assert s[("workerpool_worker_state", ("node", "sup"), ("service", "default"),
              ("state", "busy"), ("worker", "default/0"))] == 1
    assert s[("workerpool_worker_state", ("node", "sup"), ("service", "default"),
              ("state", "ready"), ("worker", "default/0"))] == 0


def test_names_from_clients_never_become_labels():
    h = Harness(metrics="127.0.0.1:1", registration_grace=1.0)
    h.hello(workers=1)
    w = h.ready("default/0", capacity=4)
    for i in range(50):
        h.request(C, 100 + i, method=f"no-such-method-{i}")  # refused: UnknownMethodError
        h.request(C, 200 + i, service=f"no-such-service-{i}")  # waits out the grace
    h.tick(1.5)  # the grace is over: those fail, and their services are forgotten
    h.request(C, 300, service="still-unknown")  # refused at once now
    h.request(C, 301)
    h.reply(w, h.dispatched_to(w)[-1], "ok")
    s = _scrape(h)
    text = repr(s)
    assert "no-such" not in text and "still-unknown" not in text
    assert _requests(s) == {("", "UnknownMethodError", "default"): 50,
                            ("echo", "ok", "default"): 1}
    assert s[("workerpool_unknown_service_requests_total",)] == 51


def test_a_method_admitted_before_any_worker_registered_is_labelled_only_if_registered():
    h = Harness(metrics="127.0.0.1:1")
    h.hello(workers=1)
    h.request(C, 1, method="echo")  # no worker yet: no method is known, both wait
    h.request(C, 2, method="made-up")
    w = h.ready("default/0", capacity=2, methods=("echo",))
    rids = h.dispatched_to(w)
    h.reply(w, rids[0], "ok")
    h.backend(w, Kind.ERROR, req_id=rids[1], body=msgpack.packb(
        {"type": "UnknownMethodError", "message": "no"}))
    assert _requests(_scrape(h)) == {("echo", "ok", "default"): 1,
                                     ("", "UnknownMethodError", "default"): 1}


def test_gpu_memory_and_utilization_come_from_the_heartbeat():
    h = _metered()
    w = h.ready("default/0")
    h.core.registry.slots["default/0"].device = "cuda:1"
    h.backend(w + b"#hb", Kind.HEARTBEAT, {"of": w, "busy": [0.5, 1.0],
                                           "mem": {"rss": 10, "gpu_reserved": 2**30}})
    s = _scrape(h)
    assert s[("workerpool_gpu_memory_bytes", ("device", "cuda:1"), ("node", "sup"),
              ("worker", "default/0"))] == 2**30
    assert s[("workerpool_worker_utilization", ("node", "sup"), ("service", "default"),
              ("worker", "default/0"))] == 0.5


# -- snapshot to exposition -------------------------------------------------------------------
def _plain_snapshot() -> Snapshot:
    h = HistogramValues((0.1, 1.0), (3, 1, 1), 5.25)
    status = {
        "router": {}, "services": [
            {"name": "svc", "queued": 7, "rejected_backpressure": 2},
            {"name": "undescribed", "queued": 1, "rejected_backpressure": 0}],
        "workers": [{"id": "svc/0", "service": "svc", "device": "cpu", "state": "spare",
                     "in_flight": 0, "utilization": None, "memory": {"rss": 1}, "node": "a",
                     "host": "box"}],
        "nodes": [{"node": "a", "host": "box", "state": "connected", "rtt_smoothed_ms": 1.5},
                  {"node": "lost", "host": "box", "state": "lost", "rtt_smoothed_ms": 2.0},
                  {"node": "new", "host": None, "state": "connected",
                   "rtt_smoothed_ms": None}]}
    return Snapshot(
        taken_at=0.0, status=status,
        services=(ServiceFigures("svc", (("m", "ok", 4), ("m", "HandlerError", 1)),
                                 (("m", h),), (("m", HistogramValues((1, 2), (0, 3, 0), 6)),),
                                 h, h),),
        restarts=(("svc", "svc/0", "exit", 2),), frontend_messages=10, backend_messages=12,
        loop_lag=HistogramValues(LAG_BUCKETS, (1,) + (0,) * len(LAG_BUCKETS), 1e-6),
        unknown_service=3)


def test_a_snapshot_renders_every_family_with_its_values():
    text = exposition.render(_plain_snapshot(), 0.25).decode()
    assert '# TYPE workerpool_requests_total counter' in text
    assert 'workerpool_requests_total{method="m",outcome="ok",service="svc"} 4.0' in text
    assert 'workerpool_request_duration_seconds_bucket{le="0.1",method="m",service="svc"} 3.0' \
        in text
    assert 'workerpool_request_duration_seconds_bucket{le="1.0",method="m",service="svc"} 4.0' \
        in text
    assert 'workerpool_request_duration_seconds_bucket{le="+Inf",method="m",service="svc"} 5.0' \
        in text
    assert 'workerpool_request_duration_seconds_count{method="m",service="svc"} 5.0' in text
    assert 'workerpool_request_duration_seconds_sum{method="m",service="svc"} 5.25' in text
    assert 'workerpool_batch_size_bucket{le="2.0",method="m",service="svc"} 3.0' in text
    assert 'workerpool_queue_depth{service="svc"} 7.0' in text
    assert 'workerpool_backpressure_rejections_total{service="svc"} 2.0' in text
    assert 'workerpool_worker_state{node="a",service="svc",state="spare",worker="svc/0"} 1.0' \
        in text
    assert 'workerpool_worker_state{node="a",service="svc",state="ready",worker="svc/0"} 0.0' \
        in text
    assert 'workerpool_worker_restarts_total{cause="exit",node="a",service="svc",' \
        'worker="svc/0"} 2.0' in text
    assert 'workerpool_node_rtt_seconds{host="box",node="a"} 0.0015' in text
    assert 'node="lost"' not in text  # a lost node's round trip is not current
    assert 'workerpool_router_messages_total{socket="backend"} 12.0' in text
    assert 'workerpool_router_loop_lag_seconds_count 1.0' in text
    assert 'workerpool_unknown_service_requests_total 3.0' in text
    assert 'workerpool_snapshot_age_seconds 0.25' in text
    # Not labelled: a service only the status object knows; no utilization or GPU memory
    # reported, no series.
    assert "undescribed" not in text
    assert "workerpool_worker_utilization{" not in text
    assert "workerpool_gpu_memory_bytes{" not in text
    # Prometheus' own parser reads it all.
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "workerpool_request_duration_seconds" in names


def test_a_batch_reported_for_a_method_is_a_histogram_of_that_method():
    h = _metered()
    h.ready("default/0")
    meter = h.core.services["default"].meter
    meter.batches("echo", None, {"count": 4, "sum": 47, "buckets": [  # 1, 8, 8 and 30
        [1, 1], [2, 1], [4, 1], [8, 3], [16, 3], [31, 4], [32, 4]]})
    s = _scrape(h)
    b = "workerpool_batch_size"
    assert s[(f"{b}_count", ("method", "echo"), ("service", "default"))] == 4
    assert s[(f"{b}_bucket", ("le", "8.0"), ("method", "echo"), ("service", "default"))] == 3
    assert s[(f"{b}_sum", ("method", "echo"), ("service", "default"))] == 47


# -- the hand-over --------------------------------------------------------------------------
def _snap(taken_at: float) -> Snapshot:
    return Snapshot(taken_at, {}, (), (), 0, 0, Histogram(()).freeze(), 0)


def test_a_scrape_asks_the_loop_once_and_reuses_a_fresh_snapshot(monkeypatch):
    woken = []
    box = Snapshots(lambda: woken.append(1))
    now = [100.0]
    monkeypatch.setattr("router.listener.time", type("T", (), {"monotonic": lambda: now[0]}))
    box.publish(_snap(100.0))  # the loop answered an earlier request
    assert box.get(max_age=0.1, wait=0.0).taken_at == 100.0 and not woken
    box.publish(_snap(100.3))  # the answer to an earlier request leaves a token behind
    now[0] = 100.5  # both are stale now: the loop is asked again
    assert box.get(max_age=0.1, wait=0.0).taken_at == 100.3  # no answer in time: the last
    assert woken == [1] and box.wanted  # the old token was not taken for the answer


def test_a_scrape_the_loop_does_not_answer_gets_the_last_snapshot():
    box = Snapshots(lambda: None)
    assert box.get(max_age=0.0, wait=0.01) is None  # nothing published yet
    box.publish(_snap(0.0))
    assert box.get(max_age=0.0, wait=0.01).taken_at == 0.0  # stale, but an answer
    assert box.wanted  # still asked: the loop publishes on its next pass
    box.stop()
    assert box.get(max_age=0.0, wait=10.0).taken_at == 0.0  # at once: the loop has ended


def test_the_loop_sees_the_request_and_its_publish_answers_it():
    import threading

    box = Snapshots(lambda: None)
    got = []
    t = threading.Thread(target=lambda: got.append(box.get(max_age=0.0, wait=10.0)))
    t.start()
    while not box.wanted:  # the loop's check, each pass
        pass
    box.publish(_snap(42.0))
    t.join(10)
    assert got[0].taken_at == 42.0 and not box.wanted


def test_a_reply_read_before_the_death_notice_counts_once_as_itself():
    h = _metered()
    w = h.ready("default/0", capacity=1)
    h.request(C, 1)
    rid, = h.dispatched_to(w)
    h.slot_event("default/0", "died", exitcode=-9, reason="was killed by SIGKILL")
    h.reply(w, rid, "its last words")  # read before the death notice is applied: it counts
    h.tick(0.01)
    assert _requests(_scrape(h)) == {("echo", "ok", "default"): 1}


def test_without_prometheus_client_the_listener_says_what_to_install():
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "from router.metrics import ListenerError, listener_module\n"
            "try:\n    listener_module()\nexcept ListenerError as exc:\n    print(exc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.startswith("--metrics needs prometheus-client (")
    assert out.stdout.rstrip().endswith("pip install 'workerpool[metrics]'")


# -- the flag and the config key --------------------------------------------------------------
class _RecordingSupervisor:
    """Stands in for `up`'s supervisor: keeps the router's command line, starts nothing."""

    argv: list[str] = []

    def __init__(self, services, backend, config, router_argv=None, **kwargs):
        _RecordingSupervisor.argv = router_argv
        self.on_ready = None

    def install_signal_handlers(self) -> None:
        pass

    def run(self) -> int:
        return 0


@pytest.fixture
def up(monkeypatch, tmp_path):
    """Runs `workerpool up ARGS` without starting anything; returns (exit code, output,
    the router config's `metrics`)."""
    import json

    from click.testing import CliRunner

    from workerpool.cli import main

    monkeypatch.setattr("workerpool.supervisor.Supervisor", _RecordingSupervisor)

    def run(*args: str, toml: str | None = None) -> tuple[int, str, str | None]:
        _RecordingSupervisor.argv = []
        if toml is not None:
            (tmp_path / "pool.toml").write_text(toml)
            args = ("--config", str(tmp_path / "pool.toml"), *args)
        out = CliRunner().invoke(main, ["up", *args])
        argv = _RecordingSupervisor.argv
        return out.exit_code, out.output, json.loads(argv[3])["metrics"] if argv else None

    return run


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_up_hands_the_metrics_address_to_its_router(up):
    p, q = _port(), _port()
    assert up() == (0, "", None)
    assert up("--metrics", str(p))[2] == f"127.0.0.1:{p}"
    assert up(toml=f'[router]\nmetrics = ":{p}"\n')[2] == f"127.0.0.1:{p}"
    assert up("--metrics", f"127.0.0.1:{q}", toml=f'[router]\nmetrics = ":{p}"\n')[2] \
        == f"127.0.0.1:{q}"  # the flag over the file


def test_up_refuses_a_bad_metrics_address_before_starting(up):
    code, output, metrics = up("--metrics", "localhost")
    assert code == 2 and metrics is None
    assert "metrics: Value error, 'localhost' is not HOST:PORT, :PORT or PORT" in output


def test_a_service_described_without_slots_is_a_label():
    h = Harness(metrics="127.0.0.1:1")
    h.tick()  # the registration grace is over
    h.hello(service="later", workers=0)  # scaled to 0: no slot
    h.request(C, 1, service="later")  # refused: no live workers
    assert _requests(_scrape(h)) == {("", "ServiceUnavailableError", "later"): 1}  # no methods


def test_the_listener_serves_its_pages_and_a_silent_client_does_not_hold_its_close():
    import socket
    import urllib.error
    import urllib.request

    from router.listener import Listener

    def loop_wakes() -> None:  # what the loop does when woken: publish a fresh copy
        listener.snapshots.publish(dataclasses.replace(_plain_snapshot(),
                                                       taken_at=time.monotonic()))

    listener = Listener("127.0.0.1:" + str(_port()), loop_wakes)
    listener.start()
    base = f"http://{listener.address}"
    try:
        with urllib.request.urlopen(f"{base}/api/status?x=1", timeout=5) as resp:
            assert resp.headers["Content-Type"] == "application/json"
            assert json.loads(resp.read())["workers"][0]["id"] == "svc/0"
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
            assert b'workerpool_queue_depth{service="svc"} 7.0' in resp.read()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/nope", timeout=5)
        assert err.value.code == 404
        assert b"/api/status, /dashboard.css, /dashboard.js, /healthz, /metrics" in \
            err.value.read()
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as resp:
            assert json.loads(resp.read())["live"] is True
        silent = socket.create_connection(listener.address.rsplit(":", 1))  # sends nothing
    finally:
        t = time.monotonic()
        listener.close()
        assert time.monotonic() - t < 2  # not the 5 s the silent client may take
    silent.close()


def test_healthz_fails_once_the_loop_stops_handing_over_snapshots():
    """The listener's thread answers whatever the loop does: /api/status would serve the
    last figures of a stuck loop; /healthz says 503 once a snapshot asked for does not
    come within SNAPSHOT_WAIT, so a liveness probe needs no key and no frontend."""
    import urllib.error
    import urllib.request

    from router.listener import SNAPSHOT_WAIT, Listener, health_page

    assert health_page(_plain_snapshot(), 0.05)[0] == 200
    code, _, body = health_page(_plain_snapshot(), SNAPSHOT_WAIT + 2)
    assert code == 503 and "has not answered for 3.0s" in json.loads(body)["why"]
    stuck = threading.Event()

    def loop_wakes() -> None:  # answers until it is stuck
        if not stuck.is_set():
            listener.snapshots.publish(dataclasses.replace(_plain_snapshot(),
                                                           taken_at=time.monotonic()))

    listener = Listener("127.0.0.1:" + str(_port()), loop_wakes)
    listener.start()
    base = f"http://{listener.address}"
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as resp:
            assert resp.status == 200
        stuck.set()
        time.sleep(0.2)  # older than MAX_AGE: the next request asks the loop
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
        assert err.value.code == 503 and json.loads(err.value.read())["live"] is False
        with urllib.request.urlopen(f"{base}/api/status", timeout=5) as resp:
            assert resp.status == 200  # the last figures: why /healthz is the probe
    finally:
        listener.close()


def test_batch_sizes_come_from_the_workers_cumulative_reports():
    """A worker's heartbeats carry cumulative figures (health.BatchSizes); the histogram
    counts what each report adds, in the BATCH_BUCKETS bucket holding the worker's bound."""
    meter = ServiceMeter()
    first = {"count": 3, "sum": 18, "buckets": [[1, 0], [2, 1], [4, 1], [7, 1], [8, 3]]}
    meter.batches("work", None, first)  # batches of 2, 8 and 8
    h = meter.method("work").batch_size.freeze()
    assert dict(h.cumulative())[2] == 1 and dict(h.cumulative())[4] == 1
    assert dict(h.cumulative())[8] == 3 and (h.count, h.sum) == (3, 18)
    second = {"count": 5, "sum": 24, "buckets": [[1, 1], [2, 2], [4, 2], [7, 3], [8, 5]]}
    meter.batches("work", first, second)  # then batches of 1 and 5
    h = meter.method("work").batch_size.freeze()
    cum = dict(h.cumulative())
    assert (cum[1], cum[2], cum[4], cum[8], h.count, h.sum) == (1, 2, 2, 5, 5, 24)
    meter.batches("work", second, second)  # a beat that moved nothing adds nothing
    assert meter.method("work").batch_size.freeze().count == 5


def test_a_scrape_wakes_the_loop_through_the_fd_the_loop_polls(tmp_path):
    """The listener asks the loop for a snapshot by waking it. It once held the wake-up of
    a pipe the loop did not poll, so each scrape waited for the loop's next timer (16 to
    99 ms on an idle pool, against 2 ms since)."""
    import socket

    from router.router import Router

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    router = Router(RouterConfig(frontend=f"ipc://{tmp_path}/front",
                                 backend=f"ipc://{tmp_path}/back",
                                 metrics=f"127.0.0.1:{port}"))
    try:
        assert router.listener.snapshots._wake == router._wakeup.wake
    finally:
        router.close()
