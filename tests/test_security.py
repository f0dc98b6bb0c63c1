"""CURVE on a live pool: roles, strangers on both sockets, revocation, `--insecure`, the CLI.

A stranger's failed handshake is awaited on its socket monitor (an event, not a sleep):
after it, nothing the stranger sent can still reach the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from ipc import curve, protocol
from ipc.protocol import Kind
from tests.conftest import ROOT, Processes, _env
from workerpool import Client
from workerpool.errors import PermissionDeniedError, ServiceUnavailableError

pytestmark = pytest.mark.timeout(120)

REFUSED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)


class KeyedPool:
    """One `workerpool up --keys` for the module: 2 Faulty workers, a TCP-free backend."""

    def __init__(self) -> None:
        self.procs = Processes()
        self.keys = self.procs.dir / "keys"
        curve.init_keys(self.keys)
        self.backend = self.procs.ipc("back")
        self.proc = self.procs.spawn(
            ["up", "--frontend", self.procs.ipc("front"), "--backend", self.backend,
             "--handler", "workerpool.handlers:Faulty", "--workers", "2",
             "--keys", str(self.keys)], self.procs.ipc("front"), "workerpool ready")
        self.address = self.proc.address

    def client(self, role: str = "client", **kw) -> Client:
        return Client(self.address, keys=str(self.keys), role=role, **kw)

    def status(self) -> dict:
        with self.client() as c:
            return c.status(timeout=10)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "workerpool.cli", *args], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def keyed():
    pool = KeyedPool()
    try:
        yield pool
    finally:
        pool.procs.cleanup()


def _stranger(ctx: zmq.Context, address: str, creds: curve.PeerKeys | None):
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    curve.secure_client(sock, creds)
    monitor = sock.get_monitor_socket(REFUSED)
    sock.connect(address)
    return sock, monitor


def _refused(monitor: zmq.Socket) -> None:
    """Block until the monitor reports the handshake failed (or the link dropped)."""
    assert monitor.poll(30_000), "no handshake failure reported"


def _other_keys(tmp_path):
    """A keys directory the router has never seen."""
    curve.init_keys(tmp_path / "other")
    return tmp_path / "other"


# -- roles -------------------------------------------------------------------------------------
def test_a_client_key_serves_requests_but_not_admin(keyed):
    with keyed.client() as c:
        assert c.call("echo", {"x": 1}, timeout=10) == {"x": 1}
        assert c.status(timeout=10)["router"]["supervisors"] == 1
        fut = c.submit("sleep", {"seconds": 30}, timeout=60)
        assert fut.cancel()
        with pytest.raises(PermissionDeniedError, match="admin key") as exc:
            c.scale("default", 3, timeout=10)
        assert exc.value.code == "role"
        assert c.call("echo", 2, timeout=10) == 2  # refused, not cut off


def test_an_admin_key_may_send_admin(keyed):
    with keyed.client("admin") as c:
        out = c.scale("default", 2, timeout=10)
    assert out["workers"] == 2


def test_the_cli_with_keys(keyed):
    keys = str(keyed.keys)
    ok = keyed.cli("call", "echo", '{"a": 1}', "--router", keyed.address, "--keys", keys)
    assert ok.returncode == 0 and '"a": 1' in ok.stdout, ok.stderr
    st = keyed.cli("status", "--router", keyed.address, "--keys", keys)
    assert st.returncode == 0 and "service default" in st.stdout, st.stderr
    sc = keyed.cli("scale", "default", "2", "--router", keyed.address, "--keys", keys)
    assert sc.returncode == 0, sc.stderr
    denied = keyed.cli("scale", "default", "3", "--router", keyed.address,
                       "--key", f"{keys}/clients/client.key_secret",
                       "--router-key", f"{keys}/router.key")
    assert denied.returncode != 0 and "PermissionDeniedError" in denied.stderr
    load = keyed.cli("loadtest", "--router", keyed.address, "--keys", keys, "--requests", "20",
                     "--concurrency", "2", "--json", "--no-progress")
    assert load.returncode == 0, load.stderr
    assert json.loads(load.stdout)["requests"]["ok"] == 20


# -- strangers -------------------------------------------------------------------------------
def test_strangers_on_the_frontend_get_nothing_and_cause_nothing(keyed, tmp_path):
    before = keyed.status()
    other = _other_keys(tmp_path)
    # A request that would kill a worker, from an unknown key and from no key at all.
    frames = protocol.encode(Kind.REQUEST, 1, {"method": "exit"}, msgpack.packb(None))
    ctx = zmq.Context()
    try:
        strangers = [_stranger(ctx, keyed.address, curve.peer_keys(keys=other)),
                     _stranger(ctx, keyed.address, None),
                     _stranger(ctx, keyed.address, curve.peer_keys(keys=keyed.keys,
                                                                   role="worker"))]
        scale = protocol.encode(Kind.ADMIN, 2, {"op": "scale", "service": "default",
                                                "workers": 0})
        for sock, _ in strangers:
            for message in (frames, scale):
                # Not blocking: once its handshake is refused, a DEALER has no peer and a
                # blocking send would wait for one forever. Sent or not, nothing may come
                # of it.
                with contextlib.suppress(zmq.Again):
                    sock.send_multipart(message, zmq.NOBLOCK)
        for _, monitor in strangers:
            _refused(monitor)
        after = keyed.status()
        for sock, monitor in strangers:
            assert not sock.poll(0)
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
    finally:
        ctx.destroy(linger=0)  # a failure above must not leave term() waiting on a socket
    assert [w["restarts"] for w in after["workers"]] == [w["restarts"] for w in before["workers"]]
    assert len(after["workers"]) == len(before["workers"])
    counters = after["router"]["counters"]
    assert counters.get("permission_denied", 0) == before["router"]["counters"].get(
        "permission_denied", 0)
    # The Python client says so at once instead of waiting for its timeout.
    with Client(keyed.address, keys=str(other)) as c, \
            pytest.raises(PermissionDeniedError, match="refused this client's"):
        c.call("echo", 1, timeout=60)


def test_strangers_on_the_backend_register_nothing_and_get_no_request(keyed, tmp_path):
    other = _other_keys(tmp_path)
    ready = protocol.encode(Kind.READY, 0, {"slot": "default/9", "incarnation": 2**62,
                                            "service": "default", "capacity": 100,
                                            "pid": 1, "methods": ["echo"]})
    ctx = zmq.Context()
    try:
        strangers = [_stranger(ctx, keyed.backend, curve.peer_keys(keys=other, role="worker")),
                     _stranger(ctx, keyed.backend, None),
                     _stranger(ctx, keyed.backend, curve.peer_keys(keys=keyed.keys,
                                                                   role="client"))]
        for sock, _ in strangers:
            sock.send_multipart(ready)
            sock.send_multipart(protocol.encode(Kind.DRAIN, 0, {}))
        for _, monitor in strangers:
            _refused(monitor)
        with keyed.client() as c:
            assert [c.call("echo", i, timeout=10) for i in range(20)] == list(range(20))
        st = keyed.status()
        for sock, monitor in strangers:
            assert not sock.poll(0)
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
    finally:
        ctx.term()
    assert "default/9" not in {w["id"] for w in st["workers"]}
    assert not st["router"]["draining"]


# -- revocation --------------------------------------------------------------------------------
def _until(predicate, what: str, limit: float = 60.0) -> float:
    """Seconds until ``predicate()`` holds (pytest's timeout ends a hang)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < limit, f"not within {limit}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def _serves(c: Client) -> bool:
    try:
        return c.call("echo", 1, timeout=10) == 1
    except PermissionDeniedError:
        return False


def _refuses(c: Client) -> bool:
    try:
        c.call("echo", 1, timeout=10)
    except PermissionDeniedError as exc:
        assert exc.code == "revoked"
        return True
    return False


@pytest.mark.parametrize("sighup", [True, False], ids=["sighup", "within-10s"])
def test_adding_and_revoking_a_key(keyed, sighup):
    name = "carol" if sighup else "dave"
    secret = curve.add_key(keyed.keys, "client", name)[1]

    def nudge() -> None:
        if sighup:
            os.kill(keyed.proc.popen.pid, signal.SIGHUP)  # `up` passes it to its router

    def client() -> Client:
        return Client(keyed.address, key=str(secret), router_key=str(keyed.keys / "router.key"))

    def accepted() -> bool:
        with client() as c:  # a new connection each try: a handshake made before the reload
            return _serves(c)  # is refused, and its client says so at once

    nudge()
    _until(accepted, "the new key accepted")
    with client() as c:
        assert _serves(c)
        os.remove(keyed.keys / "clients" / f"{name}.key")
        revoked_at = time.monotonic()
        nudge()
        # The connection is up: its next messages are refused, not left unanswered.
        _until(lambda: _refuses(c), "the revoked key refused")
        if not sighup:
            assert time.monotonic() - revoked_at < 10.0
    with client() as c, pytest.raises(PermissionDeniedError):
        c.call("echo", 1, timeout=60)  # a new connection fails its handshake


# -- who may bind where ------------------------------------------------------------------------
def test_a_non_loopback_bind_needs_keys_or_insecure(procs):
    port_f, port_b = (procs.tcp().rsplit(":", 1)[1] for _ in range(2))
    args = ["router", "--frontend", f"tcp://0.0.0.0:{port_f}",
            "--backend", f"tcp://127.0.0.1:{port_b}"]
    refused = subprocess.run([sys.executable, "-m", "workerpool.cli", *args], cwd=ROOT,
                             env=_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "--insecure" in refused.stderr and "tcp://0.0.0.0" in refused.stderr
    procs.spawn([*args, "--insecure"], f"tcp://127.0.0.1:{port_f}", None)
    with Client(f"tcp://127.0.0.1:{port_f}") as c:
        assert c.status(timeout=30)["router"]["pid"]


def test_the_async_client_with_keys(keyed, tmp_path):
    from workerpool import AsyncClient

    other = _other_keys(tmp_path)

    async def run() -> None:
        async with AsyncClient(keyed.address, keys=str(keyed.keys)) as c:
            assert await c.call("echo", [1, 2], timeout=10) == [1, 2]
            with pytest.raises(PermissionDeniedError):
                await c.scale("default", 3, timeout=10)
        async with AsyncClient(keyed.address, keys=str(keyed.keys), role="admin") as c:
            assert (await c.scale("default", 2, timeout=10))["workers"] == 2
        async with AsyncClient(keyed.address, keys=str(other)) as c:
            with pytest.raises(PermissionDeniedError):
                await c.call("echo", 1, timeout=60)

    asyncio.run(run())


def test_a_remote_worker_host_with_its_own_key(procs):
    """`workerpool router --keys` over TCP, and `workerpool worker` with a pair of its own."""
    keys = procs.dir / "keys"
    curve.init_keys(keys)
    _, secret = curve.add_key(keys, "worker", "gpu-a")
    front, back = procs.tcp(), procs.tcp()
    router = procs.spawn(["router", "--frontend", front, "--backend", back, "--keys", str(keys)],
                         front, None)
    node = procs.node(router, back, "gpu-a", "--handler", "workerpool.handlers:Echo",
                      "--workers", "1", "--key", str(secret),
                      "--router-key", str(keys / "router.key"))
    with Client(front, keys=str(keys)) as c:
        assert c.call("echo", "over tcp", timeout=30) == "over tcp"
        st = c.status(timeout=10)
    assert [w["id"] for w in st["workers"]] == ["default/gpu-a/0"]
    # Its key revoked: nothing it sends counts any more, so it and its workers are lost,
    # and no request goes to it again.
    os.remove(keys / "workers" / "gpu-a.key")
    router.popen.send_signal(signal.SIGHUP)
    with Client(front, keys=str(keys)) as c:
        _until(lambda: c.status(timeout=10)["workers"][0]["state"] in ("dead", "failed"),
               "the revoked host's worker lost")
        with pytest.raises(ServiceUnavailableError):
            c.call("echo", 1, timeout=30)
    # Nothing it sends counts, its DRAIN included: stopped gracefully, it would wait out
    # its drain timeout (15 s of this test's teardown) for a DRAINED that cannot come.
    os.killpg(node.pgid, signal.SIGKILL)


def test_keys_from_the_config_file(procs):
    keys = procs.dir / "keys"
    curve.init_keys(keys)
    pool = procs.pool_from_config(f'[security]\nkeys = "{keys}"\n\n[[services]]\n'
                                  'name = "default"\nhandler = "workerpool.handlers:Echo"\n'
                                  'workers = 1\n')
    with Client(pool.address, keys=str(keys)) as c:
        assert c.call("echo", "from the file", timeout=30) == "from the file"
    with Client(pool.address, keys=str(_other_keys(procs.dir))) as c, \
            pytest.raises(PermissionDeniedError):
        c.call("echo", 1, timeout=60)
