"""Fairness between HTTP callers: the gateway spreads its callers over several router
connections (so the router's turns and ``max_client_inflight`` hold between callers), and
may cap each caller's requests itself. The mapping is tested with plain values; the rest
against a real pool and real gateways, over real HTTP from distinct loopback addresses.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from tests.conftest import Processes
from workerpool import Client
from workerpool.gateway.callers import Callers, caller_key

# -- the mapping, with plain values ---------------------------------------------------------------


def test_caller_key_token_then_forwarded_then_peer():
    a = caller_key("secret-token-aaaaaaaa", "10.0.0.1", None, False)
    assert a == caller_key("secret-token-aaaaaaaa", "10.0.0.9", "1.2.3.4", True)  # token wins
    assert "secret" not in a and a != caller_key("secret-token-bbbbbbbb", "10.0.0.1", None, False)
    assert caller_key(None, "10.0.0.1", None, False) == "addr:10.0.0.1"
    # X-Forwarded-For only when trusted, and its last entry: the one the proxy added.
    assert caller_key(None, "10.0.0.1", "6.6.6.6, 192.0.2.7", False) == "addr:10.0.0.1"
    assert caller_key(None, "10.0.0.1", "6.6.6.6, 192.0.2.7", True) == "addr:192.0.2.7"
    assert caller_key(None, "10.0.0.1", " , ", True) == "addr:10.0.0.1"
    assert caller_key(None, None, None, False) == "addr:unknown"


def test_busy_callers_get_connections_of_their_own_then_share_evenly():
    c = Callers(3)
    assert [c.acquire(k) for k in ("a", "b", "c")] == [0, 1, 2]
    assert c.acquire("a") == 0 and c.acquire("a") == 0  # same caller, same connection
    assert c.acquire("d") == 1  # all taken: the fewest callers, then the fewest requests
    assert c.callers == [1, 2, 1] and c.in_flight == [3, 2, 1]
    for _ in range(3):
        c.release("a")
    assert c.connection_of("a") is None and len(c) == 3  # forgotten with its last request
    assert c.acquire("e") == 0


def test_per_caller_cap_and_release_bookkeeping():
    c = Callers(2, max_inflight=2)
    assert c.acquire("a") == 0 and c.acquire("a") == 0
    assert c.acquire("a") is None  # at its cap: refused, nothing counted
    assert c.in_flight == [2, 0] and c.acquire("b") == 1
    c.release("a")
    assert c.acquire("a") == 0
    with pytest.raises(KeyError):
        c.release("nobody")
    unlimited = Callers(1)
    assert all(unlimited.acquire("a") == 0 for _ in range(10_000))


@pytest.mark.parametrize("k", [0, 65, -1])
def test_connections_out_of_range_are_refused(k):
    with pytest.raises(ValueError, match=r"router connections must be 1\.\.64"):
        Callers(k)
    with pytest.raises(ValueError, match=">= 0"):
        Callers(1, max_inflight=-1)


def test_cli_refuses_k_out_of_range_at_startup():
    from click.testing import CliRunner

    from workerpool.cli import main

    for command in (["gateway"], ["up", "--http", "127.0.0.1:1"]):
        r = CliRunner().invoke(main, [*command, "--router-connections", "0"])
        assert r.exit_code == 2
        assert "'--router-connections': 0 is not in the range 1<=x<=64" in r.output


# -- live: a flooding caller and a well-behaved one -------------------------------------------------
LIMIT = 8  # the router's max_client_inflight
FLOOD = 2 * LIMIT
SLEEP = 0.1
TOML = f"""
[router]
max_client_inflight = {LIMIT}

