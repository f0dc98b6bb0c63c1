"""Liveness: what no death notice reveals. A handler that never returns (exec_timeout),
a stopped process (SIGSTOP: heartbeats stop), and a supervisor whose host vanished."""

from __future__ import annotations

import os
import signal
import time

import pytest

from workerpool import Client, RequestTimeoutError, ServiceUnavailableError, WorkerCrashedError


def _fast_heartbeats(procs) -> str:
    return procs.config("[router]\nheartbeat_interval = 0.2\nheartbeat_liveness = 3\n")


def test_exec_timeout_kills_the_hung_worker_and_answers_everything(procs):
    pool = procs.pool_from_config(
        '[[services]]\nname = "default"\nhandler = "workerpool.handlers:Faulty"\n'
        "workers = 1\nmax_inflight = 2\nexec_timeout = 0.5\n")
    with Client(pool.address, timeout=20) as c:
        pid = pool.status()["workers"][0]["pid"]
        hung = c.submit("hang")
        behind = c.submit("echo", "behind it")  # dispatched to the same worker, waiting
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError, match=r"exec_timeout=0\.5s"):
            hung.result(10)
        assert time.monotonic() - t0 < 3
        # It never started, so it runs again on the replacement: no error for it.
        assert behind.result(10) == "behind it"
        st = pool.wait_for(lambda s: s["workers"][0]["state"] == "ready"
                           and s["workers"][0]["pid"] != pid, what="replaced")
        assert "exec_timeout" in st["workers"][0]["last_error"]
        assert st["router"]["counters"]["hung_workers_killed"] == 1
        assert c.call("echo", 1) == 1


def test_a_stopped_worker_is_detected_by_heartbeats_and_replaced(procs):
    pool = procs.pool("--config", _fast_heartbeats(procs), workers=2)
    with Client(pool.address, timeout=20) as c:
        victim = pool.workers()["default/0"]
        fut = c.submit("sleep", {"seconds": 0.3})
        pool.wait_for(lambda s: s["workers"][0]["in_flight"] == 1, what="busy")
        os.kill(victim["pid"], signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashedError, match="no heartbeat"):
            fut.result(10)
        assert time.monotonic() - t0 < 5  # ~0.6 s of silence, not a request timeout
        st = pool.wait_for(lambda s: s["workers"][0]["state"] == "ready"
                           and s["workers"][0]["pid"] != victim["pid"], what="replaced")
        assert "no heartbeat" in st["workers"][0]["last_error"]
        assert [c.call("echo", i) for i in range(6)] == list(range(6))


def test_a_vanished_supervisor_host_is_detected(procs):
    cfg = _fast_heartbeats(procs)
    front = procs.tcp()
    back = procs.tcp()
    router = procs.spawn(["router", "--config", cfg, "--frontend", front, "--backend", back],
                         front, None)
    sup = procs.spawn(["worker", "--config", cfg, "--router", back, "--handler",
                       "workerpool.handlers:Faulty", "--workers", "1", "--node", "h1"],
                      front, "workerpool worker ready")
    router.wait_ready(1)
    with Client(front, timeout=20) as c:
        fut = c.submit("sleep", {"seconds": 3})  # still running when the host returns
        router.wait_for(lambda s: s["services"][0]["in_flight"] == 1, what="busy")
        # The whole host stops: supervisor and worker both freeze (no FIN, no exit).
        os.killpg(sup.pgid, signal.SIGSTOP)
        try:
            with pytest.raises(WorkerCrashedError):
                fut.result(10)
            st = router.wait_for(lambda s: s["workers"][0]["state"] == "failed",
                                 what="slot failed")
            assert st["router"]["counters"]["supervisors_lost"] == 1
            with pytest.raises(ServiceUnavailableError):
                c.call("echo", 1)
        finally:
            os.killpg(sup.pgid, signal.SIGCONT)
        # The host comes back: its supervisor is taken back with its worker (which registers
        # again once it has finished the request it was running, whose reply is dropped).
        st = router.wait_for(lambda s: s["router"]["supervisors"] == 1
                             and s["workers"][0]["state"] == "ready", what="host back")
        assert c.call("echo", 2) == 2
        assert "sent to its supervisor" in c.restart_worker(st["workers"][0]["id"])["message"]
        router.wait_for(lambda s: s["workers"][0]["state"] == "ready"
                        and s["workers"][0]["pid"] != st["workers"][0]["pid"],
                        what="an operator restart carried out by the returned supervisor")


def test_devices_minus_one_hides_every_gpu(monkeypatch):
    from workerpool import devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert devices.parse_devices("auto") == ["cpu"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")
    assert devices.parse_devices("auto") == ["0"]


def test_call_rejects_bad_timeouts_as_usage_errors():
    from click.testing import CliRunner

    from workerpool.cli import main

    for bad in ("0", "100000"):
        out = CliRunner().invoke(main, ["call", "echo", "1", "--timeout", bad])
        assert out.exit_code == 2 and "Traceback" not in out.output
