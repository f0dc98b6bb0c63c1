"""`workerpool up --http`: the pool starts its HTTP gateway, starts it again when it dies,
and stops it when the pool stops."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import httpx
import pytest

from workerpool._proc import process_alive

pytest.importorskip("httptools", reason="the gateway needs the http extra")


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


def _call_until_ok(url: str, timeout: float = 30.0,
                   headers: dict | None = None) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.post(f"{url}/v1/default/echo", json={"x": 1}, timeout=5, headers=headers)
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


def test_up_runs_the_gateway_its_config_describes(procs, tmp_path):
    """No --http: the config's [gateway] section says where, and with which tokens and
    per-caller limit; the gateway `up` runs honours them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "up-" + "b" * 32
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token}\n")
    pool = procs.pool_from_config(
        '[[services]]\nhandler = "workerpool.handlers:Echo"\nworkers = 2\n'
        f'[gateway]\nlisten = "127.0.0.1:{port}"\ntokens = "{tokens}"\n'
        "max_inflight_per_caller = 1\n")
    url = f"http://127.0.0.1:{port}"
    auth = {"authorization": f"Bearer {token}"}
    assert _call_until_ok(url, headers=auth).json() == {"x": 1}
    assert httpx.post(f"{url}/v1/default/echo", json=1, timeout=5).status_code == 401
    with httpx.Client(base_url=url, headers=auth, timeout=30) as h:
        answers: list[httpx.Response] = []
        slow = threading.Thread(target=lambda: answers.append(
            h.post("/v1/default/sleep", json={"seconds": 2.0})))
        slow.start()
        try:
            pool.wait_for(lambda s: s["services"][0]["in_flight"] == 1, what="the slow call")
            r = h.post("/v1/default/echo", json=2)
            assert r.status_code == 429 and r.json()["error"]["code"] == "caller-limit"
        finally:
            slow.join()
        assert answers[0].status_code == 200
        assert h.post("/v1/default/echo", json=3).json() == 3


@pytest.mark.parametrize(("section", "says"), [
    ('tls_cert = "c.pem"\n', "tls_cert and tls_key go together"),
    ("router_connections = 0\n", "gateway.router_connections"),
    ('listen = "0.0.0.0:8000"\n', "without --tokens"),
    ('tokens = "/nonexistent/tokens"\n', "tokens"),
])
def test_a_bad_gateway_section_stops_up_and_gateway_before_anything_starts(
        tmp_path, section, says):
    from click.testing import CliRunner

    from workerpool.cli import main

    cfg = tmp_path / "pool.toml"
    cfg.write_text("[gateway]\n" + section)
    for argv in (["up", "--config", str(cfg), "--http", "127.0.0.1:1"],
                 ["gateway", "--config", str(cfg)]):
        if "listen" in section and argv[0] == "up":
            argv = argv[:3]  # the section's own listen address
        out = CliRunner().invoke(main, argv)
        assert out.exit_code == 2, (argv, out.output)
        assert says in out.output, (argv, out.output)


def test_up_hands_its_gateway_the_config_and_insecure():
    """`up --http` on a non-loopback address with --insecure: the gateway it starts gets
    --insecure too (it refuses to start without it), and the config file for the rest."""
    from workerpool.children import gateway_argv

    argv = gateway_argv("ipc:///f", "0.0.0.0:8000", None, None, "/etc/pool.toml",
                        insecure=True)
    assert argv[-4:] == ["0.0.0.0:8000", "--config", "/etc/pool.toml", "--insecure"]
    assert "--router-connections" not in argv  # the config's, or the gateway's default