[[services]]
name = "default"
handler = "tests.handlers:HttpModel"
workers = 1
prefetch = 0
"""


@pytest.fixture(scope="module")
def pool():
    pytest.importorskip("httptools", reason="the gateway needs the http extra")
    procs = Processes()
    try:
        yield procs, procs.pool_from_config(TOML)
    finally:
        procs.cleanup()


def _gateway(procs: Processes, address: str, *args: str) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs.spawn(["gateway", "--router", address, "--listen", f"127.0.0.1:{port}", *args],
                address, "workerpool gateway ready")
    return f"http://127.0.0.1:{port}"


def _held(address: str) -> int:
    with Client(address) as c:
        s = next(s for s in c.status(timeout=5)["services"] if s["name"] == "default")
    return s["in_flight"] + s["queued"]


async def _wait_held(address: str, n: int) -> None:
    deadline = time.monotonic() + 15
    while _held(address) < n:
        assert time.monotonic() < deadline, f"the router never held {n} requests"
        await asyncio.sleep(0.02)


def _client(url: str, source: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=30,
                             transport=httpx.AsyncHTTPTransport(local_address=source))


async def _flood_and_one_call(url: str, address: str) -> tuple[list[httpx.Response], list]:
    """``FLOOD`` slow requests from 127.0.0.1, then, while they wait, two calls in a row
    from 127.0.0.2. Returns the flood's replies and the order in which everything
    finished: ("flood", status) or ("call", response), each call after a ("sent", None)."""
    done: list = []

    async def flood_one(h: httpx.AsyncClient, i: int) -> httpx.Response:
        r = await h.post("/v1/default/sleep", json={"seconds": SLEEP, "i": i})
        done.append(("flood", r.status_code))
        return r

    async with _client(url, "127.0.0.1") as flooder, _client(url, "127.0.0.2") as polite:
        tasks = [asyncio.ensure_future(flood_one(flooder, i)) for i in range(FLOOD)]
        await _wait_held(address, LIMIT)
        for _ in range(2):
            done.append(("sent", None))
            r = await polite.post("/v1/default/echo", json={"polite": True})
            done.append(("call", r))
        return await asyncio.gather(*tasks), done


def _floods_before(done: list, nth_call: int) -> int:
    """Flood requests served (not refused) that finished while the polite caller's
    ``nth_call`` waited."""
    sent = [i for i, (kind, _) in enumerate(done) if kind == "sent"][nth_call]
    end = next(i for i in range(sent, len(done)) if done[i][0] == "call")
    return sum(1 for kind, what in done[sent:end] if kind == "flood" and what == 200)


def test_a_flooding_caller_does_not_starve_a_well_behaved_one(pool):
    procs, pool_proc = pool
    url = _gateway(procs, pool_proc.address, "--router-connections", "4")
    replies, done = asyncio.run(_flood_and_one_call(url, pool_proc.address))
    codes = sorted(r.status_code for r in replies)
    # The flooder meets the router's limit on its own connection ...
    assert set(codes) == {200, 503} and codes.count(200) >= LIMIT, codes
    assert all(r.json()["error"]["code"] == "client-limit"
               for r in replies if r.status_code == 503)
    # ... and the polite caller is never refused, and waits about one request per other
    # caller, not behind the flood's LIMIT - 1 queued: the one running, at most one the
    # flooder's turn takes, and one whose reply was on its way when the call was sent.
    calls = [r for kind, r in done if kind == "call"]
    assert [r.status_code for r in calls] == [200, 200], [r.text for r in calls]
    waited = [_floods_before(done, 0), _floods_before(done, 1)]
    assert max(waited) <= 3, (waited, done)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'workerpool_gateway_router_connection_in_flight{connection="3"} 0.0' in metrics


def test_with_one_connection_the_flood_locks_the_other_caller_out(pool):
    """The defect the spread removes: one connection, one share for every caller."""
    procs, pool_proc = pool
    url = _gateway(procs, pool_proc.address, "--router-connections", "1")
    _, done = asyncio.run(_flood_and_one_call(url, pool_proc.address))
    first = next(r for kind, r in done if kind == "call")
    assert first.status_code == 503 and first.json()["error"]["code"] == "client-limit"


def test_per_caller_cap_is_429_by_forwarded_address(pool):
    procs, pool_proc = pool
    url = _gateway(procs, pool_proc.address, "--trust-forwarded",
                   "--max-inflight-per-caller", "2")
    one = {"x-forwarded-for": "198.51.100.1, 10.0.0.1"}

    async def run() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as h:
            held = [asyncio.ensure_future(h.post("/v1/default/sleep", json={"seconds": 0.5},
                                                 headers=one)) for _ in range(2)]
            await _wait_held(pool_proc.address, 2)
            over = await h.post("/v1/default/echo", json=1, headers=one)
            other = await h.post("/v1/default/echo", json=2,
                                 headers={"x-forwarded-for": "198.51.100.1, 10.0.0.2"})
            return await asyncio.gather(*held), over, other

    held, over, other = asyncio.run(run())
    assert [r.status_code for r in held] == [200, 200]
    assert over.status_code == 429 and over.headers["retry-after"] == "1"
    err = over.json()["error"]
    assert (err["type"], err["code"], err["retryable"]) == ("TooManyRequests",
                                                            "caller-limit", True)
    assert other.status_code == 200 and other.json() == 2  # another caller is not capped
    r = httpx.post(f"{url}/v1/default/echo", json=3, headers=one, timeout=10)
    assert r.status_code == 200  # its requests answered: below its cap again
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "workerpool_gateway_caller_limited_total 1.0" in metrics
