"""CurveZMQ keys, roles, and the ZAP side of both router sockets.

::

    DIR/router.key, router.key_secret      the router's pair (its public key goes to peers)
    DIR/clients/NAME.key(_secret)          may send requests, cancels, status, heartbeats
    DIR/admins/NAME.key(_secret)           a client that may also send ADMIN
    DIR/workers/NAME.key(_secret)          the only keys the backend accepts

    peer DEALER --CURVE handshake--> router ROUTER --ZAP request--> Authenticator thread
                                                                     KeyStore.allows(domain, key)
    each message's User-Id (the z85 key) --KeyStore.role--> Role --> RouterCore

Files are ZeroMQ's certificate format (``zmq.auth.create_certificates``). The router keeps
only public keys of its peers; a peer keeps its own secret and the router's public key.
The ``KeyStore`` maps each allowed public key to its role, is read again when its folders
change (``changed`` is a cheap stat), and is shared by the loop (role of each message) and
the ZAP thread (who may complete a handshake): a reload swaps one dict, so neither ever
waits for the other.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.certs import create_certificates, load_certificate

from ipc import transport


class Role(enum.Enum):
    """What a key may do; a key's role is the folder its public key is in."""

    CLIENT = "client"  # requests, cancels, status, heartbeats on the frontend
    ADMIN = "admin"  # a client that may also send ADMIN
    WORKER = "worker"  # workers and supervisors: the only role the backend accepts


#: The folder of each role under a keys directory, and the pair ``init`` makes in it.
ROLE_DIRS = {Role.CLIENT: "clients", Role.ADMIN: "admins", Role.WORKER: "workers"}
DEFAULT_NAMES = {Role.CLIENT: "client", Role.ADMIN: "admin", Role.WORKER: "worker"}
ROUTER_NAME = "router"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"

#: ZAP domains: one per router socket, each with the roles that may complete a handshake.
FRONTEND_DOMAIN = "workerpool-frontend"
BACKEND_DOMAIN = "workerpool-backend"
DOMAIN_ROLES = {FRONTEND_DOMAIN: frozenset({Role.CLIENT, Role.ADMIN}),
                BACKEND_DOMAIN: frozenset({Role.WORKER})}

log = logging.getLogger("workerpool.keys")

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class KeyFileError(ValueError):
    """A key file or folder that cannot be used (missing, malformed, wrong kind)."""


def _role(value: str | Role) -> Role:
    if isinstance(value, Role):
        return value
    try:
        return Role(value)
    except ValueError:
        raise KeyFileError(f"role {value!r} is not one of: "
                        f"{', '.join(r.value for r in Role)}") from None


