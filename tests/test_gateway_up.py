"""`workerpool up --http`: the pool starts its HTTP gateway, starts it again when it dies,
and stops it when the pool stops."""

from __future__ import annotations

import os
import signal
import socket
import time

import httpx
import pytest

from workerpool._proc import process_alive

pytest.importorskip("uvicorn", reason="the gateway needs the http extra")


def _gateway_pid(up_pid: int) -> int | None:
    with open(f"/proc/{up_pid}/task/{up_pid}/children") as f:
        for pid in f.read().split():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as c:
                    if b"gateway" in c.read().split(b"\0"):
                        return int(pid)
            except OSError:
                continue
    return None


def _call_until_ok(url: str, timeout: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.post(f"{url}/v1/default/echo", json={"x": 1}, timeout=5)
            if r.status_code == 200:
                return r
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway at {url} did not answer 200 within {timeout}s")
        time.sleep(0.05)


def test_up_http_starts_restarts_and_stops_the_gateway(procs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    pool = procs.pool("--http", f"127.0.0.1:{port}", workers=1,
                      handler="workerpool.handlers:Echo")
    assert _call_until_ok(url).json() == {"x": 1}
    assert httpx.get(f"{url}/health/ready", timeout=5).json()["ready"] is True
    first = _gateway_pid(pool.popen.pid)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert _call_until_ok(url).json() == {"x": 1}  # a new gateway at the same address
    second = _gateway_pid(pool.popen.pid)
    assert second not in (None, first)
    assert pool.stop(signal.SIGTERM) == 0
    assert not process_alive(second)


def test_up_http_refuses_a_taken_port_before_starting_anything(procs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        pool = procs.pool("--http", f"127.0.0.1:{port}", workers=1, wait=False)
        assert pool.popen.wait(30) == 1
    assert "cannot serve HTTP" in pool.log.read_text()


def test_up_http_with_keys_gives_the_gateway_the_client_pair(procs):
    """With CURVE keys the gateway is an ordinary client with its own key: calls work, and
    a client key cannot send ADMIN, which no HTTP route asks for anyway."""
    from ipc import curve

    keys = procs.dir / "keys"
    curve.init_keys(keys)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs.pool("--http", f"127.0.0.1:{port}", "--keys", str(keys), workers=1,
               handler="workerpool.handlers:Echo")
    assert _call_until_ok(f"http://127.0.0.1:{port}").json() == {"x": 1}
