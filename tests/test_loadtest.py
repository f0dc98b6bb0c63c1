"""`workerpool loadtest` measures right: known service times come back within the
histogram's precision, open loop shows a server stall that closed loop hides, injected
kills show in the report with every request answered, the JSON keys are stable, and bad
flags are usage errors."""

from __future__ import annotations

import json
import threading

import msgpack
import pytest
import zmq

# The harness's extra (`pip install workerpool[loadtest]`; `make` installs it). The GPU
# machine's image lacks it unless bin/gpu-wheels carried it: skip there, not break.
pytest.importorskip("hdrh", reason="hdrhistogram (the loadtest extra) is not installed")
from click.testing import CliRunner

from ipc import protocol
from ipc.protocol import Kind
from workerpool import Client
from workerpool.cli import main
from workerpool.loadtest import LoadSpec, MethodMix, run
from workerpool.loadtest import runner as run_module
from workerpool.loadtest.recorder import Outcome, Recording, summarize
from workerpool.loadtest.report import EXIT_UNANSWERED, SCHEMA_VERSION, build
from workerpool.loadtest.schedule import MethodPicker, Share, arrivals
from workerpool.loadtest.spec import parse_inject

pytest.importorskip("hdrh", reason="the loadtest extra (hdrhistogram) is not installed")


def _cli(*args: str):
    return CliRunner().invoke(main, ["loadtest", "--no-progress", *args])


# -- the measuring parts, without a pool --------------------------------------------------------
def test_percentiles_are_exact_within_histogram_precision():
    rec = Recording(bucket=0.5, warmup=0.0, methods=["echo"])
    # 10,000 requests with latencies 1..10,000 µs (exactly known percentiles).
    for i in range(1, 10_001):
        rec.add(0.0, 0.0, i / 1e6, 0, Outcome.OK, None, "default/0")
    s = summarize(rec.latency)
    for p, exact_ms in ((50, 5.0), (90, 9.0), (99, 9.9), (99.9, 9.99), ("max", 10.0)):
        got = s[f"p{p:g}" if p != "max" else "max"]
        assert exact_ms <= got <= exact_ms * 1.001 + 0.001, (p, got)  # 3 significant digits
    assert s["min"] == 0.001 and s["count"] == 10_000


@pytest.mark.parametrize("digits", [2, 3])
def test_vectorized_recording_and_summary_match_hdrhistogram(digits):
    import random

    import numpy as np

    from workerpool.loadtest.recorder import PERCENTILES, new_histogram, record_many

    rng = random.Random(digits)
    values = [min(int(rng.lognormvariate(8, 2.5)), 3_600_000_000) for _ in range(20_000)]
    reference, ours = new_histogram(digits), new_histogram(digits)
    for v in values:
        reference.record_value(v)
    record_many(ours, np.array(values, dtype=np.int64))
    assert list(ours.counts) == list(reference.counts)
    assert (ours.total_count, ours.min_value, ours.max_value) == (
        reference.total_count, reference.min_value, reference.max_value)
    s = summarize(ours)
    for p in PERCENTILES:
        assert s[f"p{p:g}"] == round(reference.get_value_at_percentile(p) / 1e3, 3)
    assert s["mean"] == pytest.approx(reference.get_mean_value() / 1e3, abs=1e-3)
    assert s["stddev"] == pytest.approx(reference.get_stddev() / 1e3, rel=1e-6, abs=1e-3)


