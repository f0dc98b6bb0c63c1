"""Roles and keys without a live router: the core's role rules through the harness, the key
store and the key layout on plain files, the exposure check on plain strings."""

from __future__ import annotations

import os
import stat

import msgpack
import pytest

from ipc import curve, protocol, transport
from ipc.curve import Role
from ipc.lifecycle import AdminOp
from ipc.protocol import Kind
from tests.router_harness import Harness
from workerpool.config import PoolConfig, SecurityConfig
from workerpool.errors import PermissionDeniedError, from_wire

C = b"client-1"


def _send(h: Harness, role: Role | None, kind: Kind, req_id: int, meta: dict | None = None,
          body: bytes = b"") -> None:
    h.core.on_frontend([C, *protocol.encode(kind, req_id, meta, body)], role)


def _request(h: Harness, role: Role | None, req_id: int) -> None:
    _send(h, role, Kind.REQUEST, req_id, {"method": "echo"}, msgpack.packb(req_id))


# -- the core's role rules ------------------------------------------------------------------
def test_a_client_key_may_request_cancel_ping_and_ask_status_but_not_admin():
    h = Harness()
    h.hello(workers=1)
    w = h.ready("default/0")
    _request(h, Role.CLIENT, 1)
    [rid] = h.dispatched_to(w)
    _send(h, Role.CLIENT, Kind.STATUS, 2)
    _send(h, Role.CLIENT, Kind.HEARTBEAT, 0, {"held": [1]})
    _send(h, Role.CLIENT, Kind.ADMIN, 3, {"op": AdminOp.DRAIN, "worker": "default/0"})
    _send(h, Role.CLIENT, Kind.CANCEL, 1)
    kinds = {s.req_id: s.kind for s in h.out.to(C)}
    assert kinds[2] is Kind.RESULT and kinds[0] is Kind.HEARTBEAT
    [err] = h.out.errors_to(C)
    assert type(err) is PermissionDeniedError and err.code == "role"
    assert h.core.registry.slots["default/0"].state.value != "draining"
    assert [s.req_id for s in h.out.to(w) if s.kind is Kind.CANCEL] == [rid]
    assert h.core.stats["permission_denied"] == 1


def test_an_admin_key_may_send_admin():
    h = Harness()
    h.hello(workers=1)
    h.ready("default/0")
    _send(h, Role.ADMIN, Kind.ADMIN, 3, {"op": AdminOp.DRAIN, "worker": "default/0"})
    assert not h.out.errors_to(C)
    assert h.core.registry.slots["default/0"].state.value == "draining"


def test_a_revoked_or_worker_key_on_the_frontend_is_refused_whatever_it_sends():
    h = Harness()
    h.hello(workers=1)
    w = h.ready("default/0")
    for role in (None, Role.WORKER):
        _request(h, role, 1)
        _send(h, role, Kind.STATUS, 2)
        _send(h, role, Kind.CANCEL, 1)  # never answered
        h.core.on_frontend([C, b"garbage"], role)  # refused unread, under id 0
    errors = h.out.errors_to(C)
    assert all(type(e) is PermissionDeniedError for e in errors) and len(errors) == 6
    assert [e.code for e in errors] == ["revoked"] * 3 + ["role"] * 3
    assert not h.dispatched_to(w) and not h.core.requests.records


def test_a_backend_message_without_a_worker_key_is_dropped_and_its_worker_lost():
    h = Harness()
    h.hello(workers=2)
    w = h.ready("default/0")
    h.ready("default/1")
    h.request(C, 1)
    [rid] = h.dispatched_to(w) or [None]
    assert rid is not None
    h.out.take()
    # Its key revoked: the reply it sends now is not taken, and it is lost at once.
    h.core.on_backend([w, *protocol.encode(Kind.RESULT, rid, None, msgpack.packb("x"))], None)
    assert w not in h.core.registry.conns
    assert h.core.registry.slots["default/0"].state.value == "dead"
    assert h.core.stats["backend_unauthorized"] == 1
    # Not idempotent and running: answered, never with the reply it sent after the revocation.
    [err] = h.out.errors_to(C)
    assert err.type == "WorkerCrashedError" and "lost its key" in err.message
    # A client key, or no known key, registers nothing.
    for role in (Role.CLIENT, Role.ADMIN, None):
        h.core.on_backend([b"rogue#1", *protocol.encode(Kind.READY, 0, {
            "slot": "default/9", "incarnation": 1, "service": "default", "capacity": 1,
            "pid": 1, "methods": ["echo"]})], role)
    assert b"rogue#1" not in h.core.registry.conns and "default/9" not in h.core.registry.slots


