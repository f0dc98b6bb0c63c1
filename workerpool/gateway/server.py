"""Running the gateway: the listening socket, uvicorn, TLS, and the AsyncClients.

::

    workerpool gateway --router ADDR --listen HOST:PORT      (or `up --http`, as its child)
      -> bind HOST:PORT now (a taken port fails before anything starts)
      -> uvicorn.Server(Gateway app; httptools, uvloop; TLS from --tls-cert/--tls-key)
           lifespan startup: K x AsyncClient(ADDR, keys) in uvicorn's loop (--router-connections)
           SIGTERM / SIGINT: stop accepting, finish what is in flight (shutdown_timeout),
                             close every client (what is still outstanding is cancelled)

uvicorn (and httptools, uvloop) are the ``http`` extra; this module imports them only when
a gateway starts, so no other command loads them.
"""

from __future__ import annotations

import logging
import os
import socket
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
    import uvicorn
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    from workerpool.client import AsyncClient
    from workerpool.gateway.coalesce import coalescing

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
    for path in (opts.tls_cert, opts.tls_key):
        if path is not None and not os.access(path, os.R_OK):
            raise GatewayError(f"cannot read {path}")
    sock = bind(opts.listen)
    protocol = import_from_string(HTTP_PROTOCOLS[_pick("httptools", "h11")])
    config = uvicorn.Config(
        app, loop=_pick("uvloop", "asyncio"), http=coalescing(protocol), lifespan="on",
        log_config=None, access_log=False, server_header=False, backlog=BACKLOG,
        ssl_certfile=opts.tls_cert, ssl_keyfile=opts.tls_key,
        timeout_graceful_shutdown=SHUTDOWN_TIMEOUT)
    scheme = "https" if opts.tls_cert else "http"
    where = format_http_address(*sock.getsockname()[:2])

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                log.info("gateway: %s://%s -> %s over %d connections", scheme, where,
                         opts.router, settings.router_connections)
                if on_ready is not None:
                    on_ready(f"{scheme}://{where}")

    server = Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


def _pick(module: str, fallback: str) -> str:
    """``module`` when it is installed (the fast choice), else ``fallback``."""
    try:
        __import__(module)
    except ImportError:
        return fallback
    return module

