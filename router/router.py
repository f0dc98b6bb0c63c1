"""The router process: one poll loop that moves bytes between the sockets and the core.

::

    clients [DEALER] --> frontend ROUTER --+                  +-- backend ROUTER <-- [DEALER] workers
                                           |  Router.run()    |                  <-- [DEALER] supervisors
                                           +--> RouterCore <--+
                                                (router.core: every decision, no I/O)

Each pass polls both sockets and a signal wake-up fd, drains each socket in bounded
batches (so one busy side cannot starve the other), then lets the core act on the time
(``tick``). What a batch or a tick sends to one peer leaves as one message at its end.
Nothing here blocks: sends are NOBLOCK with ``ROUTER_MANDATORY``, so an unroutable peer is
a failed send the core decides about, not a silent drop. This is the only router module
that touches ZeroMQ.

With keys (``SecurityConfig.keys``) both sockets are CURVE servers: a ZAP thread
(ipc.curve) lets only known keys complete a handshake, and each message's key is looked up
again in the ``KeyStore`` as it is read, so its role reaches the core and a revoked key is
refused on a connection that is already up. The store is read again on SIGHUP, and when
its folders change (a stat every ``KEY_CHECK_INTERVAL``), on a thread of its own
(``curve.KeyWatch``).
"""

from __future__ import annotations

import errno
import gc
import logging
import signal
import time
from collections.abc import Callable

import zmq

from ipc import curve, transport
from ipc.transport import NOBLOCK
from router.core import Delivery, RouterCore
from router.metrics import ListenerError, LoopMeter, listener_module, take_snapshot
from workerpool._proc import SignalWakeup, release_memory
from workerpool.config import DEFAULT_BACKEND, RouterConfig, SecurityConfig

log = logging.getLogger("workerpool.router")

BATCH = 512  # messages taken from one socket before looking at the other
BATCH_SECONDS = 0.001
"""...or fewer, once taking them has lasted this long: then the other socket's turn. A
client's costly messages (a meta just under max_meta_bytes takes milliseconds to decode)
would otherwise hold the loop for seconds and leave workers' heartbeats unread; and a
reply waiting on the backend behind a burst of client messages waits at most this long
(at 5 ms, a hostile flood's bursts set a well-behaved client's p99: bench/fuzz.py)."""
FLUSH_SECONDS = 0.0005
"""What a batch decided so far is sent once it has run this long, not only at its end, so
a request taken early in a long batch reaches its worker without waiting for the rest."""
KEY_CHECK_INTERVAL = 2.0  # seconds between stats of the key folders: revocation within 10 s


class _Sockets:
    """The core's ``Outbox``: NOBLOCK sends on the two ROUTER sockets."""

    def __init__(self, frontend: zmq.Socket, backend: zmq.Socket) -> None:
        self._frontend = frontend
        self._backend = backend

    def to_client(self, client: bytes, frames: list) -> Delivery:
        return _send(self._frontend, client, frames)

    def to_backend(self, ident: bytes, frames: list) -> bool:
        return _send(self._backend, ident, frames) is Delivery.SENT


def _send(sock: zmq.Socket, peer: bytes, frames: list) -> Delivery:
    """GONE when ``peer`` is not connected (EHOSTUNREACH), FULL when its send queue is at
    its SNDHWM (EAGAIN: it does not read)."""
    try:
        transport.send(sock, [peer, *frames], NOBLOCK)
    except zmq.ZMQError as exc:
        return Delivery.FULL if exc.errno == errno.EAGAIN else Delivery.GONE
    return Delivery.SENT