def test_permission_denied_crosses_the_wire_as_itself():
    err = from_wire(PermissionDeniedError("no", code="role").to_wire())
    assert type(err) is PermissionDeniedError and err.code == "role"


# -- keys on disk -----------------------------------------------------------------------------
def test_init_writes_the_layout_in_zeromq_format_with_private_secrets(tmp_path):
    d = tmp_path / "keys"
    written = curve.init_keys(d)
    names = sorted(str(p.relative_to(d)) for p in written)
    assert names == sorted(["router.key", "router.key_secret",
                            "clients/client.key", "clients/client.key_secret",
                            "admins/admin.key", "admins/admin.key_secret",
                            "workers/worker.key", "workers/worker.key_secret"])
    for p in written:
        mode = stat.S_IMODE(os.stat(p).st_mode)
        assert mode == (0o600 if p.name.endswith("_secret") else 0o644), p
    public, secret = curve.load_secret(d / "clients" / "client.key_secret")
    assert len(public) == 40 and len(secret) == 40
    assert curve.load_public(d / "clients" / "client.key") == public
    assert b"curve" in (d / "router.key").read_bytes()  # ZeroMQ's certificate sections
    with pytest.raises(curve.KeyFileError, match="exists"):
        curve.init_keys(d)


def test_add_puts_a_pair_in_the_role_folder_and_refuses_bad_roles_and_names(tmp_path):
    curve.init_keys(tmp_path)
    public, secret = curve.add_key(tmp_path, "admin", "alice")
    assert public == tmp_path / "admins" / "alice.key" and secret.exists()
    with pytest.raises(curve.KeyFileError, match="role"):
        curve.add_key(tmp_path, "root", "bob")
    with pytest.raises(curve.KeyFileError, match="key name"):
        curve.add_key(tmp_path, "client", "../bob")
    with pytest.raises(curve.KeyFileError, match="keys init"):
        curve.add_key(tmp_path / "nowhere", "client", "bob")


def test_the_store_maps_keys_to_roles_and_notices_removal_and_moves(tmp_path):
    curve.init_keys(tmp_path)
    store = curve.KeyStore(tmp_path)
    key = {r: curve.load_public(tmp_path / curve.ROLE_DIRS[r] / f"{r.value}.key") for r in Role}
    assert {r: store.role(k) for r, k in key.items()} == {r: r for r in Role}
    assert store.allows(curve.FRONTEND_DOMAIN, key[Role.CLIENT])
    assert store.allows(curve.FRONTEND_DOMAIN, key[Role.ADMIN])
    assert not store.allows(curve.FRONTEND_DOMAIN, key[Role.WORKER])
    assert store.allows(curve.BACKEND_DOMAIN, key[Role.WORKER])
    assert not store.allows(curve.BACKEND_DOMAIN, key[Role.CLIENT])
    assert store.role(b"x" * 40) is None and store.role(None) is None
    assert not store.changed()
    os.remove(tmp_path / "clients" / "client.key")
    os.rename(tmp_path / "admins" / "admin.key", tmp_path / "clients" / "admin.key")
    assert store.changed() and store.reload()
    assert store.role(key[Role.CLIENT]) is None
    assert store.role(key[Role.ADMIN]) is Role.CLIENT
    (tmp_path / "workers" / "broken.key").write_text("not a certificate")
    assert store.changed()
    assert not store.reload()  # a bad file is skipped, the others stay
    assert store.role(key[Role.WORKER]) is Role.WORKER