def _make_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """A new pair ``folder/name.key`` and ``.key_secret`` (0600); refuses to overwrite."""
    if not _NAME.match(name) or name.startswith("."):
        raise KeyFileError(f"key name {name!r}: use 1-64 of letters, digits, '_', '.', '-'")
    public, secret = folder / (name + PUBLIC_SUFFIX), folder / (name + SECRET_SUFFIX)
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(f"{path} exists; remove it first to make a new pair")
    folder.mkdir(parents=True, exist_ok=True)
    # The secret file is created 0600 before anything is written to it.
    old = os.umask(0o077)
    try:
        create_certificates(folder, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def init_keys(directory: str | os.PathLike) -> list[Path]:
    """``workerpool keys init DIR``: the router's pair and one pair per role. Returns the
    files written. Refuses a directory that already holds a router pair."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    written = list(_make_pair(root, ROUTER_NAME))
    for role in Role:
        written += _make_pair(root / ROLE_DIRS[role], DEFAULT_NAMES[role])
    return written


def add_key(directory: str | os.PathLike, role: str | Role, name: str) -> tuple[Path, Path]:
    """``workerpool keys add DIR ROLE NAME``: a new pair in ROLE's folder."""
    root = Path(directory)
    if not (root / (ROUTER_NAME + PUBLIC_SUFFIX)).exists():
        raise KeyFileError(f"{root} is not a keys directory (no {ROUTER_NAME}{PUBLIC_SUFFIX}); "
                        f"make one with `workerpool keys init {root}`")
    return _make_pair(root / ROLE_DIRS[_role(role)], name)


def load_public(path: str | os.PathLike) -> bytes:
    """The z85 public key of a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read a public key from {path}: {exc}") from None
    return public


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys of a ``.key_secret`` file."""
    try:
        public, secret = load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read a key pair from {path}: {exc}") from None
    if not secret:
        raise KeyFileError(f"{path} holds no secret key: pass the .key_secret file, not the .key")
    return public, secret


# -- peers: which files to use ---------------------------------------------------------------
@dataclass(frozen=True)
class PeerKeys:
    """A connecting peer's CURVE credentials: its own pair and the router's public key."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def from_files(cls, key: str | os.PathLike, router_key: str | os.PathLike) -> PeerKeys:
        public, secret = load_secret(key)
        return cls(public, secret, load_public(router_key))


def peer_files(*, key: str | os.PathLike | None = None,
               router_key: str | os.PathLike | None = None,
               keys: str | os.PathLike | None = None,
               role: str | Role = Role.CLIENT) -> tuple[Path, Path] | None:
    """The (own secret, router public) files a peer uses: ``key`` and ``router_key``, or
    from ``keys`` (a directory ``init`` made) the pair of ``role``. None: no keys given."""
    if keys is not None:
        if key is not None or router_key is not None:
            raise KeyFileError("give keys=DIR, or key=FILE with router_key=FILE, not both")
        root, role = Path(keys), _role(role)
        return (root / ROLE_DIRS[role] / (DEFAULT_NAMES[role] + SECRET_SUFFIX),
                root / (ROUTER_NAME + PUBLIC_SUFFIX))
    if key is None and router_key is None:
        return None
    if key is None or router_key is None:
        raise KeyFileError("key=FILE (this peer's .key_secret) and router_key=FILE (the "
                           "router's .key) go together")
    return Path(key), Path(router_key)


def peer_keys(*, key: str | os.PathLike | None = None,
              router_key: str | os.PathLike | None = None,
              keys: str | os.PathLike | None = None,
              role: str | Role = Role.CLIENT) -> PeerKeys | None:
    """``peer_files`` read: the credentials, or None when no keys were given."""
    files = peer_files(key=key, router_key=router_key, keys=keys, role=role)
    return None if files is None else PeerKeys.from_files(*files)


def secure_client(sock: zmq.Socket, creds: PeerKeys | None) -> None:
    """Make ``sock`` a CURVE client of the router (before it connects); None: plain."""
    if creds is None:
        return
    sock.curve_secretkey = creds.secret
    sock.curve_publickey = creds.public
    sock.curve_serverkey = creds.server


# -- the router: its keys, the store, ZAP ----------------------------------------------------
class KeyStore:
    """The public keys of ``directory``'s role folders: z85 key -> (role, name).

    ``role(key)`` is a dict lookup, safe from any thread. ``changed()`` stats the folders
    (no file is read); ``reload()`` reads them and swaps the map in one assignment. A key
    in two folders gets the first of workers, admins, clients.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        router_secret = self.directory / (ROUTER_NAME + SECRET_SUFFIX)
        self.public, self.secret = load_secret(router_secret)
        self._keys: dict[bytes, tuple[Role, str]] = {}
        self._signature: tuple = ()
        self.reload()

    def role(self, key: bytes | None) -> Role | None:
        """The role of z85 ``key`` now; None when it is not (or no longer) allowed."""
        entry = self._keys.get(key) if key else None
        return None if entry is None else entry[0]

    def allows(self, domain: str, key: bytes) -> bool:
        """ZAP's question: may ``key`` complete a handshake on ``domain``'s socket."""
        return self.role(key) in DOMAIN_ROLES.get(domain, ())

    def callback(self, domain: str, key: bytes) -> bool:
        """``zmq.auth`` credentials-provider hook (runs on the ZAP thread)."""
        return self.allows(domain, key)

    def __len__(self) -> int:
        return len(self._keys)

    def _scan(self) -> tuple:
        sig = []
        for role in (Role.WORKER, Role.ADMIN, Role.CLIENT):
            folder = self.directory / ROLE_DIRS[role]
            try:
                entries = sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                                 for e in os.scandir(folder)
                                 if e.name.endswith(PUBLIC_SUFFIX) and e.is_file())
            except OSError:
                entries = []
            sig.append((role, tuple(entries)))
        return tuple(sig)

    def changed(self) -> bool:
        """Whether a public key was added, removed, moved or rewritten since the last read."""
        return self._scan() != self._signature

    def reload(self) -> bool:
        """Read the folders again; True if the set of keys or their roles changed. A file
        that does not read is skipped (one bad file must not lock everyone out)."""
        signature = self._scan()
        keys: dict[bytes, tuple[Role, str]] = {}
        for role, entries in signature:
            for filename, _, _ in entries:
                try:
                    public = load_public(self.directory / ROLE_DIRS[role] / filename)
                except KeyFileError as exc:
                    log.warning("key file skipped: %s", exc)
                    continue
                keys.setdefault(public, (role, filename[:-len(PUBLIC_SUFFIX)]))
        old, self._keys, self._signature = self._keys, keys, signature
        return old != keys


