"""Running the gateway: the listening socket, the event loop, TLS, and the AsyncClients.

::

    workerpool gateway --router ADDR --listen HOST:PORT      (or `up --http`, as its child)
      -> bind HOST:PORT now (a taken port fails before anything starts)
      -> uvloop: K x AsyncClient(ADDR, keys) (--router-connections)
                 HttpServer(Gateway app) on the socket; TLS from --tls-cert/--tls-key
      SIGTERM / SIGINT: stop accepting, finish what is in flight (SHUTDOWN_TIMEOUT),
                        close every client (what is still outstanding is cancelled)

httptools and uvloop are the ``http`` extra; this module imports them only when a gateway
starts, so no other command loads them.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import socket
import ssl
from dataclasses import dataclass

from workerpool._proc import die_with_parent
from workerpool.config import format_http_address, parse_http_address
from workerpool.gateway import GatewayError, check_installed
from workerpool.gateway.app import Gateway, Settings

log = logging.getLogger("workerpool.gateway")

DEFAULT_LISTEN = "127.0.0.1:8000"
DEFAULT_TIMEOUT = 300.0
"""Seconds a request may take when it names no ``?timeout=``: no HTTP call waits forever
on a router that is gone."""
SHUTDOWN_TIMEOUT = 10.0
"""On SIGTERM, seconds requests in flight (streams included) may still take."""
BACKLOG = 2048


@dataclass
class ServeOptions:
    """What `workerpool gateway` was told, after the CLI checked it."""

    router: str
    listen: str = DEFAULT_LISTEN
    keys: tuple[str, str] | None = None  # (own secret, router public) key files
    timeout: float = DEFAULT_TIMEOUT
    tls_cert: str | None = None
    tls_key: str | None = None
    settings: Settings | None = None


def bind(listen: str) -> socket.socket:
    """A listening TCP socket on ``listen`` (HOST:PORT). Raises GatewayError."""
    try:
        host, port = parse_http_address(listen)
    except ValueError as exc:
        raise GatewayError(str(exc)) from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise GatewayError(f"cannot serve HTTP on {listen}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def probe(listen: str) -> None:
    """Raise GatewayError now if ``listen`` cannot be bound (``up --http`` checks before
    it starts anything)."""
    bind(listen).close()


def serve(opts: ServeOptions, on_ready=None) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit status. Raises GatewayError."""
    check_installed()
    from workerpool.client import AsyncClient

    parent = os.environ.get("WORKERPOOL_PARENT_PID")
    die_with_parent(int(parent) if parent else None)  # `up` killed with -9: no orphan
    settings = opts.settings or Settings()
    keys = opts.keys

    def make_client() -> AsyncClient:
        if keys is None:
            return AsyncClient(opts.router, timeout=opts.timeout)
        return AsyncClient(opts.router, timeout=opts.timeout, key=keys[0], router_key=keys[1])

    try:
        app = Gateway(make_client, settings)
    except ValueError as exc:
        raise GatewayError(str(exc)) from None
    tls = _tls(opts.tls_cert, opts.tls_key)
    sock = bind(opts.listen)
    try:
        run = importlib.import_module(_pick("uvloop", "asyncio")).run  # the same call
        return run(_serve(app, sock, tls, opts, on_ready))
    finally:
        sock.close()


async def _serve(app: Gateway, sock: socket.socket, tls: ssl.SSLContext | None,
                 opts: ServeOptions, on_ready) -> int:
    from workerpool.gateway.http11 import HttpServer

    try:
        await app.start()
    except Exception as exc:
        log.error("gateway: cannot connect to the router %s: %s", opts.router, exc)
        return 1
    server = HttpServer(app, whole=app, scheme="https" if tls else "http")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start(sock, ssl=tls, backlog=BACKLOG)
        where = format_http_address(*sock.getsockname()[:2])
        log.info("gateway: %s://%s -> %s over %d connections", server.scheme, where,
                 opts.router, app.settings.router_connections)
        if on_ready is not None:
            on_ready(f"{server.scheme}://{where}")
        await stop.wait()
        log.info("gateway: stopping; answers in flight get %.0f s", SHUTDOWN_TIMEOUT)
        await server.stop(SHUTDOWN_TIMEOUT)
    finally:
        await app.close_clients()
    return 0


def _tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server's TLS context from PEM files (the certificate may be a chain), or None
    without a certificate. Raises GatewayError for a file that cannot be read or used."""
    if cert is None:
        return None
    for path in (cert, key):
        if path is not None and not os.access(path, os.R_OK):
            raise GatewayError(f"cannot read {path}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise GatewayError(f"cannot use {cert} and {key} for TLS: {exc}") from None
    return context


def _pick(module: str, fallback: str) -> str:
    """``module`` when it is installed (the fast choice), else ``fallback``."""
    try:
        __import__(module)
    except ImportError:
        return fallback
    return module

