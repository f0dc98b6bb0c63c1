"""Supervision edge cases: setup failures, exit codes, zero workers, several remote
supervisors, and leaving one supervisor without stopping the router."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from workerpool import Client, PayloadError, ServiceUnavailableError, WorkerCrashedError
from workerpool.errors import AdminError


def test_one_failed_setup_among_healthy_workers(procs):
    pool = procs.pool(handler="tests.handlers:FailFirstSlot", workers=2)
    # The traceback (the worker's GOODBYE) and the failure (its supervisor's notice) come
    # on two connections, either first: the slot may be failed a moment before the router
    # has the traceback. Whichever came first, both end up in last_error.
    st = pool.wait_for(lambda s: {w["state"] for w in s["workers"]} == {"failed", "ready"}
                       and all("weights not found" in (w["last_error"] or "")
                               for w in s["workers"] if w["state"] == "failed"),
                       what="one failed with its traceback, one ready")
    failed = next(w for w in st["workers"] if w["state"] == "failed")
    assert failed["id"] == "default/0"
    assert failed["last_error"].startswith("setup() failed; process exited with code 78\n")
    assert "weights not found for default/0" in failed["last_error"]  # the traceback survives
    with Client(pool.address, timeout=5) as c:
        assert [c.call("echo", i) for i in range(5)] == list(range(5))
    assert pool.workers()["default/0"]["restarts"] == 0  # never respawned in a loop


def test_failed_service_answers_at_once(procs):
    pool = procs.pool_from_config(
        '[[services]]\nname = "good"\nhandler = "workerpool.handlers:Echo"\n'
        '[[services]]\nname = "bad"\nhandler = "tests.handlers:BadSetup"\n')
    pool.wait_for(lambda s: any(w["state"] == "failed" for w in s["workers"]), what="failed")
    with Client(pool.address, timeout=5) as c:
        with pytest.raises(ServiceUnavailableError, match="no live workers"):
            c.call("echo", 1, service="bad")
        assert c.call("echo", 1, service="good") == 1
        with pytest.raises(ServiceUnavailableError, match="no 'default'"):
            c.call("echo", 1)


def test_exit_78_after_setup_is_a_crash_not_a_setup_failure(procs):
    pool = procs.pool(workers=1)
    with Client(pool.address, timeout=10) as c:
        with pytest.raises(WorkerCrashedError, match="code 78"):
            c.call("exit", {"code": 78})
        st = pool.wait_ready(1)
        assert st["workers"][0]["restarts"] == 1
        assert c.call("echo", 1) == 1


def test_zero_workers_is_ready_at_once(procs):
    pool = procs.pool(workers=0)
    with Client(pool.address, timeout=5) as c, pytest.raises(ServiceUnavailableError):
        c.call("echo", 1)


def test_reply_over_the_size_limit_is_a_typed_error(procs):
    cfg = procs.config("[router]\nmax_message_bytes = 100000\n")
    pool = procs.pool("--config", cfg, handler="tests.handlers:Big", workers=1)
    with Client(pool.address, timeout=10) as c:
        with pytest.raises(PayloadError, match="over max_message_bytes"):
            c.call("big", {"n": 200_000})
        assert len(c.call("big", {"n": 50_000})) == 50_000  # the worker is still there


def test_two_remote_supervisors_and_one_leaves(procs):
    router, back = procs.router()
    front = router.address
    args = ["--handler", "workerpool.handlers:Faulty", "--workers", "2"]
    a = procs.node(router, back, "a", *args)
    b = procs.node(router, back, "b", *args)
    st = router.wait_ready(4)
    assert sorted(w["id"] for w in st["workers"]) == [
        "default/a/0", "default/a/1", "default/b/0", "default/b/1"]
    with Client(front, timeout=15) as c:
        slow = [c.submit("sleep", {"seconds": 0.8}) for _ in range(4)]
        router.wait_for(lambda s: s["services"][0]["in_flight"] == 4, what="4 running")
        a.popen.send_signal(signal.SIGTERM)  # supervisor a leaves; the router stays
        assert [f.result() for f in slow] == [{"seconds": 0.8}] * 4  # a's finish first
        assert a.popen.wait(20) == 0
        st = router.wait_for(lambda s: sum(w["state"] == "ready" for w in s["workers"]) == 2,
                             what="b's workers only")
        assert {w["id"] for w in st["workers"] if w["state"] == "ready"} == {
            "default/b/0", "default/b/1"}
        assert [c.call("echo", i) for i in range(10)] == list(range(10))
    assert router.popen.poll() is None and b.popen.poll() is None
    os.kill(router.popen.pid, signal.SIGTERM)
    assert router.popen.wait(20) == 0
    assert b.popen.wait(20) == 0


def test_restart_intensity_marks_failed_and_restart_resets(procs):
    cfg = procs.config("[supervisor]\nmax_restarts = 2\nrestart_window = 60\n"
                       "restart_backoff = 0.01\n")
    pool = procs.pool("--config", cfg, workers=1)
    with Client(pool.address, timeout=10) as c:
        for n in range(3):  # two respawns are allowed; the third death fails the slot
            with pytest.raises(WorkerCrashedError):
                c.call("exit", {"code": 9})
            if n < 2:
                pool.wait_ready(1)
        st = pool.wait_for(lambda s: s["workers"][0]["state"] == "failed", what="failed")
        w = st["workers"][0]
        assert "died 3 times within 60s (max_restarts=2)" in w["last_error"]
        assert w["restarts"] == 2
        # Every worker of the service failed: requests are refused at once, not queued.
        with pytest.raises(ServiceUnavailableError, match="no live workers"):
            c.call("echo", 1)
        # The operator resets it.
        out = c.restart_worker("default/0")
        assert "restart of default/0" in out["message"]
        pool.wait_ready(1)
        assert c.call("echo", 2) == 2
        with pytest.raises(AdminError, match="no worker 'default/9'"):
            c.restart_worker("default/9")


def test_restart_command_replaces_a_running_worker_after_its_work(procs):
    from click.testing import CliRunner

    from workerpool.cli import main

    pool = procs.pool(workers=1)
    with Client(pool.address, timeout=10) as c:
        pid = pool.status()["workers"][0]["pid"]
        running = c.submit("sleep", {"seconds": 0.5})
        pool.wait_for(lambda s: s["workers"][0]["in_flight"] == 1, what="busy")
        out = CliRunner().invoke(main, ["restart", "default/0", "--router", pool.address])
        assert out.exit_code == 0, out.output
        assert running.result() == {"seconds": 0.5}  # finished, not killed
        st = pool.wait_for(lambda s: s["workers"][0]["pid"] != pid
                           and s["workers"][0]["state"] == "ready", what="replaced")
        assert st["workers"][0]["restarts"] == 1
        assert c.call("echo", 3) == 3
        out = CliRunner().invoke(main, ["restart", "nope/1", "--router", pool.address])
        assert out.exit_code == 1 and "AdminError" in out.output


def test_drain_a_worker_then_restart_it(procs):
    from click.testing import CliRunner

    from workerpool.cli import main

    pool = procs.pool("--policy", "round-robin", workers=2)
    with Client(pool.address, timeout=15) as c:
        running = c.submit("sleep", {"seconds": 0.6})
        st = pool.wait_for(lambda s: any(w["in_flight"] for w in s["workers"]), what="busy")
        victim = next(w for w in st["workers"] if w["in_flight"])
        out = CliRunner().invoke(main, ["drain", victim["id"], "--router", pool.address])
        assert out.exit_code == 0, out.output
        assert pool.workers()[victim["id"]]["state"] == "draining"
        # New work goes elsewhere while the drained worker finishes what it holds.
        assert {c.call("whoami")["slot"] for _ in range(6)} != {victim["id"]}
        assert running.result() == {"seconds": 0.6}
        pool.wait_for(lambda s: {w["id"]: w for w in s["workers"]}[victim["id"]]["state"]
                      == "stopped", what="drained worker stopped")
        time.sleep(0.5)
        w = pool.workers()[victim["id"]]
        assert w["state"] == "stopped" and w["restarts"] == 0  # not respawned
        with pytest.raises(AdminError, match="only a registered worker drains"):
            c.drain_worker(victim["id"])
        c.restart_worker(victim["id"])
        pool.wait_ready(2)
        assert [c.call("echo", i) for i in range(4)] == list(range(4))


def test_the_supervisor_drops_unknown_and_malformed_router_messages(standin_supervisor,
                                                                    caplog):
    from ipc import protocol, transport
    from ipc.protocol import Kind

    sup, router, ident = standin_supervisor
    for meta in ({"op": "reboot", "slot": "default/0"},  # unknown op: logged, ignored
                 {"op": "scale", "service": "default"},  # no "workers"
                 {"op": "scale", "service": "default", "workers": "many"},
                 {"op": "restart", "slot": "nope/0"}):  # no such slot
        transport.send(router, [ident, *protocol.encode(Kind.ADMIN, 0, meta)])
    deadline = time.monotonic() + 5
    while not caplog.text.count("from router") >= 2 and time.monotonic() < deadline:
        sup._drain_socket()
        time.sleep(0.01)
    assert "ignored ADMIN with unknown op 'reboot'" in caplog.text
    assert caplog.text.count("dropped malformed ADMIN from router") == 2
    assert not sup._stopping and sup.workers == {}


def test_reap_orphans_reaps_the_others_and_leaves_ours_with_their_status():
    """Two exited children: one not ours (an orphan a PID 1 inherited) is reaped, one of
    ours is left for its Popen, which still reads its exit status."""
    from workerpool.children import reap_orphans

    other = subprocess.Popen([sys.executable, "-c", "pass"])
    ours = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    for p in (other, ours):  # both exited, not reaped: zombies
        deadline = time.monotonic() + 10
        while os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    reaped = reap_orphans({ours.pid})
    assert ours.wait(5) == 3  # its status was not taken
    reaped += reap_orphans({ours.pid})  # the search stops at one of ours: past it now
    assert reaped == 1
    with pytest.raises(ChildProcessError):
        os.waitid(os.P_PID, other.pid, os.WEXITED | os.WNOHANG)
    assert reap_orphans(set()) == 0  # nothing left


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1): the supervisor runs as pid 1 of a "
                    "PID namespace of its own, as in a container")
def test_a_supervisor_that_is_pid_1_reaps_the_orphans_its_workers_leave(procs):
    """`workerpool worker` as a container's first process: a handler's subprocess leaves
    a process behind, which the kernel hands to pid 1 when its parent exits. The
    supervisor reaps it when it exits, and its own workers' deaths still read right."""
    front, back = procs.tcp(), procs.tcp()
    router = procs.spawn(["router", "--frontend", front, "--backend", back], front, None)
    sup = procs.spawn(["worker", "--router", back, "--workers", "1", "--handler",
                       "tests.handlers:Orphans"], router.address, "workerpool worker ready",
                      wrap=["unshare", "--pid", "--fork", "--kill-child"])
    (pid1,) = _children(sup.popen.pid)  # the supervisor, pid 1 inside
    with Client(front, timeout=20) as c:
        assert all(c.call("orphan", 0.1) for _ in range(5))
        deadline = time.monotonic() + 15
        while True:  # the sleeps end within 0.1 s; the supervisor looks once a second
            states = [_state(p) for p in _children(pid1)]
            if states.count("Z") == 0 and len(states) == 1:  # only its worker
                break
            assert time.monotonic() < deadline, f"children of pid 1: {states}"
            time.sleep(0.1)
        with pytest.raises(WorkerCrashedError):
            c.call("exit", {"code": 3})
    st = router.wait_for(lambda s: s["workers"][0]["restarts"] == 1
                         and s["workers"][0]["state"] == "ready", what="respawned")
    assert "exited with code 3" in st["workers"][0]["last_error"]


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_setup_failure_that_beats_the_connection_still_reaches_the_router(tmp_path):
    """setup() fails at once, before the router is even listening (it is starting, or far
    away): the GOODBYE with the traceback waits for the connection instead of being let
    go with the process, so `last_error` shows why."""
    import zmq

    from ipc import protocol, transport
    from ipc.protocol import Kind
    from workerpool.children import start_worker
    from workerpool.worker import WorkerSpec

    address = f"ipc://{tmp_path}/backend"
    spec = WorkerSpec(slot="default/0", service="default", incarnation=1,
                      handler="tests.handlers:BadSetup", device="cpu", backend=address)
    proc, pidfd = start_worker(spec)
    os.close(pidfd)
    ctx = zmq.Context()
    try:
        time.sleep(1.0)  # its setup() has failed by now: the router comes up only then
        router = ctx.socket(zmq.ROUTER)
        router.bind(address)
        assert router.poll(10_000), "no GOODBYE came"
        frames = transport.recv(router, buffers_from=2)
        msg = protocol.decode(frames[1:])
        assert msg.kind is Kind.GOODBYE and msg.meta["reason"] == "setup-failed"
        assert "Traceback" in msg.meta["error"]
        assert proc.wait(10) == 78
        router.close(0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ctx.term()