class KeyWatch(threading.Thread):
    """Reads ``store`` again on a thread of its own: when a stat every ``interval``
    seconds shows its folders changed, and at once on ``now()`` (the router's SIGHUP).
    Off the router's loop: with 1,000 client keys a stat of the folders took 4 ms and a
    read 24 ms, stalls every client would wait out (``role`` lookups stay safe: the map is
    swapped in one assignment)."""

    def __init__(self, store: KeyStore, interval: float) -> None:
        super().__init__(name="workerpool-keys", daemon=True)
        self.store = store
        self.interval = interval
        self._asked = threading.Event()
        self._stopped = False

    def now(self) -> None:
        """Read the store at once (safe from a signal handler: it only sets an Event)."""
        self._asked.set()

    def stop(self) -> None:
        self._stopped = True
        self._asked.set()
        if self.is_alive():
            self.join(5)

    def run(self) -> None:
        while True:
            forced = self._asked.wait(self.interval)
            self._asked.clear()
            if self._stopped:
                return
            try:
                if (forced or self.store.changed()) and self.store.reload():
                    log.info("keys read again from %s: %d allowed", self.store.directory,
                             len(self.store))
            except Exception:  # a bug here must not end revocation for good
                log.exception("internal error reading the keys again")


def secure_server(sock: zmq.Socket, store: KeyStore, domain: str) -> None:
    """Make ``sock`` a CURVE server whose handshakes ZAP checks under ``domain`` (before it
    binds)."""
    sock.curve_server = True
    sock.curve_secretkey = store.secret
    sock.curve_publickey = store.public
    sock.zap_domain = domain.encode()


def start_authenticator(ctx: zmq.Context, store: KeyStore):
    """The ZAP handler (``zmq.auth``'s ``ThreadAuthenticator``) on its own thread, asking
    ``store`` for both domains; returns it (``stop()`` it before the context ends). Start
    it before the sockets bind: ZeroMQ lets a handshake through when no handler answers."""
    # Imported here: it brings asyncio, which a keyless router never needs.
    from zmq.auth.thread import ThreadAuthenticator

    # zmq.auth logs every refused handshake; a scan of the frontend by strangers must not
    # fill the router's log.
    zap_log = logging.getLogger("workerpool.router.zap")
    zap_log.setLevel(logging.WARNING)
    auth = ThreadAuthenticator(ctx, log=zap_log)
    auth.start()
    for domain in DOMAIN_ROLES:
        auth.configure_curve_callback(domain, credentials_provider=store)
    return auth


# -- binding: who can reach the router --------------------------------------------------------
def check_exposure(endpoints: list[str], keys: bool, insecure: bool) -> None:
    """Refuse to bind a socket others can reach with no keys, unless ``insecure``.
    Raises KeyFileError saying why and naming ``--insecure``."""
    if keys or insecure:
        return
    exposed = [e for e in endpoints if e and not transport.is_loopback(e)]
    if exposed:
        raise KeyFileError(
            f"refusing to bind {', '.join(exposed)} without keys: anyone who reaches it could "
            "send requests and ADMIN commands (frontend) or register as a worker and read "
            "every request (backend). Give --keys DIR (see `workerpool keys init`), bind a "
            "loopback or ipc:// address, or pass --insecure (`insecure = true` in "
            "[security]) to accept that.")