def test_recordings_merge_across_processes_through_json():
    a = Recording(0.5, 1.0, ["echo", "sleep"])
    b = Recording(0.5, 1.0, ["echo", "sleep"])
    a.add(0.5, 0.5, 0.6, 0, Outcome.OK, None, "default/0")  # warm-up: not in the figures
    a.add(1.2, 1.2, 1.21, 0, Outcome.OK, None, "default/0")
    b.add(1.3, 1.3, 1.33, 1, Outcome.ERROR, "WorkerCrashedError", None)
    b.add(1.4, 1.4, None, 1, Outcome.UNANSWERED, "local_timeout", None)
    b.add_unsent(2)
    b.add_many([(1.5, 1.5, 1.502, 0, Outcome.OK, None, "default/1"),
                (0.9, 0.9, 0.95, 1, Outcome.OK, None, "default/1"),  # warm-up
                (1.6, 1.6, None, 0, Outcome.UNANSWERED, "client_closed", None)])
    merged = Recording.from_dict(json.loads(json.dumps(a.to_dict())))
    merged.merge(Recording.from_dict(json.loads(json.dumps(b.to_dict()))))
    assert dict(merged.counts) == {"sent": 7, "warmup": 2, "ok": 2, "errors": 1,
                                   "unanswered": 2, "unsent": 2}
    assert merged.errors == {"WorkerCrashedError": 1}
    assert merged.unanswered == {"local_timeout": 1, "client_closed": 1}
    assert merged.workers == {"default/0": 1, "default/1": 1}
    assert summarize(merged.method_latency("echo"))["count"] == 2
    assert summarize(merged.latency)["max"] == pytest.approx(10.0, rel=1e-3)
    assert summarize(merged.error_latency)["max"] == pytest.approx(30.0, rel=1e-3)
    # Timeline: sent by send time, ok/errors by completion, latency by intended time.
    assert merged.timeline[1].sent == 2 and merged.timeline[2].sent == 3
    assert merged.timeline[2].ok == 1 and merged.timeline[2].errors == 1
    assert merged.timeline[2].unanswered == 1 and merged.timeline[2].failed == 2
    assert merged.timeline[3].sent == 2 and merged.timeline[3].ok == 1


def test_arrival_schedules():
    spec = LoadSpec(rate=100, duration=1.0)
    one = list(arrivals(spec, Share(0, 1), seed=1))
    assert len(one) == 100 and one[:3] == pytest.approx([0.0, 0.01, 0.02])
    # Two processes interleave into the same constant schedule.
    two = sorted([*arrivals(spec, Share(0, 2), 1), *arrivals(spec, Share(1, 2), 1)])
    assert two == pytest.approx(one)
    poisson = LoadSpec(rate=1000, duration=20.0, arrival="poisson")
    times = list(arrivals(poisson, Share(0, 1), seed=7))
    assert 0.95 * 20_000 < len(times) < 1.05 * 20_000
    assert times == sorted(times) and times == list(arrivals(poisson, Share(0, 1), seed=7))
    assert len(list(arrivals(LoadSpec(rate=50, requests=7), Share(1, 2), 1))) == 3


def test_method_mix_by_weight():
    pick = MethodPicker([MethodMix(method="a", weight=3), MethodMix(method="b", weight=1)],
                        seed=3, share=Share())
    draws = [pick() for _ in range(20_000)]
    assert 0.72 < draws.count(0) / len(draws) < 0.78


def _synthetic_report() -> dict:
    spec = LoadSpec(rate=10, duration=2.0, faults=parse_inject("kill:1s"))
    rec = Recording(spec.bucket(), 0.0, ["echo"])
    for i in range(20):
        rec.add(i / 10, i / 10, i / 10 + 0.001, 0, Outcome.OK, None, f"default/{i % 2}")
    fault = {"kind": "kill", "at_s": 1.0, "injected_at_s": 1.0, "worker": "default/0",
             "pid": 1, "service": "default", "serving_before": 2, "detected_s": 0.05,
             "pool_recovered_s": 0.2, "cause": "was killed by SIGKILL", "error": None}
    return build(spec, 1, rec, faults=[fault], serving=[(0.0, 2, 2, 0.9)], known_workers=[],
                 started_at="2026-01-01T00:00:00+00:00", elapsed=2.0, interrupted=False,
                 notes=[])


