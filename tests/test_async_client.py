"""AsyncClient has what Client has: the operator calls against a real pool, and local
deadlines when the router stops answering (both clients side by side)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from workerpool import AsyncClient, Client
from workerpool.config import TIMINGS
from workerpool.errors import AdminError, RequestTimeoutError


def _states(st: dict) -> dict[str, str]:
    return {w["id"]: w["state"] for w in st["workers"]}


def test_async_drain_then_restart_a_worker(procs):
    pool = procs.pool("--policy", "round-robin", workers=2)

    async def main():
        async with AsyncClient(pool.address, timeout=10) as ac:
            victim, other = sorted(_states(await ac.status()))
            out = await ac.drain_worker(victim)
            assert out["message"] == f"drain of {victim} sent to its supervisor"
            pool.wait_for(lambda s: _states(s)[victim] == "stopped", what="drained")
            assert {(await ac.call("whoami"))["slot"] for _ in range(4)} == {other}
            with pytest.raises(AdminError, match="only a registered worker drains"):
                await ac.drain_worker(victim)
            out = await ac.restart_worker(victim)
            assert out["message"] == f"restart of {victim} sent to its supervisor"
            pool.wait_ready(2)
            assert {(await ac.call("whoami"))["slot"] for _ in range(4)} == {victim, other}
            with pytest.raises(AdminError, match="no worker 'default/9'"):
                await ac.restart_worker("default/9")
            with pytest.raises(AdminError, match="no worker 'default/9'"):
                await ac.drain_worker("default/9")

    asyncio.run(main())


def test_async_scale_up_and_down(procs):
    pool = procs.pool(workers=1)

    async def main():
        async with AsyncClient(pool.address, timeout=10) as ac:
            out = await ac.scale("default", 2)
            assert (out["previous"], out["workers"], out["retire"]) == (1, 2, [])
            pool.wait_ready(2)
            out = await ac.scale("default", 1)
            assert (out["previous"], out["workers"], len(out["retire"])) == (2, 1, 1)
            st = pool.wait_for(lambda s: len(s["workers"]) == 1, what="retired row removed")
            assert set(_states(st)).isdisjoint(out["retire"])
            with pytest.raises(AdminError, match="no service 'nope'"):
                await ac.scale("nope", 2)
            assert await ac.call("echo", 1) == 1

    asyncio.run(main())


def test_a_stopped_router_fails_requests_locally_after_timeout_plus_grace(procs):
    """The router is SIGSTOPped: no reply and no RequestTimeoutError from it, so each
    client fails its requests itself, TIMINGS.local_grace after their timeout (STATUS and
    ADMIN at their timeout), and works again once the router is back."""
    pool = procs.pool(workers=1, handler="tests.handlers:Streams")
    router_pid = pool.status()["router"]["pid"]
    timeout = 0.5

    async def elapsed_until_timeout(make) -> float:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="no reply before the deadline"):
            await make()
        return time.monotonic() - t0

    async def main():
        with Client(pool.address) as c:
            async with AsyncClient(pool.address) as ac:
                assert await ac.call("echo", 0) == 0 and c.call("echo", 0) == 0

                async def submitted():
                    return await (await ac.submit("echo", 1, timeout=timeout))

                async def streamed():
                    return [i async for i in ac.stream("count", {"n": 3}, timeout=timeout)]

                os.kill(router_pid, signal.SIGSTOP)
                try:
                    waits = await asyncio.gather(
                        elapsed_until_timeout(lambda: ac.call("echo", 1, timeout=timeout)),
                        elapsed_until_timeout(submitted),
                        elapsed_until_timeout(streamed),
                        elapsed_until_timeout(lambda: asyncio.to_thread(
                            c.call, "echo", 1, timeout=timeout)),
                        elapsed_until_timeout(lambda: ac.status(timeout=timeout)),
                        elapsed_until_timeout(lambda: ac.restart_worker("default/9", timeout=timeout)))
                finally:
                    os.kill(router_pid, signal.SIGCONT)
                local = timeout + TIMINGS.local_grace
                assert all(local <= w < local + 1.0 for w in waits[:4]), waits
                assert all(timeout <= w < timeout + 1.0 for w in waits[4:]), waits
                # Nothing is left waiting, and both clients work again.
                assert len(ac._replies) == 0
                assert await ac.call("echo", 2, timeout=10) == 2
                assert c.call("echo", 2, timeout=10) == 2

    asyncio.run(main())
