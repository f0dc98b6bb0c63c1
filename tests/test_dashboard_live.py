"""The dashboard in a real headless Chromium against real pools: the worker table and the
throughput chart fill under load, a killed worker gets its crash marker and its restart in
the table, and a router that stops answering and is restarted shows as unreachable, then
live again, without reloading the page."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.chromium import CHROMIUM, Chromium
from workerpool import Client

pytest.importorskip("prometheus_client",
                    reason="prometheus-client is not installed (the 'metrics' extra)")
if CHROMIUM is None:
    pytest.skip("no chromium program (bin/system-packages installs Debian's as root)",
                allow_module_level=True)

ROWS = "[...document.querySelectorAll('#workers tbody tr[data-worker]')]"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser(procs):
    """A headless Chromium, always closed (before ``procs`` stops the pools)."""
    chromium = Chromium(procs.dir)
    try:
        yield chromium
    finally:
        chromium.close()


@contextmanager
def _load(address: str) -> Iterator[None]:
    """Requests in a loop on one client (a few failing), until the block ends."""
    stop = threading.Event()

    def run() -> None:
        with Client(address, timeout=10) as c:
            while not stop.is_set():
                futures = [c.submit("sleep", {"seconds": 0.002}) for _ in range(4)]
                futures.append(c.submit("raise_error"))
                for f in futures:
                    f.exception(10)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(15)


def _cell(worker: str, column: str) -> str:
    return (f"document.querySelector('#workers tr[data-worker=\"{worker}\"] .col-{column}')"
            "?.textContent")


def test_the_dashboard_shows_the_workers_the_load_and_a_crash(procs, browser):
    port = _free_port()
    pool = procs.pool("--metrics", f"127.0.0.1:{port}", workers=2)
    with _load(pool.address):
        browser.open(f"http://127.0.0.1:{port}/")
        browser.wait_for(f"{ROWS}.length === 2", what="two worker rows")
        assert browser.evaluate(f"{ROWS}.map(r => r.dataset.worker)") == ["default/0", "default/1"]
        assert browser.evaluate(_cell("default/0", "device")) == "cpu"
        browser.wait_for("Number(document.querySelector('#chart-throughput svg').dataset.max) > 0"
                         " && document.querySelector('#chart-throughput path.series')"
                         ".getAttribute('d').includes('L')",  # a line, not one point
                         what="a throughput line above 0")
        assert browser.evaluate("document.querySelectorAll('.death').length") == 0

        victim = pool.workers()["default/1"]
        os.kill(victim["pid"], signal.SIGKILL)
        marker = "#chart-restarts .death[data-worker=\"default/1\"]"
        browser.wait_for(f"document.querySelector('{marker}') !== null", what="the crash marker")
        browser.wait_for(f"{_cell('default/1', 'restarts')} === '1'", what="the restart")
    title = browser.evaluate(f"document.querySelector('{marker} title').textContent")
    assert "worker default/1 died: SIGKILL" in title
    assert browser.evaluate(f"document.querySelector('{marker}').dataset.cause") == "SIGKILL"
    for chart in ("throughput", "latency", "queue"):  # on every chart's time axis
        assert browser.evaluate(
            f"document.querySelectorAll('#chart-{chart} .death').length") == 1
    assert browser.evaluate(_cell("default/0", "restarts")) == "0"
    assert browser.evaluate("document.getElementById('link').dataset.state") == "live"
    assert browser.exceptions == []


def test_the_dashboard_says_the_router_is_unreachable_then_resumes_by_itself(procs, browser):
    port = _free_port()
    pool = procs.pool("--metrics", f"127.0.0.1:{port}", workers=1)
    browser.open(f"http://127.0.0.1:{port}/")
    browser.wait_for(f"{ROWS}.length === 1", what="the worker row")
    old = pool.status()["router"]["pid"]
    assert browser.evaluate("document.getElementById('router').dataset.pid") == str(old)

    os.kill(old, signal.SIGSTOP)  # the port still accepts; nothing answers
    try:
        browser.wait_for("!document.getElementById('banner').hidden", what="the banner")
        assert browser.evaluate("document.getElementById('link').dataset.state") == "unreachable"
        assert "Router unreachable since" in browser.evaluate(
            "document.getElementById('banner').textContent")
        # Under `up`, a new router starts at the same addresses, the metrics port included.
        os.kill(old, signal.SIGKILL)
    finally:
        try:
            os.kill(old, signal.SIGCONT)
        except ProcessLookupError:
            pass
    browser.wait_for(f"document.getElementById('router').dataset.pid !== '{old}'"
                     " && document.getElementById('banner').hidden", timeout=20,
                     what="the new router's figures")
    assert browser.evaluate("document.getElementById('link').dataset.state") == "live"
    assert "router restarted" in browser.evaluate("document.getElementById('notice').textContent")
    browser.wait_for(f"{ROWS}.length === 1", what="the worker registered again")
    assert browser.exceptions == []


NODE_ROWS = "[...document.querySelectorAll('#nodes tbody tr[data-node]')]"


def _node_cell(node: str, column: str) -> str:
    return (f"document.querySelector('#nodes tr[data-node=\"{node}\"] .col-{column}')"
            "?.textContent")


def test_the_dashboard_shows_each_node_and_one_that_is_lost(procs, browser):
    """A router with two `workerpool worker` nodes: each has its row (host, workers of
    slots, a round trip) and its workers name it; one killed with SIGKILL shows as lost."""
    port = _free_port()
    cfg = procs.config("[router]\nheartbeat_interval = 0.2\nheartbeat_liveness = 3\n")
    front, back = procs.tcp(), procs.tcp()
    router = procs.spawn(["router", "--config", cfg, "--frontend", front, "--backend", back,
                          "--metrics", f"127.0.0.1:{port}"], front, None)
    procs.node(router, back, "a", "--config", cfg, "--workers", "2")
    b = procs.node(router, back, "b", "--config", cfg, "--workers", "1")
    browser.open(f"http://127.0.0.1:{port}/")
    browser.wait_for(f"{NODE_ROWS}.length === 2 && {_node_cell('a', 'rtt')} !== '-'",
                     what="two node rows, a with a round trip")
    host = socket.gethostname()
    assert browser.evaluate(f"{NODE_ROWS}.map(r => r.dataset.node)") == ["a", "b"]
    assert browser.evaluate(_node_cell("a", "host")) == host
    assert browser.evaluate(_node_cell("a", "state")) == "connected"
    # Each node's workers register on their own, in any order after the node's row shows.
    browser.wait_for(f"{_node_cell('a', 'workers')} === '2/2' && "
                     f"{_node_cell('b', 'workers')} === '1/1'", what="a's 2 workers, b's 1")
    assert float(browser.evaluate(_node_cell("a", "rtt"))) >= 0
    browser.wait_for(f"{ROWS}.length === 3", what="three worker rows")
    assert browser.evaluate(_cell("default/b/0", "node")) == "b"
    os.killpg(b.pgid, signal.SIGKILL)
    browser.wait_for(f"{_node_cell('b', 'state')} === 'lost'", what="b lost")
    assert browser.evaluate(_node_cell("a", "state")) == "connected"
    assert browser.exceptions == []
