"""Starting and stopping: drain on SIGTERM/Ctrl-C, exit 0, nothing left behind; remote
supervisors; the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from tests.conftest import ROOT, _env
from workerpool import Client, ServiceUnavailableError, WorkerCrashedError
from workerpool._proc import process_alive
from workerpool.cli import main


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_then_exits_0(procs, sig):
    pool = procs.pool(workers=2)
    c = Client(pool.address, timeout=20)
    try:
        running = [c.submit("sleep", {"seconds": 1.0}) for _ in range(2)]
        queued = [c.submit("echo", i) for i in range(3)]
        pool.wait_for(lambda st: st["services"][0]["in_flight"] >= 2, what="2 running")
        pids = [w["pid"] for w in pool.status()["workers"]]
        if sig == signal.SIGINT:
            os.killpg(pool.pgid, sig)  # what Ctrl-C in a terminal does
        else:
            pool.popen.send_signal(sig)
        time.sleep(0.2)
        with pytest.raises(ServiceUnavailableError, match="shutting down"):
            c.call("echo", "late", timeout=5)
        # Everything admitted before the signal finishes with its real result.
        assert [f.result(10) for f in running] == [{"seconds": 1.0}] * 2
        assert [f.result(10) for f in queued] == [0, 1, 2]
        assert pool.popen.wait(20) == 0
    finally:
        c.close()
    deadline = time.monotonic() + 5
    while process_alive(pool.pgid, group=True) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(pool.pgid, group=True)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_drain_timeout_fails_what_cannot_finish(procs):
    pool = procs.pool("--drain-timeout", "0.5", workers=1)
    with Client(pool.address, timeout=20) as c:
        fut = c.submit("hang")
        pool.wait_for(lambda st: st["services"][0]["in_flight"] == 1, what="hang running")
        t0 = time.monotonic()
        pool.popen.send_signal(signal.SIGTERM)
        with pytest.raises((ServiceUnavailableError, WorkerCrashedError)):
            fut.result(15)
        assert pool.popen.wait(20) == 0
        assert time.monotonic() - t0 < 15  # the hung worker was killed, not waited on


def test_kill_9_of_the_supervisor_leaves_no_workers(procs):
    # The backend in the test's folder: `up` removes the one it makes itself only on the
    # way out, which a SIGKILL never takes.
    pool = procs.pool("--backend", procs.ipc("backend"), workers=2)
    pids = [w["pid"] for w in pool.status()["workers"]]
    router_pid = pool.status()["router"]["pid"]
    os.kill(pool.popen.pid, signal.SIGKILL)
    pool.popen.wait(5)
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.05)
    assert not alive, "workers outlived their supervisor (PR_SET_PDEATHSIG)"
    while _alive(router_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(router_pid), "the router outlived its supervisor"


def test_the_socket_folder_of_a_supervisor_killed_with_9_is_removed_by_the_next(procs):
    # Both pools make their private backend folder in the test's own temporary directory.
    tmp = procs.dir / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}
    first = procs.pool(workers=1, env=env)
    (left,) = list(tmp.iterdir())
    assert (left / "backend").exists()
    os.kill(first.popen.pid, signal.SIGKILL)
    first.popen.wait(5)
    assert left.exists()  # a SIGKILL takes no way out

    second = procs.pool(workers=1, env=env)
    (own,) = list(tmp.iterdir())
    assert own != left, "the dead pool's folder was not removed"
    with Client(second.address, timeout=10) as c:
        assert c.call("echo", 1) == 1
    assert second.stop(signal.SIGTERM, 30) == 0
    assert list(tmp.iterdir()) == []  # a clean exit removes its own


def _alive(pid: int) -> bool:
    if not process_alive(pid):
        return False
    # A zombie (reparented, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_process_alive_for_pids_and_groups(monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             start_new_session=True)
    try:
        assert process_alive(child.pid) and process_alive(child.pid, group=True)
    finally:
        child.kill()
        child.wait(10)
    assert not process_alive(child.pid) and not process_alive(child.pid, group=True)

    def refused(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refused)  # another user's process: it exists
    assert process_alive(child.pid)


def test_remote_supervisor_over_tcp(procs):
    front = procs.tcp()
    back = procs.tcp()
    router = procs.spawn(["router", "--frontend", front, "--backend", back,
                          "--policy", "round-robin"], front, None)
    sup = procs.spawn(["worker", "--router", back, "--handler", "workerpool.handlers:Faulty",
                       "--workers", "2", "--service", "gpu"], front, "workerpool worker ready")
    st = router.wait_ready(2)
    assert {w["service"] for w in st["workers"]} == {"gpu"}
    assert st["services"][0]["policy"] == "round-robin"
    with Client(front, timeout=10) as c:
        assert c.call("echo", 1) == 1  # the only service is the default
        assert c.call("echo", 2, service="gpu") == 2
        victim = st["workers"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        st = router.wait_for(
            lambda s: all(w["state"] == "ready" for w in s["workers"])
            and victim["pid"] not in {w["pid"] for w in s["workers"]}, what="respawn")
        assert [c.call("echo", i, service="gpu") for i in range(10)] == list(range(10))
    # Stopping the router stops its remote pool too: drained, then exit 0 for both.
    router.popen.send_signal(signal.SIGTERM)
    assert router.popen.wait(20) == 0
    assert sup.popen.wait(20) == 0


def test_two_pools_side_by_side(procs):
    a = procs.pool(workers=1)
    b = procs.pool(workers=1)
    assert a.status()["router"]["backend"] != b.status()["router"]["backend"]
    with Client(a.address, timeout=5) as ca, Client(b.address, timeout=5) as cb:
        assert ca.call("echo", "a") == "a"
        assert cb.call("echo", "b") == "b"


def test_status_and_call_commands(pool):
    r = subprocess.run([sys.executable, "-m", "workerpool.cli", "status", "--json",
                        "--router", pool.address], capture_output=True, text=True, timeout=30,
                       env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert len(st["workers"]) == 4
    for w in st["workers"]:
        for key in ("id", "pid", "host", "node", "service", "device", "state", "in_flight",
                    "completed", "errored", "restarts", "uptime", "last_error"):
            assert key in w
        assert w["device"] == "cpu"
    runner = CliRunner()
    out = runner.invoke(main, ["status", "--router", pool.address])
    assert out.exit_code == 0, out.output
    header = out.output.splitlines()[0].split()
    assert header == ["ID", "PID", "HOST", "DEVICE", "MEMORY", "STATE", "IN_FLIGHT",
                      "UTILIZATION", "BATCH", "COMPLETED", "ERRORED", "RESTARTS", "UPTIME"]
    rows = [line.split() for line in out.output.splitlines()[1:5]]
    assert [r[0] for r in rows] == [f"default/{i}" for i in range(4)]
    assert all("0/1+1" in r for r in rows), rows  # IN_FLIGHT: held/capacity+prefetch
    out = runner.invoke(main, ["call", "echo", '{"x": 1}', "--router", pool.address])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"x": 1}
    out = runner.invoke(main, ["call", "count", '{"n": 3}', "--router", pool.address])
    assert out.output.splitlines() == ["0", "1", "2"]
    out = runner.invoke(main, ["call", "raise_error", "{}", "--router", pool.address])
    assert out.exit_code == 1
    assert "HandlerError: ValueError: requested failure" in out.output
    out = runner.invoke(main, ["call", "echo", "{not json", "--router", pool.address])
    assert out.exit_code == 2 and "not JSON" in out.output


def test_status_without_a_router_fails_clearly(procs):
    out = CliRunner().invoke(main, ["status", "--router", procs.ipc("nobody"), "--timeout", "0.3"])
    assert out.exit_code == 1
    assert "no status from" in out.output


@pytest.mark.parametrize("cmd", [[], ["up"], ["router"], ["worker"], ["status"], ["call"]])
def test_help_is_complete(cmd):
    out = CliRunner().invoke(main, [*cmd, "--help"])
    assert out.exit_code == 0
    assert "Usage:" in out.output
    if cmd:
        assert "--router" in out.output or "--frontend" in out.output


def test_bad_flags_are_usage_errors():
    runner = CliRunner()
    out = runner.invoke(main, ["up", "--workers", "-1"])
    assert out.exit_code == 2 and "workers" in out.output
    out = runner.invoke(main, ["up", "--handler", "nocolon"])
    assert out.exit_code == 2 and "package.module:ClassName" in out.output
    out = runner.invoke(main, ["up", "--frontend", "localhost:1"])
    assert out.exit_code == 2 and "ZeroMQ endpoint" in out.output
