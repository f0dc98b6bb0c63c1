"""Both clients against a real pool with thousands of requests submitted at once: the
requests go out bundled, the router's replies come back bundled, and every request gets
its own outcome once (results, streams and errors mixed)."""

from __future__ import annotations

import asyncio

from workerpool import AsyncClient, Client
from workerpool.errors import HandlerError

N = 2000


def _request(i: int) -> tuple[str, object]:
    """Mostly echoes, with a stream every 7th and an error every 11th."""
    if i % 11 == 0:
        return "raise_error", None
    if i % 7 == 0:
        return "count", {"n": 3}
    return "echo", i


def _check(i: int, outcome: object) -> None:
    if i % 11 == 0:
        assert isinstance(outcome, HandlerError), outcome
    elif i % 7 == 0:
        assert outcome == [0, 1, 2]
    else:
        assert outcome == i


def test_thousands_of_submits_at_once_through_client_all_resolve(pool):
    with Client(pool.address, timeout=60) as c:
        futs = [c.submit(*_request(i)) for i in range(N)]
        for i, fut in enumerate(futs):
            _check(i, fut.exception(60) or fut.result(0))
        assert c.unmatched_replies == 0 and not c._replies


def test_thousands_of_submits_at_once_through_async_client_all_resolve(pool):
    async def main():
        async with AsyncClient(pool.address, timeout=60) as ac:
            futs = [await ac.submit(*_request(i)) for i in range(N)]
            outcomes = await asyncio.wait_for(
                asyncio.gather(*futs, return_exceptions=True), 60)
            for i, outcome in enumerate(outcomes):
                _check(i, outcome)
            calls = [ac.call("echo", i) for i in range(N)]  # one task each, one turn
            assert await asyncio.wait_for(asyncio.gather(*calls), 60) == list(range(N))
            assert ac.unmatched_replies == 0 and not ac._replies

    asyncio.run(main())