def test_latency_recovery_ends_with_the_disturbance_not_later_noise():
    spec = LoadSpec(rate=100, duration=5.0, faults=parse_inject("kill:2s"), interval=0.2)
    rec = Recording(spec.bucket(), 0.0, ["echo"])
    for i in range(500):
        t = i / 100
        latency = 0.001
        if 2.0 <= t < 2.6:
            latency = 0.5  # the fault's disturbance
        elif 3.5 <= t < 3.52:
            latency = 0.3  # unrelated noise later on
        crashed = i in (199, 420)  # running at the fault (answered at 2.05 s); much later
        if i == 199:
            latency = 0.051
        rec.add(t, t, t + latency, 0, Outcome.ERROR if crashed else Outcome.OK,
                "WorkerCrashedError" if crashed else None, "default/0")
    fault = {"kind": "kill", "at_s": 2.0, "injected_at_s": 2.0, "worker": "default/0",
             "pid": 1, "service": "default", "serving_before": 1, "detected_s": 0.01,
             "pool_recovered_s": 0.2, "cause": None, "error": None}
    r = build(spec, 1, rec, faults=[fault], serving=[], known_workers=[], started_at="",
              elapsed=5.0, interrupted=False, notes=[])
    f = r["faults"][0]
    assert f["service_recovered_s"] == pytest.approx(0.6)
    assert f["errors_during"] == 1  # by completion time: the crash, not the later error
    assert r["recovery_threshold_ms"] == pytest.approx(11.0, rel=0.01)  # baseline p99 + 10 ms


# The documented --json schema (docs/operations.md, "Load testing"): changing these keys
# means a new schema_version.
TOP_KEYS = {"schema_version", "started_at", "elapsed_s", "interrupted", "config", "requests",
            "throughput", "latency_ms", "latency_from", "error_latency_ms", "send_lag_ms",
            "errors", "unanswered", "methods", "workers", "balance", "faults", "timeline",
            "warnings", "exit_status", "utilization"}
CONFIG_KEYS = {"router", "mode", "rate", "arrival", "concurrency", "duration_s", "requests",
               "warmup_s", "timeout_s", "priority", "idempotent", "procs", "methods", "payload",
               "inject", "seed", "interval_s"}
REQUEST_KEYS = {"sent", "warmup", "measured", "ok", "errors", "unanswered",
                "unanswered_in_warmup", "unsent"}
LATENCY_KEYS = {"count", "min", "mean", "stddev", "p50", "p90", "p99", "p99.9", "max"}
FAULT_KEYS = {"kind", "at_s", "injected_at_s", "worker", "pid", "service", "serving_before",
              "detected_s", "pool_recovered_s", "service_recovered_s", "errors_during",
              "cause", "error"}
TIMELINE_KEYS = {"interval_s", "t", "sent", "ok", "errors", "unanswered", "failed", "ok_rps", "p50_ms",
                 "p90_ms", "p99_ms", "max_ms", "workers_serving", "utilization"}


def _check_schema(r: dict) -> None:
    assert set(r) - {"recovery_threshold_ms"} == TOP_KEYS
    assert r["schema_version"] == SCHEMA_VERSION
    assert set(r["config"]) == CONFIG_KEYS
    assert set(r["requests"]) == REQUEST_KEYS
    assert set(r["throughput"]) == {"window_s", "offered_rps", "sent_rps", "ok_rps"}
    assert set(r["latency_ms"]) == LATENCY_KEYS
    assert set(r["timeline"]) == TIMELINE_KEYS
    assert all(set(f) == FAULT_KEYS for f in r["faults"])
    assert all(set(w) == {"replies", "share"} for w in r["workers"].values())
    n = len(r["timeline"]["t"])
    assert all(len(r["timeline"][k]) == n for k in TIMELINE_KEYS - {"interval_s", "workers_serving",
                                                                          "utilization"})


def test_json_schema_is_stable():
    r = _synthetic_report()
    _check_schema(r)
    assert r["workers"] == {"default/0": {"replies": 10, "share": 0.5},
                            "default/1": {"replies": 10, "share": 0.5}}
    assert r["balance"]["cv"] == 0.0
    json.dumps(r)  # plain JSON all through


