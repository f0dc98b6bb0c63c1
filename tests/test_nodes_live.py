"""Two nodes (``workerpool worker --node``) on one router, for real: each worker's node
and host, each node's round trip in STATUS, ``status`` and ``/metrics``; ``min_per_host``
in a scale; a link that goes down and heals bringing one HELLO, however many pings
waited in it; and a node killed and started again under its name."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.conftest import ROOT, _env
from workerpool import Client, WorkerCrashedError
from workerpool.errors import AdminError

FAST = "[router]\nheartbeat_interval = 0.2\nheartbeat_liveness = 3\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _per_node(st: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for w in st["workers"]:
        if w["state"] in ("ready", "busy"):
            counts[w["node"]] = counts.get(w["node"], 0) + 1
    return counts


def test_a_node_reports_its_round_trip_at_once_not_two_beats_after_it_starts(procs):
    """With 30 s between beats, the beats alone would bring the router the round trip a
    minute after the node started (the first ping measures nothing, the second measures,
    the third carries it): what each worker holds ahead is sized from it. The supervisor
    pings out of turn after first contact and after the first measurement instead."""
    cfg = procs.config("[router]\nheartbeat_interval = 30\nheartbeat_liveness = 3\n")
    front, back = procs.tcp(), procs.tcp()
    router = procs.spawn(["router", "--config", cfg, "--frontend", front, "--backend", back],
                         front, None)
    procs.node(router, back, "a", "--config", cfg, "--workers", "1")
    st = router.wait_for(lambda s: len(s["nodes"]) == 1
                         and s["nodes"][0]["rtt_smoothed_ms"] is not None,
                         what="the node's round trip, long before its second beat")
    (node,) = st["nodes"]
    assert 0 <= node["rtt_ms"] < 1000 and node["rtt_smoothed_ms"] == node["rtt_ms"]


def test_quick_workers_are_sized_after_their_first_requests_not_their_second_beat(procs):
    """What a worker holds ahead is sized from its node's round trip and its handler time
    per request (protocol.md 7.1). With 30 s between beats both would come a beat or two
    into the load; the supervisor pings out of turn after first contact, and a worker
    beats out of turn just after its first request ends."""
    cfg = procs.config("[router]\nheartbeat_interval = 30\nheartbeat_liveness = 3\n")
    front, back = procs.tcp(), procs.tcp()
    router = procs.spawn(["router", "--config", cfg, "--frontend", front, "--backend", back],
                         front, None)
    procs.node(router, back, "a", "--config", cfg, "--workers", "1")
    router.wait_for(lambda s: len(s["workers"]) == 1 and s["workers"][0]["state"] == "ready",
                    what="the worker ready")
    with Client(front) as c:
        assert [c.call("echo", i, timeout=10) for i in range(20)] == list(range(20))
    st = router.wait_for(lambda s: s["workers"][0]["prefetch"] > 1,
                         what="the quick worker held more than prefetch ahead")
    assert st["workers"][0]["prefetch"] <= 64


def test_nodes_in_status_and_metrics_and_a_scale_that_keeps_min_per_host(procs):
    pytest.importorskip("prometheus_client",
                        reason="prometheus-client is not installed (the 'metrics' extra)")
    cfg = procs.config(FAST)
    front, back, port = procs.tcp(), procs.tcp(), _free_port()
    router = procs.spawn(["router", "--config", cfg, "--frontend", front, "--backend", back,
                          "--metrics", f"127.0.0.1:{port}"], front, None)
    procs.node(router, back, "a", "--config", cfg, "--workers", "3", "--min-per-host", "2")
    procs.node(router, back, "b", "--config", cfg, "--workers", "0", "--min-per-host", "2")
    st = router.wait_for(lambda s: len(s["nodes"]) == 2 and _per_node(s) == {"a": 3}
                         and all(n["rtt_ms"] is not None for n in s["nodes"]),
                         what="3 workers on a, both nodes with a round trip")
    host = socket.gethostname()
    assert {(w["node"], w["host"]) for w in st["workers"]} == {("a", host)}
    nodes = {n["node"]: n for n in st["nodes"]}
    assert (nodes["a"]["workers"], nodes["a"]["slots"], nodes["b"]["slots"]) == (3, 3, 0)
    for n in nodes.values():
        assert n["state"] == "connected" and n["host"] == host and n["pid"] > 0
        assert n["supervisor"].startswith("sup-") and 0 <= n["seen"] < 1.0
        assert 0 <= n["rtt_ms"] < 1000 and 0 <= n["rtt_smoothed_ms"] < 1000
    assert st["services"][0]["min_per_host"] == 2

    with Client(front, timeout=20) as c:
        out = c.scale("default", 4)  # b is below the minimum: it gets the new one
        assert sorted(out["supervisors"].values()) == [1, 3]
        router.wait_for(lambda s: _per_node(s) == {"a": 3, "b": 1}, what="a 3, b 1")
        with pytest.raises(AdminError, match=r"min_per_host=2 .* at least 3 workers"):
            c.scale("default", 2)
        out = c.scale("default", 3)  # taken from a, which stays at its minimum
        assert out["previous"] == 4 and len(out["retire"]) == 1
        assert out["retire"][0].startswith("default/a/")
        st = router.wait_for(lambda s: len(s["workers"]) == 3 and _per_node(s) == {"a": 2, "b": 1},
                             what="a 2, b 1")

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert f'workerpool_node_rtt_seconds{{host="{host}",node="a"}}' in text
    assert 'workerpool_in_flight{node="b",service="default",worker="default/b/0"}' in text

    out = subprocess.run([sys.executable, "-m", "workerpool.cli", "status", "--router", front],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "PID", "HOST", "DEVICE"]
    assert any(line.startswith("default/b/0") and f" {host} " in line for line in lines)
    assert any(line.split()[:3] == ["NODE", "HOST", "PID"] for line in lines)
    assert any(line.split()[:2] == ["b", host] and "connected" in line for line in lines)


class Relay:
    """A TCP relay from a loopback port to ``target`` that can stop carrying bytes without
    closing anything: a link that goes down (what is sent waits in the kernel's buffers
    and in ZeroMQ's queues) and later heals."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.carrying = threading.Event()
        self.carrying.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        peer: dict[socket.socket, socket.socket] = {}
        try:
            while not self._stop.is_set():
                if not self.carrying.wait(0.05):
                    continue
                for key, _ in sel.select(0.05):
                    if key.fileobj is self.listener:
                        a, _ = self.listener.accept()
                        try:
                            b = socket.create_connection(self.target)
                        except OSError:  # the router is not up yet: ZeroMQ tries again
                            a.close()
                            continue
                        peer[a], peer[b] = b, a
                        sel.register(a, selectors.EVENT_READ)
                        sel.register(b, selectors.EVENT_READ)
                        continue
                    sock = key.fileobj
                    data = sock.recv(1 << 16)
                    if data:
                        peer[sock].sendall(data)
                        continue
                    for s in (sock, peer.pop(sock)):
                        sel.unregister(s)
                        s.close()
                    peer.pop(s, None)
        finally:
            for s in peer:
                s.close()
            sel.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


def test_a_healed_link_brings_one_hello_however_many_pings_waited(procs):
    cfg = procs.config(FAST)
    front, back = procs.tcp(), procs.tcp()
    router = procs.spawn(["router", "--config", cfg, "--frontend", front, "--backend", back],
                         front, None)
    relay = Relay(back)
    node = None
    try:
        node = procs.node(router, relay.address, "a", "--config", cfg, "--workers", "1")
        router.wait_ready(1)
        relay.carrying.clear()  # the link is down: about 15 pings wait in it
        router.wait_for(lambda s: s["router"]["counters"].get("supervisors_lost") == 1,
                        what="the node declared lost")
        time.sleep(2.5)
        relay.carrying.set()
        st = router.wait_for(lambda s: s["router"]["supervisors"] == 1
                             and s["workers"][0]["state"] == "ready"
                             and s["nodes"][0]["state"] == "connected", what="the node back")
        time.sleep(1.0)  # every pong to a queued ping has come back by now
        log = node.log.read_text()
        assert log.count("given this supervisor up as lost") == 1, log
        assert router.log.read_text().count("is back: taking its workers back") == 1
        assert st["router"]["counters"]["supervisors_lost"] == 1
        with Client(front, timeout=10) as c:
            assert c.call("echo", 7) == 7
    finally:
        relay.carrying.set()
        if node is not None and node.popen.poll() is None:
            node.stop()  # through the relay, while it carries: it drains as usual
        relay.close()


def test_a_node_killed_and_started_again_under_its_name_serves_at_once(procs):
    """A Kubernetes GPU pod's container restarting: its supervisor and workers die at once
    (SIGKILL), and a new supervisor starts under the same --node while the router still
    remembers the slot at incarnation 3. Its worker registers at incarnation 1, with no
    death counted; the request the old one was running gets its one answer."""
    cfg = procs.config(FAST)
    front, back = procs.tcp(), procs.tcp()
    router = procs.spawn(["router", "--config", cfg, "--frontend", front, "--backend", back],
                         front, None)
    args = ["--config", cfg, "--workers", "1", "--handler", "workerpool.handlers:Faulty"]
    old = procs.node(router, back, "a", *args)
    router.wait_ready(1)
    with Client(front, timeout=30) as c:
        for _ in range(2):
            with pytest.raises(WorkerCrashedError):
                c.call("exit", {"code": 1})
            router.wait_ready(1)
        st = router.wait_for(lambda s: s["workers"][0]["incarnation"] == 3, what="incarnation 3")
        old_supervisor = st["nodes"][0]["supervisor"]
        running = c.submit("sleep", {"seconds": 60})
        router.wait_for(lambda s: s["workers"][0]["in_flight"] == 1, what="the request running")
        os.killpg(old.pgid, signal.SIGKILL)
        old.popen.wait(10)
        new = procs.node(router, back, "a", *args)
        with pytest.raises(WorkerCrashedError):
            running.result(timeout=30)
        st = router.wait_for(lambda s: [w["state"] for w in s["workers"]] == ["ready"],
                             what="the new worker ready")
        worker = st["workers"][0]
        assert (worker["id"], worker["incarnation"], worker["restarts"]) == ("default/a/0", 1, 0)
        (node,) = st["nodes"]
        assert node["node"] == "a" and node["state"] == "connected"
        assert node["supervisor"] != old_supervisor and node["pid"] == new.popen.pid
        counters = st["router"]["counters"]
        assert counters["supervisors_replaced"] == 1
        assert "stale_ready" not in counters and "stale_slot_events" not in counters
        assert c.call("echo", 5) == 5
    assert "respawning" not in new.log.read_text()  # no death of the new one's worker


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1): each supervisor runs as pid 1 of a "
                    "PID namespace of its own, as in a container")