def test_the_key_watch_reads_the_store_again_on_its_own_thread(tmp_path):
    """A key added is allowed, and one removed refused, within the watch's interval, with
    no call from the router's loop; ``now()`` reads at once (SIGHUP), however long the
    interval; ``stop()`` ends the thread."""
    import threading
    import time

    curve.init_keys(tmp_path)
    store = curve.KeyStore(tmp_path)
    watch = curve.KeyWatch(store, interval=0.05)
    watch.start()

    def eventually(predicate) -> None:
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    try:
        public, _ = curve.add_key(tmp_path, "client", "late")
        new = curve.load_public(public)
        eventually(lambda: store.role(new) is Role.CLIENT)
        os.remove(public)
        eventually(lambda: store.role(new) is None)
    finally:
        watch.stop()
    assert not watch.is_alive()

    slow = curve.KeyWatch(store, interval=3600)
    slow.start()
    try:
        public, _ = curve.add_key(tmp_path, "admin", "asked")
        asked = curve.load_public(public)
        assert store.role(asked) is None
        slow.now()
        eventually(lambda: store.role(asked) is Role.ADMIN)
    finally:
        slow.stop()
    assert "workerpool-keys" not in [t.name for t in threading.enumerate()]


def test_a_peer_finds_its_files_from_a_directory_or_two_paths(tmp_path):
    curve.init_keys(tmp_path)
    own, router = curve.peer_files(keys=tmp_path, role="admin")
    assert own == tmp_path / "admins" / "admin.key_secret" and router == tmp_path / "router.key"
    assert curve.peer_files() is None
    with pytest.raises(curve.KeyFileError, match="go together"):
        curve.peer_files(key=own)
    with pytest.raises(curve.KeyFileError, match="holds no secret"):
        curve.peer_keys(key=router, router_key=router)
    creds = curve.peer_keys(key=own, router_key=router)
    assert creds.server == curve.load_public(router)


def test_security_section_of_the_config(tmp_path):
    cfg = tmp_path / "pool.toml"
    cfg.write_text(f'[security]\nkeys = "{tmp_path}"\n')
    sec = PoolConfig.load(cfg).security
    assert sec.peer_files("worker")[0] == tmp_path / "workers" / "worker.key_secret"
    assert SecurityConfig().peer_files("client") is None
    with pytest.raises(ValueError, match="go together"):
        SecurityConfig(key="a")


# -- who can reach the router ------------------------------------------------------------------
@pytest.mark.parametrize("endpoint,local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:5555", True), ("tcp://[::1]:5", True),
    ("ipc:///tmp/x", True), ("inproc://x", True), ("tcp://0.0.0.0:5555", False),
    ("tcp://*:5555", False), ("tcp://10.1.2.3:5555", False), ("tcp://eth0:5555", False),
    ("tcp://example.com:5", False)])
def test_loopback_endpoints(endpoint, local):
    assert transport.is_loopback(endpoint) is local


def test_exposed_binds_need_keys_or_insecure():
    curve.check_exposure(["tcp://127.0.0.1:1", "ipc:///x"], keys=False, insecure=False)
    curve.check_exposure(["tcp://0.0.0.0:1"], keys=True, insecure=False)
    curve.check_exposure(["tcp://0.0.0.0:1"], keys=False, insecure=True)
    with pytest.raises(curve.KeyFileError, match="--insecure") as exc:
        curve.check_exposure(["tcp://127.0.0.1:1", "tcp://*:2"], keys=False, insecure=False)
    assert "tcp://*:2" in str(exc.value) and "127.0.0.1" not in str(exc.value)


def test_the_handshake_watch_fails_requests_until_a_handshake_succeeds():
    import zmq

    from workerpool.client._base import HandshakeWatch

    w = HandshakeWatch("ipc:///x")
    # Before any success a failure without detail is a refusal: ipc:// rarely says more.
    err = w.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    assert type(err) is PermissionDeniedError and err.code == "handshake" and w.refused is err
    assert w.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED) is None and w.refused is None
    # After one, it is more likely a router going away mid-handshake: not a refusal.
    assert w.on_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL) is None and w.refused is None
    err = w.on_event(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    assert "refused this client's key" in err.message and w.refused is err