# -- against a real pool -----------------------------------------------------------------------------
def test_fixed_service_time_is_reported_right(procs):
    pool = procs.pool(workers=1, handler="workerpool.handlers:Echo")
    service = 0.02
    r = run(LoadSpec(router=pool.address, methods=[MethodMix(method="sleep")],
                     payload={"seconds": service}, concurrency=1, duration=1.5), progress=False)
    lat = r["latency_ms"]
    assert r["requests"]["errors"] == 0 and r["requests"]["unanswered"] == 0
    assert r["exit_status"] == 0 and r["latency_from"] == "send"
    # Never below the service time, and close to it (allowance for a busy 2-core host).
    assert lat["min"] >= service * 1e3
    assert service * 1e3 <= lat["p50"] <= service * 1e3 * 1.5 + 5
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    # One request at a time: throughput is bounded by the service time.
    assert r["requests"]["ok"] <= 1.5 / service + 1
    assert r["workers"] == {"default/0": {"replies": r["requests"]["ok"], "share": 1.0}}


def test_open_loop_shows_a_stall_that_closed_loop_hides(procs):
    pool = procs.pool(workers=1, handler="tests.handlers:Stall")
    stall = 1.0
    common = {"router": pool.address, "methods": [MethodMix(method="work")], "progress": False}

    def measure(**kw) -> dict:
        with Client(pool.address, timeout=10) as c:
            c.call("reset")
        progress = common["progress"]
        return run(LoadSpec(router=common["router"], methods=common["methods"], **kw),
                   progress=progress)

    # The 100th request (meant for t = 0.99 s) stalls the only worker for 1 s.
    opened = measure(rate=100, duration=3.0, payload={"stall_at": 100, "seconds": stall})
    closed = measure(concurrency=1, duration=2.5, payload={"stall_at": 50, "seconds": stall})
    for r in (opened, closed):
        assert r["requests"]["unanswered"] == 0 and r["requests"]["errors"] == 0, r["errors"]
        assert r["latency_ms"]["max"] >= 0.95 * stall * 1e3  # both saw the stalled request
    # Open loop: the ~100 requests meant for the stall's second waited for it.
    assert opened["latency_ms"]["p99"] >= 0.5 * stall * 1e3, opened["latency_ms"]
    assert opened["latency_ms"]["p90"] >= 0.1 * stall * 1e3, opened["latency_ms"]
    # Closed loop sent nothing while it waited: one slow request among hundreds.
    assert closed["requests"]["ok"] > 150, closed["requests"]
    assert closed["latency_ms"]["p99"] < 0.2 * stall * 1e3, closed["latency_ms"]


def test_injected_kill_shows_in_the_report_and_every_request_is_answered(procs):
    pool = procs.pool("--policy", "round-robin", workers=2, handler="workerpool.handlers:Echo")
    out = _cli("--router", pool.address, "--method", "sleep", "--payload", '{"seconds": 0.01}',
               "--rate", "100", "--duration", "3s", "--inject", "kill:1s", "--json", "--seed", "5")
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    _check_schema(r)
    assert r["requests"]["unanswered"] == 0 and r["requests"]["measured"] == 300
    assert set(r["errors"]) <= {"WorkerCrashedError"}
    (f,) = r["faults"]
    assert f["kind"] == "kill" and f["error"] is None and f["worker"].startswith("default/")
    assert 1.0 <= f["injected_at_s"] < 1.5
    assert f["pool_recovered_s"] is not None and 0 < f["pool_recovered_s"] < 2.0
    assert f["detected_s"] is not None and f["detected_s"] <= f["pool_recovered_s"]
    assert "SIGKILL" in f["cause"]
    assert f["service_recovered_s"] is not None
    assert r["exit_status"] == 0
    victim = pool.workers()[f["worker"]]
    assert victim["pid"] != f["pid"] and victim["restarts"] == 1
    # The status samples show the pool one worker short, then whole again.
    serving = [n for _, n, _ in r["timeline"]["workers_serving"]]
    assert serving[-1] == 2
    # And how busy the serving workers were, from the same polls.
    u = r["utilization"]
    assert u is not None and 0 <= u["min"] <= u["mean"] <= u["max"] <= 1 and u["samples"] > 0
    assert all(0 <= v <= 1 for _, v in r["timeline"]["utilization"])


