"""Hot spares (a set-up idle worker replaces a dead one at once) and ``workerpool scale``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

from ipc import protocol
from ipc.protocol import Kind
from tests.conftest import ROOT, _env
from workerpool import Client
from workerpool.errors import AdminError, WorkerCrashedError


def _states(st: dict) -> dict[str, str]:
    return {w["id"]: w["state"] for w in st["workers"]}


def _busy_workers(pool, c) -> set[str]:
    """The workers that take part when 4 requests run at once."""
    before = {w["id"]: w["completed"] for w in pool.status()["workers"]}
    for f in [c.submit("sleep", {"seconds": 0.3}) for _ in range(4)]:
        f.result(10)
    return {i for i, w in pool.workers().items() if w["completed"] > before.get(i, 0)}


def _serving(st: dict) -> list[str]:
    return sorted(w["id"] for w in st["workers"] if w["state"] in ("ready", "busy"))


def _slow_respawn_pool(procs, workers: int, spares: int, *args: str):
    return procs.pool_from_config(
        '[[services]]\nname = "default"\nhandler = "tests.handlers:SlowRespawn"\n'
        f"workers = {workers}\nspares = {spares}\noptions = {{ respawn_setup_seconds = 30 }}\n",
        *args)


def test_spare_takes_a_dead_workers_place_before_its_replacement_is_set_up(procs):
    pool = _slow_respawn_pool(procs, workers=2, spares=1)
    st = pool.wait_for(lambda s: sorted(_states(s).values()) == ["ready", "ready", "spare"],
                       what="2 serving, 1 spare")
    svc = st["services"][0]
    assert (svc["workers"], svc["spares"], svc["target_workers"]) == (2, 1, 2)
    spare = next(w for w in st["workers"] if w["state"] == "spare")
    victim = next(w for w in st["workers"] if w["state"] == "ready")
    with Client(pool.address, timeout=10) as c:
        # The spare is set up but gets no work while the pool is whole.
        assert spare["id"] not in _busy_workers(pool, c)
        os.kill(victim["pid"], signal.SIGKILL)
        # Its replacement needs 30 s of setup(): capacity must come back from the spare.
        st = pool.wait_for(lambda s: len(_serving(s)) == 2 and spare["id"] in _serving(s),
                           timeout=10, what="the spare serving")
        assert _states(st)[victim["id"]] in ("dead", "restarting")
        assert st["router"]["counters"]["spares_promoted"] == 1
        assert _busy_workers(pool, c) == set(_serving(st))


def test_idempotent_request_of_a_dead_worker_reruns_on_the_spare(procs):
    pool = _slow_respawn_pool(procs, workers=1, spares=1)
    st = pool.wait_for(lambda s: sorted(_states(s).values()) == ["ready", "spare"],
                       what="1 serving, 1 spare")
    spare = next(w["id"] for w in st["workers"] if w["state"] == "spare")
    with Client(pool.address, timeout=20) as c:
        fut = c.submit("sleep", {"seconds": 1.0}, idempotent=True)
        pool.wait_for(lambda s: s["services"][0]["in_flight"] == 1, what="request running")
        busy = next(w for w in pool.status()["workers"] if w["state"] == "busy")
        os.kill(busy["pid"], signal.SIGKILL)
        assert fut.result(15) == {"seconds": 1.0}  # run again, on the spare
        assert c.call("whoami")["slot"] == spare
        # Not idempotent: the crash is the answer, and the spare keeps serving.
        fut = c.submit("sleep", {"seconds": 1.0})
        pool.wait_for(lambda s: s["services"][0]["in_flight"] == 1, what="request running")
        os.kill(pool.workers()[spare]["pid"], signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            fut.result(15)


def test_scale_up_and_down_at_runtime(procs):
    pool = procs.pool(workers=2)
    with Client(pool.address, timeout=20) as c:
        out = c.scale("default", 4)
        assert (out["previous"], out["workers"], out["retire"]) == (2, 4, [])
        st = pool.wait_ready(4)
        assert sorted(_states(st)) == [f"default/{i}" for i in range(4)]
        # Scale down while every worker holds a request: nothing held is lost.
        futs = [c.submit("sleep", {"seconds": 1.0, "i": i}) for i in range(4)]
        pool.wait_for(lambda s: s["services"][0]["in_flight"] == 4, what="4 running")
        out = c.scale("default", 2)
        assert len(out["retire"]) == 2 and out["previous"] == 4
        assert [f.result(10)["i"] for f in futs] == [0, 1, 2, 3]
        st = pool.wait_for(lambda s: len(s["workers"]) == 2, what="retired rows removed")
        assert set(_states(st)).isdisjoint(out["retire"])
        assert all(w["state"] == "ready" for w in st["workers"])
        assert _busy_workers(pool, c) == set(_states(st))
        # Scaling again reuses nothing: new slots get fresh ids.
        out = c.scale("default", 3)
        st = pool.wait_ready(3)
        assert "default/4" in _states(st)


def test_scale_up_promotes_spares_at_once(procs):
    pool = _slow_respawn_pool(procs, workers=1, spares=2)
    pool.wait_for(lambda s: sorted(_states(s).values()) == ["ready", "spare", "spare"],
                  what="1 serving, 2 spares")
    with Client(pool.address, timeout=10) as c:
        c.scale("default", 3)
        # Both spares serve as soon as the router has the command; new spares start.
        st = pool.status()
        assert len(_serving(st)) == 3, st
        st = pool.wait_for(lambda s: s["services"][0]["spares"] == 2 and len(_serving(s)) == 3,
                           what="two new spares set up")
        assert len(st["workers"]) == 5


def test_replacement_becomes_the_spare_and_router_restart_keeps_roles(procs):
    pool = procs.pool("--spares", "1", workers=2)
    st = pool.wait_for(lambda s: sorted(_states(s).values()) == ["ready", "ready", "spare"],
                       what="2 serving, 1 spare")
    victim = next(w for w in st["workers"] if w["state"] == "ready")
    os.kill(victim["pid"], signal.SIGKILL)
    st = pool.wait_for(lambda s: _states(s)[victim["id"]] == "spare"
                       and sorted(_states(s).values()) == ["ready", "ready", "spare"],
                       what="the replacement held back as the new spare")
    os.kill(st["router"]["pid"], signal.SIGKILL)
    pool.wait_for(lambda s: s["router"]["pid"] != st["router"]["pid"]
                  and sorted(_states(s).values()) == ["ready", "ready", "spare"],
                  what="roles after the router restart")


def test_scale_bad_input(procs):
    pool = procs.pool("--spares", "1", workers=1)
    with Client(pool.address, timeout=5) as c:
        with pytest.raises(AdminError, match="no service 'nope'"):
            c.scale("nope", 2)
        for bad in (-1, 5000, 1.5, "2", True):
            with pytest.raises(AdminError, match="workers must be an integer"):
                c.scale("default", bad)
        with pytest.raises(AdminError, match="needs at least one worker"):
            c.scale("default", 0)
        assert c.call("echo", 1) == 1
    cli = [sys.executable, "-m", "workerpool.cli"]
    out = subprocess.run([*cli, "scale", "default", "-3", "--router", pool.address],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=30)
    assert out.returncode == 2 and "WORKERS" in out.stderr
    out = subprocess.run([*cli, "scale", "nope", "2", "--router", pool.address],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=30)
    assert out.returncode == 1 and "AdminError: no service 'nope'" in out.stderr
    out = subprocess.run([*cli, "scale", "default", "2", "--router", pool.address],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=30)
    assert out.returncode == 0 and "default: 1 -> 2 workers" in out.stdout
    # The spare was promoted at once; the new slot comes up as the next spare.
    pool.wait_for(lambda s: s["services"][0]["spares"] == 1 and s["services"][0]["workers"] == 2,
                  what="2 serving and a new spare")
    out = subprocess.run([*cli, "status", "--router", pool.address],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=30)
    assert "workers=2 spares=1" in out.stdout


def test_scale_a_service_that_runs_under_two_supervisors(procs):
    router, back = procs.router()
    for node in ("a", "b"):
        procs.node(router, back, node, "--handler", "tests.handlers:Batches", "--workers", "1")
    router.wait_ready(2)

    def per_node(st: dict) -> dict[str, int]:
        live = [w["id"] for w in st["workers"] if w["state"] in ("ready", "busy")]
        return {n: sum(f"/{n}/" in i for i in live) for n in ("a", "b")}

    with Client(router.address, timeout=20) as c:
        out = c.scale("default", 5)  # added where there are fewest: 3 and 2
        assert (out["previous"], out["workers"], out["retire"]) == (2, 5, [])
        assert sorted(out["supervisors"].values()) == [2, 3]
        st = router.wait_ready(5)
        assert sorted(per_node(st).values()) == [2, 3]
        # Down to 1 while two requests are held: taken where there are most, idle ones first.
        gate = procs.dir / "gate-scale"
        futs = [c.submit("gate", {"path": str(gate)}) for _ in range(2)]
        router.wait_for(lambda s: s["services"][0]["in_flight"] == 2, what="2 held")
        busy = {w["id"] for w in router.status()["workers"] if w["in_flight"]}
        assert len(busy) == 2
        out = c.scale("default", 1)
        assert out["previous"] == 5 and len(out["retire"]) == 4
        assert sorted(out["supervisors"].values()) == [0, 1]
        kept = busy - set(out["retire"])
        assert len(kept) == 1, (busy, out)  # of the busy two, one stays: the rest were idle
        gate.touch()
        assert [f.result(10) for f in futs] == ["opened"] * 2  # nothing held is lost
        st = router.wait_for(lambda s: len(s["workers"]) == 1, what="retired rows removed")
        assert {w["id"] for w in st["workers"]} == kept
        assert [c.call("echo", i) for i in range(5)] == list(range(5))
        out = c.scale("default", 2)  # back up on the supervisor that had none
        st = router.wait_ready(2)
        assert per_node(st) == {"a": 1, "b": 1}


def test_scale_keeps_a_worker_on_each_supervisor_with_spares(procs):
    router, back = procs.router()
    for node in ("a", "b"):
        procs.node(router, back, node, "--handler", "workerpool.handlers:Faulty", "--workers",
                   "1", "--spares", "1")
    router.wait_for(lambda s: sorted(w["state"] for w in s["workers"])
                    == ["ready", "ready", "spare", "spare"], what="2 serving, 2 spares")
    with Client(router.address, timeout=10) as c:
        with pytest.raises(AdminError, match="keeps spares on 2 supervisors: it needs at least 2"):
            c.scale("default", 1)
        out = c.scale("default", 4)  # both spares serve at once, one more on each node
        assert out["supervisors"] == {k: 2 for k in out["supervisors"]}
        assert len(_serving(router.status())) == 4


def test_scale_down_retires_a_spare_that_sits_on_another_supervisor(procs):
    # Promotion ignores hosts: after a's worker dies, b's spare serves and a's replacement
    # comes back as the spare. Scaling to 1 then takes a's count to 0, and the slot a
    # still runs (a spare) must retire too, or a would keep a process it was told not to.
    router, back = procs.router()
    args = ["--handler", "workerpool.handlers:Faulty", "--workers", "1"]
    procs.node(router, back, "a", *args)
    procs.node(router, back, "b", *args, "--spares", "1")
    st = router.wait_for(lambda s: sorted(_states(s).values()) == ["ready", "ready", "spare"],
                         what="2 serving, b's spare")
    os.kill(next(w["pid"] for w in st["workers"] if w["id"] == "default/a/0"), signal.SIGKILL)
    router.wait_for(lambda s: _states(s) == {"default/a/0": "spare", "default/b/0": "ready",
                                             "default/b/1": "ready"},
                    what="b's spare serving, a's replacement the spare")
    with Client(router.address, timeout=10) as c:
        out = c.scale("default", 1)
        assert out["retire"] == ["default/a/0"]
        assert sorted(out["supervisors"].values()) == [0, 1]
        st = router.wait_for(lambda s: "default/a/0" not in _states(s), what="a/0 gone")
        assert sorted(_states(st).values()) == ["ready", "spare"]
        assert [c.call("echo", i) for i in range(3)] == [0, 1, 2]


def test_supervisor_retires_slots_a_scale_up_started_that_the_router_could_not_name(procs):
    # A fake router sees exact messages: scale to 3, then at once to 1, before it heard of
    # the two new slots (their HELLO still on the way), so its retire list is empty. The
    # supervisor must retire them itself (they never registered: nothing is lost).
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    back = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    try:
        supervisor = procs.spawn(["worker", "--router", back, "--handler",
                                  "workerpool.handlers:Faulty", "--workers", "1", "--node", "a"],
                                 back, None)  # its ready line needs a real router

        def next_from_supervisor(kinds, timeout=20.0):
            deadline = time.monotonic() + timeout
            while router.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                ident, *frames = router.recv_multipart()
                msg = protocol.decode(frames)
                if ident.startswith(b"sup-") and msg.kind in kinds:
                    return ident, msg
            raise AssertionError(f"no {kinds} from the supervisor within {timeout}s")

        sup, hello = next_from_supervisor({Kind.HELLO})
        assert [s["slot"] for s in hello.meta["slots"]] == ["default/a/0"]
        for workers in (3, 1):
            router.send_multipart([sup, *protocol.encode(Kind.ADMIN, 0, {
                "op": "scale", "service": "default", "workers": workers, "retire": []})])
        assert [s["slot"] for s in next_from_supervisor({Kind.HELLO})[1].meta["slots"]] == [
            "default/a/0", "default/a/1", "default/a/2"]
        assert [s["slot"] for s in next_from_supervisor({Kind.HELLO})[1].meta["slots"]] == [
            "default/a/0"]
        removed = set()
        while removed != {"default/a/1", "default/a/2"}:
            msg = next_from_supervisor({Kind.SLOT})[1]
            if msg.meta.get("event") == "removed":
                removed.add(msg.meta["slot"])
        # Stop as a real router would let it: SIGTERM, its DRAIN answered with DRAINED.
        supervisor.popen.send_signal(signal.SIGTERM)
        next_from_supervisor({Kind.DRAIN})
        router.send_multipart([sup, *protocol.encode(Kind.DRAINED, 0)])
        assert supervisor.popen.wait(20) == 0
    finally:
        router.close(0)
        ctx.term()
