"""The router process dies: `up` starts a new one at the same addresses, the supervisor
and workers register with it by themselves, clients get RouterRestartedError for what
the old router held and keep working without being recreated."""

from __future__ import annotations

import os
import signal
import time

import pytest

from ipc.protocol import Kind
from tests.test_bundle_client import FakeRouter, _head
from workerpool import AsyncClient, Client
from workerpool.errors import RequestTimeoutError, RouterRestartedError


def test_router_killed_and_restarted(procs):
    pool = procs.pool(workers=2)
    old = pool.status()
    with Client(pool.address, timeout=30) as c:
        held = c.submit("sleep", {"seconds": 2.0})
        pool.wait_for(lambda s: s["services"][0]["in_flight"] == 1, what="held")
        os.kill(old["router"]["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RouterRestartedError, match="restarted"):
            held.result(15)
        assert time.monotonic() - t0 < 5
        # Everyone re-registers with the new router by themselves.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                st = c.status(timeout=1)
                if st["router"]["pid"] != old["router"]["pid"] and sum(
                        w["state"] == "ready" for w in st["workers"]) == 2:
                    break
            except Exception:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the pool did not come back at full strength")
        assert {w["pid"] for w in st["workers"]} == {w["pid"] for w in old["workers"]}
        assert st["router"]["supervisors"] == 1
        # The same client object keeps working.
        assert [c.call("echo", i) for i in range(20)] == list(range(20))
    assert pool.popen.poll() is None  # `up` itself never stopped


def test_async_client_learns_what_a_restarted_router_lost(procs):
    import asyncio

    pool = procs.pool(workers=2, handler="tests.handlers:Streams")
    router_pid = pool.status()["router"]["pid"]

    async def main():
        async with AsyncClient(pool.address, timeout=30) as ac:
            assert await ac.call("echo", 1) == 1
            held = await ac.submit("sleep", {"seconds": 3.0})

            async def consume():
                return [i async for i in ac.stream("count_then_sleep", {"n": 2, "seconds": 3})]

            stream = asyncio.ensure_future(consume())
            while pool.status()["services"][0]["in_flight"] < 2:
                await asyncio.sleep(0.05)
            os.kill(router_pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(RouterRestartedError, match="restarted"):
                await asyncio.wait_for(held, 15)
            with pytest.raises(RouterRestartedError):
                await asyncio.wait_for(stream, 15)
            assert time.monotonic() - t0 < 5  # not the 30 s timeout
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:  # the same client works again
                try:
                    if await ac.call("echo", 2, timeout=1) == 2:
                        return
                except Exception:
                    await asyncio.sleep(0.1)
            pytest.fail("async client did not recover")

    asyncio.run(main())


def test_a_router_that_cannot_start_stops_up_instead_of_looping(procs):
    import socket

    with socket.socket() as s:  # hold the frontend port so the router cannot bind it
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        front = f"tcp://127.0.0.1:{port}"
        pool = procs.spawn(["up", "--frontend", front, "--workers", "1"], front, None)
        assert pool.popen.wait(30) == 1
    assert "could not start" in pool.log.read_text() or "within" in pool.log.read_text()


def test_requests_sent_while_the_router_restarts_are_served(procs):
    """They reach the new router before the workers have registered again: they wait for
    them (registration_grace) instead of failing with ServiceUnavailableError."""
    pool = procs.pool(workers=2)
    router_pid = pool.status()["router"]["pid"]
    with Client(pool.address, timeout=20) as c:
        assert c.call("echo", 0) == 0
        os.kill(router_pid, signal.SIGKILL)
        futs = []
        for i in range(60):  # across the restart and the workers' re-registration
            futs.append(c.submit("echo", i))
            time.sleep(0.05)
        outcomes = []
        for i, f in enumerate(futs):
            try:
                outcomes.append(f.result(20) == i)
            except RouterRestartedError:
                # Sent into the dead router's connection before ZeroMQ noticed it was gone:
                # lost in transit, and the client says so exactly.
                outcomes.append("lost")
    # Never ServiceUnavailableError (that would have raised above); once the new router
    # is up, everything is served, also before the workers have registered with it.
    first_ok = outcomes.index(True)
    assert all(o is True for o in outcomes[first_ok:]), outcomes
    assert "lost" not in outcomes[first_ok:]


def test_a_call_given_up_while_the_router_is_down_is_answered_late_by_the_next(tmp_path):
    """A STATUS that timed out locally while no router listened waits in the client's
    socket, reaches the router that comes up, and is answered: the caller keeps its one
    outcome (RequestTimeoutError) and the reply is counted in ``unmatched_replies``. That
    count is no duplicate; the chaos test once read it as one (its status calls time out
    while the router restarts slowly), so its status calls have a client of their own."""
    address = f"ipc://{tmp_path}/front"
    with Client(address, shm=False) as c:
        with pytest.raises(RequestTimeoutError):
            c.status(timeout=0.2)
        router = FakeRouter(address)
        try:
            router.wait(2)
            [(status, rid), (cancel, cancelled)] = router.received()
            assert (status, cancel, cancelled) == (Kind.STATUS, Kind.CANCEL, rid)
            router.send(_head(Kind.RESULT, rid, {"router": {}}))  # the router's answer
            fut = c.submit("echo", 1)  # a client with nothing outstanding reads nothing
            [echo] = router.wait(3)
            router.send(_head(Kind.RESULT, echo, 1))
            assert fut.result(5) == 1 and c.unmatched_replies == 1
        finally:
            router.close()