def test_generator_processes_plot_and_byte_payloads(procs, tmp_path):
    pool = procs.pool("--policy", "round-robin", workers=2, handler="workerpool.handlers:Echo")
    png = tmp_path / "run.png"
    out = _cli("--router", pool.address, "--procs", "2", "--concurrency", "4",
               "--requests", "400", "--payload-size", "100000", "--method", "echo=3",
               "--method", "whoami=1", "--plot", str(png), "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert r["requests"]["sent"] == 400 and r["requests"]["ok"] == 400
    assert set(r["methods"]) == {"echo", "whoami"}
    assert r["methods"]["echo"]["ok"] > r["methods"]["whoami"]["ok"] > 0
    assert set(r["workers"]) == {"default/0", "default/1"}
    assert sum(w["replies"] for w in r["workers"].values()) == 400
    assert r["balance"]["max_over_mean"] < 1.2  # round-robin spreads evenly
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The summary names the same figures.
    text = _cli("--router", pool.address, "--requests", "20", "--concurrency", "2")
    assert text.exit_code == 0 and "20 measured: 20 ok" in text.output


class _SilentRouter:
    """Answers STATUS, never answers a request: every request is left without a reply."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        table = msgpack.packb({"workers": [], "services": [], "router": {}})
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, header, *_ = self.sock.recv_multipart()
            kind, rid = protocol.unpack_header(header)
            if kind is Kind.STATUS:
                self.sock.send_multipart([ident, *protocol.encode(Kind.RESULT, rid, None, table)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def test_requests_without_a_reply_give_a_nonzero_exit_status(procs):
    router = _SilentRouter(procs.ipc("silent"))
    try:
        out = _cli("--router", procs.ipc("silent"), "--requests", "3", "--concurrency", "3",
                   "--timeout", "0.3", "--json")
    finally:
        router.close()
    assert out.exit_code == EXIT_UNANSWERED, out.output
    r = json.loads(out.output)
    assert r["requests"]["unanswered"] == 3 and r["unanswered"] == {"local_timeout": 3}
    assert r["exit_status"] == EXIT_UNANSWERED
    assert any("got no reply" in w for w in r["warnings"])


def test_no_router_is_a_clear_error(procs, monkeypatch):
    monkeypatch.setattr(run_module, "PROBE_TIMEOUT", 0.3)
    out = _cli("--router", procs.ipc("nobody"), "--requests", "1")
    assert out.exit_code == 1
    assert "no router answered" in out.output


@pytest.mark.parametrize(("args", "message"), [
    (["--inject", "kill5s"], "expected KIND:SECONDS"),
    (["--inject", "boom:5s"], "unknown kind 'boom'"),
    (["--inject", "kill:soon"], "is not a duration"),
    (["--inject", "kill:1s,stop:"], "expected KIND:SECONDS"),
    (["--inject", "kill:20s", "--duration", "10s"], "not before the end of the run"),
    (["--payload", "{bad json"], "--payload is not JSON"),
    (["--rate", "10", "--concurrency", "2"], "exclude each other"),
    (["--duration", "5", "--requests", "10"], "exclude each other"),
    (["--arrival", "poisson"], "needs --rate"),
    (["--payload-kind", "numpy"], "needs --payload-size"),
    (["--payload", "1", "--payload-size", "10"], "exclude each other"),
    (["--method", "9bad"], "expected [SERVICE:]METHOD[=WEIGHT]"),
    (["--method", "echo=0"], "weight must be > 0"),
    (["--rate", "-5"], "--rate"),
    (["--procs", "0"], "--procs"),
    (["--concurrency", "2", "--procs", "4"], "less than --procs"),
    (["--duration", "10 hours"], "is not a duration"),
    (["--router", "localhost:5555"], "is not a ZeroMQ endpoint"),
])
def test_bad_flags_are_usage_errors(args, message):
    out = _cli(*args)
    assert out.exit_code == 2, out.output
    assert message in out.output, out.output


def test_numpy_payloads_travel_as_arrays(procs):
    pool = procs.pool(handler="workerpool.handlers:Echo", workers=2)
    out = _cli("--router", pool.address, "--concurrency", "4", "--requests", "40",
               "--payload-size", "2000000", "--payload-kind", "numpy", "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert r["requests"]["sent"] == 40 and r["requests"]["ok"] == 40
