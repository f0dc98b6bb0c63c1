"""AsyncClient has what Client has: the operator calls against a real pool."""

from __future__ import annotations

import asyncio

import pytest

from workerpool import AsyncClient
from workerpool.errors import AdminError


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