class Router:
    """Routes requests from clients to workers and keeps the health table.

    ``run()`` serves until SIGTERM/SIGINT or a supervisor's DRAIN, then drains: it stops
    admitting, lets admitted requests finish (up to ``drain_timeout``), tells every
    worker to stop, and returns.
    """

    def __init__(self, config: RouterConfig, service_defaults: dict | None = None,
                 security: SecurityConfig | None = None) -> None:
        self.config = config
        security = security or SecurityConfig()
        backend = config.backend or DEFAULT_BACKEND
        curve.check_exposure([config.frontend, backend], bool(security.keys), security.insecure)
        self._wakeup = SignalWakeup()
        self.loop_meter: LoopMeter | None = None
        self.listener = None
        self._ctx = zmq.Context()
        self.keys: curve.KeyStore | None = None
        self._auth = None
        if security.keys:
            self.keys = curve.KeyStore(security.keys)
            self._auth = curve.start_authenticator(self._ctx, self.keys)
        self._key_watch = curve.KeyWatch(self.keys, KEY_CHECK_INTERVAL) if self.keys else None
        try:
            if config.metrics:  # first: a taken port fails before either socket is bound
                self.listener = listener_module().Listener(config.metrics, self._wakeup.wake)
                self.loop_meter = LoopMeter()
            # Per connection: past the send mark a client counts as not reading and is cut
            # off; past the receive mark ZeroMQ stops reading it until the loop catches up.
            self.frontend = self._bind(config.frontend, config.max_unread_replies,
                                       config.max_unread_messages, curve.FRONTEND_DOMAIN)
            self.backend = self._bind(backend, 0, 0, curve.BACKEND_DOMAIN)
        except (zmq.ZMQError, ListenerError):
            if self._auth is not None:  # its thread would hold the context open
                self._auth.stop()
            if self.listener is not None:
                self.listener.close()
            self._wakeup.close()
            raise
        self.frontend_address = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_address = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.core = RouterCore(config, service_defaults, _Sockets(self.frontend, self.backend),
                               time.monotonic, (self.frontend_address, self.backend_address))
        # A message's parts: routing id, head, a body frame, then its buffer frames.
        self._max_parts = 3 + config.max_buffer_frames

    def _bind(self, address: str, sndhwm: int, rcvhwm: int, domain: str) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        if self.keys is not None:
            curve.secure_server(sock, self.keys, domain)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.bind(address)
        return sock

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a drain; the wake-up fd makes the poll return at once."""
        self._wakeup.install(lambda: self.core.begin_drain("signal"))
        signal.signal(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self, signum: int, frame: object) -> None:
        """Read the keys again at once."""
        if self._key_watch is not None:
            self._key_watch.now()

    def run(self) -> None:
        core = self.core
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self._wakeup, zmq.POLLIN)
        log.info("router listening: frontend %s, backend %s",
                 self.frontend_address, self.backend_address,
                 extra={"event": "router-start", "frontend": self.frontend_address,
                        "backend": self.backend_address, "instance": core.instance,
                        "keys": self.keys is not None})
        busy = False
        listener = self.listener
        if listener is not None:
            listener.start()
        if self._key_watch is not None:
            self._key_watch.start()
        # What exists now (modules, config, sockets) lives as long as the router: out of the
        # collector's sight, a full collection takes under 1 ms instead of up to 16 (measured
        # in a hostile flood, bench/fuzz.py), and a full collection stalls every client.
        gc.freeze()
        try:
            while not core.finished:
                timeout = 0 if busy else int(core.next_wakeup() * 1000) + 1
                events = dict(poller.poll(timeout))
                # Heartbeats sent before now are read in this pass (or queued behind more
                # than a pass's worth): the core judges silence as of now, however long a
                # client's message then takes (a million frames, a costly meta).
                polled = core.backend_read_at = time.monotonic()
                if self._wakeup.fileno() in events:
                    self._wakeup.drain()
                busy = False
                if self.backend in events:
                    busy |= self._drain_socket(self.backend, core.on_backend, self._max_parts,
                                               polled)
                if self.frontend in events:
                    busy |= self._drain_socket(self.frontend, core.on_frontend, self._max_parts,
                                               polled)
                if core.deaths_due():  # the dead worker's last words
                    self._drain_socket(self.backend, core.on_backend, self._max_parts, polled)
                core.tick()
                if core.release_memory:
                    core.release_memory = False
                    release_memory()
                if listener is not None and listener.snapshots.wanted:
                    self.publish_snapshot()
        finally:
            uptime = core.clock() - core.started
            log.info("router stopped after %.1fs", uptime,
                     extra={"event": "router-stop", "uptime": round(uptime, 3),
                            "drained": core.finished, "counters": dict(core.stats)})
            self.close()

    def publish_snapshot(self) -> None:
        """Hand the listener thread a copy of the figures (it asked through ``wanted``)."""
        snapshots = self.listener.snapshots
        try:
            snapshots.publish(take_snapshot(self.core, self.loop_meter, time.monotonic()))
        except Exception:  # a bug must cost the scrape, never the router
            snapshots.give_up()
            self.core.stats["internal_errors"] += 1
            log.exception("internal error taking a metrics snapshot")

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self._key_watch is not None:
            self._key_watch.stop()
        self.frontend.close()
        self.backend.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        self._wakeup.close()

    def _drain_socket(self, sock: zmq.Socket, handler: Callable[..., None],
                      max_parts: int | None = None, polled: float = 0.0) -> bool:
        """Handle up to BATCH waiting messages, for up to about BATCH_SECONDS; True if more
        may be waiting. What the batch sends to one peer goes as one message (the core's
        ``batch``), sent before this returns. With keys, each message goes with its key's
        role now (None: no longer allowed). With --metrics, each message's lag (from
        ``polled``, when the poll returned, to the loop turning to it) and the count
        handled go to the loop meter."""
        keys = self.keys
        meter = self.loop_meter
        lag = meter.lag if meter is not None else None
        turned = time.monotonic()
        until = turned + BATCH_SECONDS
        flush_at = turned + FLUSH_SECONDS
        handled = 0
        try:
            with self.core.batch():
                for _ in range(BATCH):
                    # Cheaper than the zmq.Again of an empty recv:
                    if not transport.readable(sock):
                        return False
                    try:
                        if keys is None:  # routing id, then the message
                            frames = transport.recv(sock, NOBLOCK, 2, max_parts)
                        else:
                            frames, user = transport.recv_from(sock, NOBLOCK, 2, max_parts)
                            role = keys.role(user)
                    except zmq.Again:
                        return False
                    if lag is not None:
                        lag.observe(turned - polled)
                        handled += 1
                    try:
                        if keys is None:
                            handler(frames)
                        else:
                            handler(frames, role)
                    except Exception:  # a bug must cost one message, never the router
                        self.core.stats["internal_errors"] += 1
                        log.exception("internal error handling a message; message dropped")
                    turned = time.monotonic()
                    if turned > until:
                        break
                    if turned > flush_at:
                        self.core.outgoing.flush()
                        flush_at = turned + FLUSH_SECONDS
                return True
        finally:
            if meter is not None:
                if sock is self.frontend:
                    meter.frontend += handled
                else:
                    meter.backend += handled
