"""`workerpool up --log-format json` for real: every line a pool writes to stderr is one
JSON object, and a worker killed with SIGKILL while it holds requests is one line that
says who, how, and what became of them."""

from __future__ import annotations

import json
import os
import signal

import pytest

from workerpool import Client
from workerpool.errors import WorkerCrashedError


def test_a_json_pool_writes_only_json_and_one_line_per_death(procs):
    # Two workers holding two requests each: one running, one sent ahead (prefetch).
    pool = procs.pool("--log-format", "json", "--prefetch", "1", workers=2)
    pool.wait_ready(2)
    with Client(pool.address, timeout=30) as c:
        futs = [c.submit("sleep", {"seconds": 1.5}) for _ in range(4)]
        pool.wait_for(lambda st: all(w["in_flight"] == 2 for w in st["workers"]),
                      what="two requests on each worker")
        victim = pool.workers()["default/0"]
        os.kill(victim["pid"], signal.SIGKILL)
        crashed, done = [], []
        for f in futs:
            try:
                f.result(timeout=30)
                done.append(f.rid)
            except WorkerCrashedError:
                crashed.append(f.rid)
    # The one it ran failed; the one it held ahead never started and ran elsewhere.
    assert len(crashed) == 1 and len(done) == 3
    pool.wait_for(lambda st: any(w["id"] == "default/0" and w["state"] == "ready"
                                 and w["pid"] != victim["pid"] for w in st["workers"]),
                  what="default/0 respawned")
    assert pool.stop() == 0

    text = pool.log.read_text()
    assert text.endswith("\n")
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            pytest.fail(f"line {number} of the pool's stderr is not JSON: {raw!r}")
    for line in lines:
        assert {"time", "level", "role", "pid", "logger", "message"} <= set(line), line

    [death] = [x for x in lines if x.get("event") == "worker-died"]
    assert (death["role"], death["worker"], death["worker_pid"], death["cause"],
            death["signal"], death["exitcode"], death["device"]) == (
        "router", "default/0", victim["pid"], "SIGKILL", 9, None, "cpu")
    assert death["held"] == 2 and death["outcomes"] == {"crashed": 1, "requeued": 1}
    by_id = {r["id"]: r for r in death["requests"]}
    assert by_id[crashed[0]]["outcome"] == "crashed"
    assert set(by_id) - {crashed[0]} <= set(done)
    assert {r["method"] for r in death["requests"]} == {"sleep"}

    roles = {x["role"] for x in lines}
    assert {"router", "supervisor", "worker"} <= roles, roles
    workers = [x for x in lines if x["role"] == "worker"]
    assert {x["worker"] for x in workers} == {"default/0", "default/1"}
    assert all(not x["message"].startswith("[") for x in workers)  # the slot is a field
    setups = [x for x in workers if x.get("event") == "worker-setup"]
    assert sorted(x["incarnation"] for x in setups if x["worker"] == "default/0") == [1, 2]
    ready = [x for x in lines if x.get("event") == "worker-ready"]
    assert {(x["role"], x["worker"]) for x in ready} == {("router", "default/0"),
                                                         ("router", "default/1")}
    [respawn] = [x for x in lines if x.get("event") == "worker-respawn"]
    assert (respawn["role"], respawn["worker"], respawn["worker_pid"], respawn["cause"],
            respawn["signal"]) == ("supervisor", "default/0", victim["pid"], "SIGKILL", 9)
    events = [x.get("event") for x in lines]
    for event in ("router-start", "drain-start", "drained", "router-stop"):
        assert event in events, event


def _json_lines(proc) -> list[dict]:
    return [json.loads(raw) for raw in proc.log.read_text().splitlines()]


def test_router_and_worker_commands_log_json_too(procs):
    front, back = procs.tcp(), procs.tcp()
    router = procs.spawn(["router", "--frontend", front, "--backend", back,
                          "--log-format", "json"], front, None)
    node = procs.node(router, back, "n1", "--workers", "1", "--log-format", "json")
    router.wait_ready(1)
    with Client(router.address, timeout=10) as c:
        assert c.call("echo", "hi") == "hi"
    assert node.stop() == 0
    assert router.stop() == 0
    routed = _json_lines(router)
    assert {x["role"] for x in routed} == {"router"}
    assert [x["worker"] for x in routed if x.get("event") == "worker-ready"] == ["default/n1/0"]
    assert "router-stop" in [x.get("event") for x in routed]
    supervised = _json_lines(node)
    assert {x["role"] for x in supervised} == {"supervisor", "worker"}
    assert {x["worker"] for x in supervised if x["role"] == "worker"} == {"default/n1/0"}
