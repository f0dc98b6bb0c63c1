"""The router process: one poll loop that moves bytes between the sockets and the core.

::

    clients [DEALER] --> frontend ROUTER --+                  +-- backend ROUTER <-- [DEALER] workers
                                           |  Router.run()    |                  <-- [DEALER] supervisors
                                           +--> RouterCore <--+
                                                (router.core: every decision, no I/O)

Each pass polls both sockets and a signal wake-up fd, drains each socket in bounded
batches (so one busy side cannot starve the other), then lets the core act on the time
(``tick``). Nothing here blocks: sends are NOBLOCK with ``ROUTER_MANDATORY``, so an
unroutable peer is a failed send the core decides about, not a silent drop. This is the
only router module that touches ZeroMQ.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from ipc import transport
from ipc.transport import NOBLOCK
from router.core import RouterCore
from workerpool._proc import SignalWakeup, release_memory
from workerpool.config import DEFAULT_BACKEND, RouterConfig

log = logging.getLogger("workerpool.router")

BATCH = 512  # messages taken from one socket before looking at the other
BATCH_SECONDS = 0.005
"""...or fewer, once taking them has lasted this long. Most messages cost microseconds, so
this rarely cuts a batch short; a client's costly ones (a meta just under max_meta_bytes
takes milliseconds to decode) would otherwise hold the loop for seconds, leave workers'
heartbeats unread, and have them declared hung."""
FRONTEND_SNDHWM = 1_000_000  # replies queued to one client before it counts as not reading


class _Sockets:
    """The core's ``Outbox``: NOBLOCK sends on the two ROUTER sockets."""

    def __init__(self, frontend: zmq.Socket, backend: zmq.Socket) -> None:
        self._frontend = frontend
        self._backend = backend

    def to_client(self, client: bytes, frames: list) -> bool:
        return _send(self._frontend, client, frames)

    def to_backend(self, ident: bytes, frames: list) -> bool:
        return _send(self._backend, ident, frames)


def _send(sock: zmq.Socket, peer: bytes, frames: list) -> bool:
    """False when ``peer`` is gone (EHOSTUNREACH) or not reading (EAGAIN)."""
    try:
        transport.send(sock, [peer, *frames], NOBLOCK)
    except zmq.ZMQError:
        return False
    return True


class Router:
    """Routes requests from clients to workers and keeps the health table.

    ``run()`` serves until SIGTERM/SIGINT or a supervisor's DRAIN, then drains: it stops
    admitting, lets admitted requests finish (up to ``drain_timeout``), tells every
    worker to stop, and returns.
    """

    def __init__(self, config: RouterConfig, service_defaults: dict | None = None) -> None:
        self.config = config
        self._ctx = zmq.Context()
        self.frontend = self._bind(config.frontend, sndhwm=FRONTEND_SNDHWM)
        self.backend = self._bind(config.backend or DEFAULT_BACKEND, sndhwm=0)
        self.frontend_address = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_address = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.core = RouterCore(config, service_defaults, _Sockets(self.frontend, self.backend),
                               time.monotonic, (self.frontend_address, self.backend_address))
        self._wakeup = SignalWakeup()
        # A message's parts: routing id, header, meta, body, then its buffer frames.
        self._max_parts = 4 + config.max_buffer_frames

    def _bind(self, address: str, sndhwm: int) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(address)
        return sock

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a drain; the wake-up fd makes the poll return at once."""
        self._wakeup.install(lambda: self.core.begin_drain("signal"))

    def run(self) -> None:
        core = self.core
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self._wakeup, zmq.POLLIN)
        log.info("router listening: frontend %s, backend %s",
                 self.frontend_address, self.backend_address)
        busy = False
        try:
            while not core.finished:
                timeout = 0 if busy else int(core.next_wakeup() * 1000) + 1
                events = dict(poller.poll(timeout))
                if self._wakeup.fileno() in events:
                    self._wakeup.drain()
                busy = False
                if self.backend in events:
                    busy |= self._drain_socket(self.backend, core.on_backend, self._max_parts)
                if self.frontend in events:
                    busy |= self._drain_socket(self.frontend, core.on_frontend, self._max_parts)
                if core.deaths_due():  # the dead worker's last words
                    self._drain_socket(self.backend, core.on_backend, self._max_parts)
                core.tick()
                if core.release_memory:
                    core.release_memory = False
                    release_memory()
        finally:
            self.close()

    def close(self) -> None:
        self.frontend.close()
        self.backend.close()
        self._ctx.term()
        self._wakeup.close()

    def _drain_socket(self, sock: zmq.Socket, handler: Callable[[list], None],
                      max_parts: int | None = None) -> bool:
        """Handle up to BATCH waiting messages, for up to about BATCH_SECONDS; True if more
        may be waiting."""
        until = time.monotonic() + BATCH_SECONDS
        for _ in range(BATCH):
            try:
                frames = transport.recv(sock, NOBLOCK, 4, max_parts)  # routing id, then the message
            except zmq.Again:
                return False
            try:
                handler(frames)
            except Exception:  # a bug must cost one message, never the router
                self.core.stats["internal_errors"] += 1
                log.exception("internal error handling a message; message dropped")
            if time.monotonic() > until:
                break
        return True
