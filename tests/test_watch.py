"""``workerpool status --watch``: its decisions with plain values and a fake clock (rates
from two replies, rows, the unreachable state), the drawing, the loop with a stand-in
client, and the command's bad options. The real terminal is tests/test_watch_terminal.py."""

from __future__ import annotations

import io
import sys
import time

import pytest
from click.testing import CliRunner

from workerpool.cells import node_cells
from workerpool.cli import main
from workerpool.errors import PermissionDeniedError, RequestTimeoutError
from workerpool.watch import (
    WORKER_HEADERS,
    Rates,
    Watch,
    pause,
    poll_timeout,
    service_rates,
    service_row,
    worker_row,
)
from workerpool.watch_term import poll, render, run

T0 = 13 * 3600 + 62.0  # 13:01:02 UTC on the fake wall clock


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """HH:MM:SS read in UTC, whatever the host's zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def worker(id_: str = "default/0", **fields) -> dict:
    row = {"id": id_, "pid": 100, "service": "default", "device": "cpu", "state": "ready",
           "in_flight": 0, "capacity": 1, "prefetch": 1, "completed": 0, "errored": 0,
           "restarts": 0, "incarnation": 1, "last_error": None, "memory": {"rss": 40 * 2**20},
           "uptime": 5.25, "utilization": 0.5, "utilization_since_start": 0.4}
    return {**row, **fields}


def service(name: str = "default", **fields) -> dict:
    row = {"name": name, "policy": "least-loaded", "workers": 2, "spares": 0, "queued": 0,
           "queue_capacity": 10000, "in_flight": 0, "completed": 0, "errored": 0,
           "service_time_p50_ms": None, "service_time_p99_ms": None,
           "queue_wait_p50_ms": None, "queue_wait_p99_ms": None, "utilization": None}
    return {**row, **fields}


def status(uptime: float, services: list[dict], pid: int = 7, workers=None) -> dict:
    return {"router": {"pid": pid, "frontend": "tcp://127.0.0.1:5555", "uptime": uptime,
                       "draining": False, "clients": 0},
            "services": services, "workers": [worker()] if workers is None else workers}


# -- rates ------------------------------------------------------------------------------------
def test_rates_are_the_counters_growth_over_the_routers_uptime_between_two_replies():
    before = status(10.0, [service(completed=10, errored=2)])
    after = status(12.0, [service(completed=30, errored=6)])
    assert service_rates(before, after) == {"default": Rates(requests=12.0, errors=2.0)}


def test_no_rates_on_the_first_poll_or_across_a_router_restart():
    first = status(10.0, [service(completed=10)])
    assert service_rates(None, first) == {}
    # A new router (another pid) started its counters again from zero.
    assert service_rates(first, status(11.0, [service(completed=1)], pid=8)) == {}
    # The same pid with less uptime: another process that got the same pid.
    assert service_rates(first, status(3.0, [service(completed=12)])) == {}
    # No time passed: nothing to divide by.
    assert service_rates(first, status(10.0, [service(completed=10)])) == {}


def test_a_new_service_or_a_counter_that_went_down_has_no_rates():
    before = status(10.0, [service("a", completed=5)])
    after = status(11.0, [service("a", completed=4), service("b", completed=3)])
    assert service_rates(before, after) == {}


# -- rows -------------------------------------------------------------------------------------
def test_a_worker_row_has_the_status_tables_cells_and_its_last_error_cut():
    trace = "Traceback (most recent call last):\n  ...\nValueError: " + "x" * 80 + "\n"
    row = worker_row(worker(in_flight=1, capacity=2, prefetch=1, restarts=3, last_error=trace,
                            memory={"rss": 1, "gpu_reserved": 3 * 2**30, "gpu_total": 80 * 2**30},
                            utilization=0.123))
    cells = dict(zip(WORKER_HEADERS, row, strict=True))
    assert cells == {"ID": "default/0", "STATE": "ready", "HOST": "-", "DEVICE": "cpu",
                     "IN_FLIGHT": "1/2+1",
                     "COMPLETED": "0", "ERRORED": "0", "RESTARTS": "3", "UPTIME": "5.2s",
                     "MEMORY": "3.0G/80.0G gpu", "UTIL": "12%", "BATCH": "-",
                     "LAST ERROR": "ValueError: " + "x" * 35 + "…"}
    assert len(cells["LAST ERROR"]) == 48


def test_a_worker_not_registered_shows_dashes():
    row = worker_row(worker(state="restarting", capacity=None, prefetch=None, memory={},
                            utilization=None, last_error="was killed by SIGKILL"))
    cells = dict(zip(WORKER_HEADERS, row, strict=True))
    assert (cells["IN_FLIGHT"], cells["MEMORY"], cells["UTIL"]) == ("0", "-", "-")
    assert cells["LAST ERROR"] == "was killed by SIGKILL"


def test_a_worker_row_names_its_host_and_the_nodes_table_their_round_trips():
    assert dict(zip(WORKER_HEADERS, worker_row(worker(host="gpu7")), strict=True))["HOST"] \
        == "gpu7"
    node = {"node": "a", "host": "gpu7", "pid": 41, "supervisor": "sup-gpu7-41",
            "state": "connected", "slots": 3, "workers": 2, "seen": 0.25, "rtt_ms": 0.4567,
            "rtt_smoothed_ms": 0.5}
    assert node_cells(node) == ("a", "gpu7", "41", "connected", "2/3", "0.2s", "0.46", "0.50")
    lost = {**node, "host": None, "pid": None, "state": "lost", "workers": 0, "seen": 12.0,
            "rtt_ms": None, "rtt_smoothed_ms": None}
    assert node_cells(lost) == ("a", "-", "-", "lost", "0/3", "12.0s", "-", "-")
    w = Watch("a", 1.0)
    w.polled({**status(1.0, [service()]), "nodes": [node, lost]}, T0)
    assert w.frame().nodes == (node_cells(node), node_cells(lost))
    w.polled(status(2.0, [service()]), T0 + 1)  # a router that lists no nodes
    assert w.frame().nodes == ()


def test_a_service_row_says_which_percentiles_and_dashes_what_is_not_known():
    s = service(workers=2, spares=1, queued=3, in_flight=2, service_time_p50_ms=0.4567,
                service_time_p99_ms=12.0, utilization=0.95)
    assert service_row(s, Rates(1234.4, 0.25)) == (
        "default", "2 +1 spare", "3/10000", "2", "1,234", "0.2", "0.46/12.00", "-/-", "95%")
    assert service_row(service(), None)[4:6] == ("-", "-")


# -- the unreachable state, with a fake clock ---------------------------------------------------
def test_unreachable_since_the_first_failed_poll_then_back_with_fresh_rates():
    w = Watch("tcp://127.0.0.1:5555", 1.0)
    assert w.frame().title == "waiting for tcp://127.0.0.1:5555"
    w.polled(status(10.0, [service(completed=10)]), T0)
    f = w.frame()
    assert not f.unreachable and f.title.startswith("router pid 7 up 10s")
    assert f.detail.startswith("updated 13:01:02, every 1s")
    assert f.services[0][4:6] == ("-", "-")  # the first poll has no rates

    w.failed("RequestTimeoutError: no reply", T0 + 1)
    w.failed("RequestTimeoutError: no reply again", T0 + 3)
    f = w.frame()
    assert w.unreachable and f.unreachable
    assert f.title == "router unreachable (since 13:01:03, retrying)"
    assert f.detail == "tcp://127.0.0.1:5555: RequestTimeoutError: no reply again"
    assert f.workers == () and f.services == ()

    # Back, from a restarted router: the table again, its rates not known yet.
    w.polled(status(1.0, [service(completed=2)], pid=9), T0 + 5)
    f = w.frame()
    assert not w.unreachable and f.title.startswith("router pid 9 up 1s")
    assert f.services[0][4:6] == ("-", "-")
    w.polled(status(2.0, [service(completed=6)], pid=9), T0 + 6)
    assert w.frame().services[0][4:6] == ("4.0", "0.0")
    # Unreachable again later: "since" is the new outage's first poll.
    w.failed("x", T0 + 20)
    assert "since 13:01:22" in w.frame().title


def test_a_router_that_only_paused_gives_rates_over_the_whole_gap():
    w = Watch("a", 0.5)
    w.polled(status(10.0, [service(completed=0)]), T0)
    w.failed("RequestTimeoutError: no reply", T0 + 1)  # e.g. SIGSTOPped
    w.polled(status(20.0, [service(completed=50)]), T0 + 10)
    assert w.frame().services[0][4] == "5.0"


def test_poll_timing():
    assert poll_timeout(0.5, 5.0) == 1.0  # short intervals still wait a second
    assert poll_timeout(3.0, 5.0) == 3.0
    assert poll_timeout(10.0, 5.0) == 5.0  # never over --timeout
    assert pause(100.0, 1.0, 100.25) == 0.75
    assert pause(100.0, 1.0, 102.0) == 0.0  # a slow poll: the next one at once


# -- the terminal side ---------------------------------------------------------------------------
class FakeClient:
    """Answers ``status`` from a script: a dict is a reply, an exception is raised."""

    def __init__(self, script: list) -> None:
        self.script = script
        self.closed = False
        self.timeouts: list[float] = []

    def status(self, timeout: float) -> dict:
        self.timeouts.append(timeout)
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.closed = True


def test_poll_hands_each_outcome_to_the_watch():
    w = Watch("a", 1.0)
    poll(FakeClient([PermissionDeniedError("key revoked")]), w, 1.0)
    assert w.unreachable and "PermissionDeniedError: key revoked" in w.frame().detail
    poll(FakeClient([status(1.0, [service()])]), w, 1.0)
    assert not w.unreachable


def test_render_draws_the_tables_and_only_the_banner_while_unreachable():
    from rich.console import Console

    w = Watch("a", 1.0)
    w.polled(status(1.0, [service()], workers=[worker(), worker("default/1", state="dead")]),
             T0)
    out = io.StringIO()
    Console(file=out, width=160).print(render(w.frame()))
    text = out.getvalue()
    assert "LAST ERROR" in text and "SERVICE TIME p50/p99 ms" in text
    assert "default/1" in text and "dead" in text
    assert "SRTT ms" not in text  # no nodes listed, no nodes table
    w.polled({**status(2.0, [service()]), "nodes": [
        {"node": "a", "host": "gpu7", "pid": 41, "state": "connected", "slots": 1,
         "workers": 1, "seen": 0.1, "rtt_ms": 0.3, "rtt_smoothed_ms": 0.25}]}, T0)
    out = io.StringIO()
    Console(file=out, width=160).print(render(w.frame()))
    assert "SRTT ms" in out.getvalue() and "gpu7" in out.getvalue()
    w.failed("RequestTimeoutError: no reply", T0 + 1)
    out = io.StringIO()
    Console(file=out, width=160).print(render(w.frame()))
    assert "router unreachable (since 13:01:03, retrying)" in out.getvalue()
    assert "LAST ERROR" not in out.getvalue()


def test_the_loop_reconnects_after_a_failed_poll_and_ends_on_ctrl_c(capsys):
    """Off a terminal each frame is printed in turn; a poll that fails closes its client
    and the next poll makes a new one; Ctrl-C (KeyboardInterrupt) ends it normally."""
    clients = [FakeClient([RequestTimeoutError("no reply")]),
               FakeClient([status(1.0, [service(completed=1)]),
                           status(1.2, [service(completed=3)]), KeyboardInterrupt()])]
    made = iter(clients)
    run(lambda: next(made), "tcp://x", 0.1, 5.0)
    assert clients[0].closed and clients[1].closed
    assert clients[1].timeouts == [1.0, 1.0, 1.0]
    out = capsys.readouterr().out
    assert out.index("router unreachable") < out.index("router pid 7 up 1s")
    assert "10.0" in out  # (3 - 1) replies over 0.2 s


# -- the command ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["--interval", "2"], "--interval needs --watch"),
    (["--watch", "--json"], "--json and --watch cannot be combined"),
    (["--watch", "--interval", "0"], "0<=x<=3600"),
])
def test_bad_watch_options_are_usage_errors(args, message):
    out = CliRunner().invoke(main, ["status", *args])
    assert out.exit_code == 2
    assert message in out.output.replace("0.1<=x", "0<=x")


def test_without_rich_watch_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rich.live", None)
    out = CliRunner().invoke(main, ["status", "--watch"])
    assert out.exit_code == 2
    assert ("status --watch needs rich, which is not installed: "
            "pip install 'workerpool[watch]'") in out.output