def test_two_supervisors_of_one_host_name_and_pid_are_two_nodes(procs):
    """Two containers with the host's network (and so its host name) each run `workerpool
    worker` as pid 1, without --node. Their default node names must still differ: were
    both HOSTNAME-1, the second would take the first's slots over and stop it."""
    cfg = procs.config(FAST)
    front, back = procs.tcp(), procs.tcp()
    router = procs.spawn(["router", "--config", cfg, "--frontend", front, "--backend", back],
                         front, None)
    wrap = ["unshare", "--pid", "--fork", "--kill-child"]
    args = ["worker", "--router", back, "--config", cfg, "--workers", "1"]
    a = procs.spawn(args, router.address, "workerpool worker ready", wrap=wrap)
    b = procs.spawn(args, router.address, "workerpool worker ready", wrap=wrap)
    st = router.wait_for(lambda s: len(s["nodes"]) == 2 and len(s["workers"]) == 2
                         and all(w["state"] == "ready" for w in s["workers"]),
                         what="two nodes of one worker each")
    names = sorted(n["node"] for n in st["nodes"])
    assert names[0] != names[1]
    host = socket.gethostname()
    assert all(n["pid"] == 1 and n["node"].startswith(f"{host}-1-") for n in st["nodes"])
    assert "supervisors_replaced" not in st["router"]["counters"]
    with Client(front, timeout=20) as c:
        calls = [c.submit("sleep", {"seconds": 0.05}) for _ in range(8)]
        assert [f.result(timeout=20) for f in calls] == [{"seconds": 0.05}] * 8
    st = router.wait_for(lambda s: sum(w["completed"] for w in s["workers"]) == 8,
                         what="8 requests completed")
    assert all(w["completed"] > 0 for w in st["workers"])  # both serve
    assert a.popen.poll() is None and b.popen.poll() is None
