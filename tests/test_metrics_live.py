"""``--metrics`` on real pools: a real Prometheus scrapes a known workload and its query API
gives the figures back exactly; a taken port stops everything before it starts; scrapes
answer, with figures that agree with each other, while the pool drains and while a worker
is killed."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import wait

import pytest

from tests.conftest import ROOT, _env
from workerpool import Client
from workerpool.config import RouterConfig
from workerpool.errors import WorkerCrashedError

pytest.importorskip("prometheus_client",
                    reason="prometheus-client is not installed (the 'metrics' extra)")
from prometheus_client.parser import text_string_to_metric_families

from router.listener import MAX_AGE

PROMETHEUS = shutil.which("prometheus")
HTTP_TIMEOUT = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _scrape(port: int) -> dict[tuple, float]:
    """GET /metrics, parsed: {(sample name, (label, value), ...): value}."""
    code, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200, body
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def _total(scrape: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for k, v in scrape.items() if k[0] == name and want <= set(k[1:]))


def _check_consistent(scrape: dict) -> None:
    """What holds within any one scrape of a pool whose requests all get a worker's reply
    or a crash error: one state per worker; every request counted has its duration; every
    worker reply its service time."""
    states: dict[str, float] = {}
    for key, v in scrape.items():
        if key[0] == "workerpool_worker_state":
            worker = dict(key[1:])["worker"]
            states[worker] = states.get(worker, 0) + v
    assert states and set(states.values()) == {1.0}, states
    answered = _total(scrape, "workerpool_requests_total")
    assert _total(scrape, "workerpool_request_duration_seconds_count") == answered
    assert _total(scrape, "workerpool_service_time_seconds_count") == \
        _total(scrape, "workerpool_requests_total", outcome="ok")


# -- a real Prometheus ------------------------------------------------------------------------
class Prometheus:
    """A Prometheus server scraping ``target`` every second, in ``workdir``."""

    def __init__(self, workdir: str, target: str) -> None:
        self.port = _free_port()
        config = os.path.join(workdir, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                    "scrape_configs:\n  - job_name: workerpool\n    static_configs:\n"
                    f"      - targets: ['{target}']\n")
        self.log = os.path.join(workdir, "prometheus.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}",
                 f"--storage.tsdb.path={os.path.join(workdir, 'data')}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self._tail()
            try:
                if _get(f"http://127.0.0.1:{self.port}/-/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready within {timeout}s\n{self._tail()}")

    def query(self, promql: str) -> list[tuple[dict, float]]:
        """An instant query: (labels, value) per series."""
        code, body = _get(f"http://127.0.0.1:{self.port}/api/v1/query?"
                          + urllib.parse.urlencode({"query": promql}))
        assert code == 200, body
        out = json.loads(body)
        assert out["status"] == "success", out
        return [(r["metric"], float(r["value"][1])) for r in out["data"]["result"]]

    def value(self, promql: str) -> float:
        result = self.query(promql)
        assert len(result) == 1, (promql, result)
        return result[0][1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def _tail(self) -> str:
        with open(self.log) as f:
            return f.read()[-3000:]


@pytest.fixture
def prometheus(procs):
    if PROMETHEUS is None:
        pytest.skip("no prometheus program (bin/system-packages installs Debian's as root)")
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        p = Prometheus(str(procs.dir), target)
        started.append(p)
        p.wait_ready()
        return p

    try:
        yield start
    finally:
        for p in started:
            p.stop()


def test_prometheus_reads_back_exactly_what_the_pool_did(procs, prometheus):
    n_ok, n_errors = 20, 3
    port = _free_port()
    pool = procs.pool("--metrics", f"127.0.0.1:{port}", workers=2)
    prom = prometheus(f"127.0.0.1:{port}")
    with Client(pool.address, timeout=20) as c:
        for i in range(n_ok):
            assert c.call("echo", i) == i
        for _ in range(n_errors):
            with pytest.raises(Exception, match="requested failure"):
                c.call("raise_error")
    victim = pool.workers()["default/1"]
    os.kill(victim["pid"], signal.SIGKILL)
    pool.wait_for(lambda st: all(w["state"] == "ready" for w in st["workers"])
                  and st["workers"][1]["incarnation"] == 2, what="default/1 back")
    pool.wait_for(lambda st: st["nodes"][0]["rtt_smoothed_ms"] is not None,
                  what="the supervisor's round trip")
    done = time.time()
    deadline = time.monotonic() + 15
    # A scrape may be answered from a snapshot up to MAX_AGE old.
    while prom.query(f'timestamp(up{{job="workerpool"}}) > {done + MAX_AGE}') == []:
        assert time.monotonic() < deadline, "prometheus did not scrape after the workload"
        time.sleep(0.2)

    assert prom.value('up{job="workerpool"}') == 1
    rows = sorted((r["service"], r["method"], r["outcome"], v)
                  for r, v in prom.query("workerpool_requests_total"))
    assert rows == [("default", "echo", "ok", n_ok),
                    ("default", "raise_error", "HandlerError", n_errors)]
    assert prom.value('workerpool_request_duration_seconds_count{method="echo"}') == n_ok
    assert prom.value('sum(workerpool_service_time_seconds_count)') == n_ok + n_errors
    restarts = prom.query("workerpool_worker_restarts_total")
    assert [(r["worker"], r["cause"], v) for r, v in restarts] == [("default/1", "SIGKILL", 1)]
    states = prom.query("workerpool_worker_state == 1")
    assert sorted((r["worker"], r["state"]) for r, _ in states) == [
        ("default/0", "ready"), ("default/1", "ready")]
    host = socket.gethostname()  # `up`'s supervisor has no --node: its node is its host
    assert {r["node"] for r, _ in states} == {host}
    (rtt,) = prom.query("workerpool_node_rtt_seconds")
    assert (rtt[0]["node"], rtt[0]["host"]) == (host, host) and 0 <= rtt[1] < 1
    assert prom.value("sum(workerpool_in_flight)") == 0
    assert prom.value('workerpool_queue_depth{service="default"}') == 0
    assert prom.value('workerpool_backpressure_rejections_total{service="default"}') == 0
    assert prom.value("workerpool_unknown_service_requests_total") == 0


def test_the_alert_rules_in_the_runbook_are_valid(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool program (Debian's prometheus package has it)")
    runbook = (ROOT / "docs" / "operations.md").read_text()
    rules = runbook.split("**Alert rules**", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "rules.yml").write_text(rules)
    out = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 6 rules found" in out.stdout


# -- a taken port -----------------------------------------------------------------------------
def _held_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_up_with_a_taken_metrics_port_starts_nothing_and_says_why(procs):
    with _held_port() as held:
        port = held.getsockname()[1]
        front = procs.ipc("front")
        pool = procs.spawn(["up", "--frontend", front, "--workers", "1",
                            "--metrics", f"127.0.0.1:{port}"], front, None)
        assert pool.popen.wait(30) == 1
    log = pool.log.read_text()
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in log
    assert "router listening" not in log and "registered" not in log  # nothing started
    assert pool.popen.stdout.read() == ""  # no ready line


def test_router_with_a_taken_metrics_port_binds_nothing_and_says_why(procs):
    front, back = _free_port(), _free_port()
    with _held_port() as held:
        port = held.getsockname()[1]
        router = procs.spawn(["router", "--frontend", f"tcp://127.0.0.1:{front}",
                              "--backend", f"tcp://127.0.0.1:{back}", "--metrics", str(port)],
                             f"tcp://127.0.0.1:{front}", None)
        assert router.popen.wait(30) == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" \
        in router.log.read_text()
    for p in (front, back):  # the router's own ports were never bound: free
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_the_router_process_of_up_exits_at_once_on_a_taken_metrics_port():
    """What `up` sees if the port is taken between its check and its router's start: a
    router that exits 1 with one line (and `up` then stops, as for any router that could
    not start)."""
    with _held_port() as held:
        port = held.getsockname()[1]
        config = RouterConfig(frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*",
                              metrics=f":{port}")
        out = subprocess.run([sys.executable, "-m", "router", config.model_dump_json()],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr == (f"router: cannot serve metrics on 127.0.0.1:{port}: "
                          "Address already in use\n")


# -- scrapes while the pool changes -----------------------------------------------------------
def test_scrapes_answer_while_the_pool_drains(procs):
    port = _free_port()
    pool = procs.pool("--metrics", str(port), workers=2)
    with Client(pool.address, timeout=30) as c:
        futs = [c.submit("sleep", {"seconds": 2.0}) for _ in range(2)]
        pool.wait_for(lambda st: sum(w["in_flight"] for w in st["workers"]) == 2,
                      what="both running")
        pool.popen.send_signal(signal.SIGTERM)  # drain: the two finish, nothing new
        deadline = time.monotonic() + 10
        while True:
            code, body = _get(f"http://127.0.0.1:{port}/api/status")
            assert code == 200
            if json.loads(body)["router"]["draining"]:
                break
            assert time.monotonic() < deadline, "the router never said it drains"
            time.sleep(0.05)
        scrape = _scrape(port)
        assert _total(scrape, "workerpool_in_flight") == 2
        assert _total(scrape, "workerpool_worker_state", state="busy") == 2
        code, body = _get(f"http://127.0.0.1:{port}/healthz")  # a draining loop still turns
        assert code == 200 and json.loads(body)["live"] is True
        _check_consistent(scrape)
        with pytest.raises(Exception, match="shutting down"):
            c.call("echo", 1)  # refused while draining
        assert [f.result(10) for f in futs] == [{"seconds": 2.0}] * 2
    assert pool.popen.wait(30) == 0


def test_scrapes_during_a_worker_crash_are_consistent_and_end_exact(procs):
    port = _free_port()
    pool = procs.pool("--metrics", str(port), workers=2)
    # A snapshot lives up to MAX_AGE: the first scrapes after `ready` may show one taken
    # before the workers registered (no worker series at all). Start from one that has them.
    deadline = time.monotonic() + 10
    while not any(k[0] == "workerpool_worker_state" for k in _scrape(port)):
        assert time.monotonic() < deadline, "no scrape showed the workers"
        time.sleep(0.02)
    scrapes: list[dict] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            scrapes.append(_scrape(port))
            time.sleep(0.02)

    t = threading.Thread(target=scraper, daemon=True)
    t.start()
    try:
        with Client(pool.address, timeout=30) as c:
            futs = [c.submit("sleep", {"seconds": 0.05}) for _ in range(40)]
            victim = pool.busiest_worker()
            os.kill(victim["pid"], signal.SIGKILL)
            wait(futs, 30)
        pool.wait_for(lambda st: all(w["state"] == "ready" for w in st["workers"]),
                      what="the pool back")
    finally:
        stop.set()
        t.join(10)
    crashed = sum(isinstance(f.exception(), WorkerCrashedError) for f in futs)
    ok = sum(f.exception() is None for f in futs)
    assert crashed >= 1 and ok + crashed == 40
    time.sleep(2 * MAX_AGE)  # the scraper's last snapshot may predate the last replies
    final = _scrape(port)
    assert len(scrapes) > 5
    counters = ("workerpool_requests_total", "workerpool_worker_restarts_total",
                "workerpool_request_duration_seconds_count", "workerpool_router_messages_total")
    seen = [*scrapes, final]
    for before, after in itertools.pairwise(seen):
        _check_consistent(after)
        for key, v in before.items():
            if key[0] in counters:
                assert after.get(key, 0) >= v, key  # counters never go back
    assert _total(final, "workerpool_requests_total", outcome="ok") == ok
    assert _total(final, "workerpool_requests_total", outcome="WorkerCrashedError") == crashed
    assert _total(final, "workerpool_requests_total") == 40
    assert _total(final, "workerpool_worker_restarts_total", worker=victim["id"],
                  cause="SIGKILL") == 1
    assert _total(final, "workerpool_worker_restarts_total") == 1
