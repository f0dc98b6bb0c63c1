"""The gateway's ASGI application: routes, each request into one AsyncClient call, and
the reply back out.

::

    HTTP client --> http11.py (httptools, uvloop) --> Gateway.__call__(scope, receive, send)
                      routes: /v1/SERVICE/METHOD   -> call_v1 (JSON | msgpack | events)
                              /health/*, /metrics, /openapi.json
                              /v2/...              -> KServe v2 (kserve.py)
    call_v1: headers, query -> request fields; body (<= max_body_bytes) -> bodies.decode
             -> the caller's connection (callers.py: token or address -> one of K)
             -> AsyncClient.submit / .stream   ------ K DEALERs -----> router -> workers
             -> bodies.encode / sse events      <-----------------------
             the client disconnects -> the Future is cancelled -> CANCEL to the router
               (the server's ``workerpool.connection`` extension says so at once)

K ``AsyncClient`` objects (``router_connections``) carry the requests: the router's
per-connection rules (turns in its queues, ``max_client_inflight``, the not-reading
cut-off) then hold between HTTP callers, each caller on a connection of its own while
there are no more busy callers than connections. Each client reconnects after a router
restart as any client does (requests in flight then fail with RouterRestartedError, 502).
Decisions live in the modules beside this one (statuses, bodies, sse, kserve, health,
tokens, callers), tested with plain values; this one moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from workerpool.config import (
    GATEWAY_DEFAULT_CONNECTIONS,
    MAX_PRIORITY,
    MAX_TIMEOUT,
    MIN_PRIORITY,
)
from workerpool.errors import WorkerPoolError
from workerpool.gateway import bodies, health, kserve, sse
from workerpool.gateway.bodies import BodyError
from workerpool.gateway.callers import CALLER_RETRY_AFTER, Callers, caller_key
from workerpool.gateway.metrics import CONTENT_TYPE as METRICS_TYPE
from workerpool.gateway.metrics import GatewayMetrics
from workerpool.gateway.openapi import render as render_openapi
from workerpool.gateway.statuses import error_json, error_map, status_of
from workerpool.gateway.tokens import Tokens, bearer

log = logging.getLogger("workerpool.gateway")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

JSON_TYPE = b"application/json"
STATUS_TIMEOUT = 2.0
"""Seconds a readiness probe waits for the router's STATUS before it says not ready."""
METADATA_TIMEOUT = 10.0
"""Seconds ``GET /v2/models/NAME`` waits for the handler's ``metadata`` method."""
HEADERS = "workerpool.headers"
"""The scope key under which the request's headers are kept as a dict."""
CONNECTION = "workerpool.connection"
"""The scope extension through which the server says the client left (http11.py)."""
OPEN_PATHS = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})
"""Probes answer without a token: an orchestrator's health checks carry none."""


@dataclass
class Settings:
    """What one gateway serves with. Every field has the default of `workerpool gateway`."""

    max_body_bytes: int = bodies.DEFAULT_MAX_BODY_BYTES
    max_buffered: int = sse.DEFAULT_MAX_BUFFERED
    status_max_age: float = health.DEFAULT_MAX_AGE
    tokens: str | None = None  # the token file; None: no token needed
    version: str = "0"
    router_connections: int = GATEWAY_DEFAULT_CONNECTIONS
    max_inflight_per_caller: int = 0  # 0: no cap of the gateway's own
    trust_forwarded: bool = False  # a caller is its X-Forwarded-For address


class Disconnected(Exception):
    """The HTTP client went away before its reply."""


class Gateway:
    """The ASGI application. ``make_client`` builds one AsyncClient; ``start`` makes
    ``router_connections`` of them in the server's event loop, and ``close_clients``
    closes them at shutdown. Raises ValueError for settings out of range."""

    def __init__(self, make_client: Callable[[], Any], settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._make_client = make_client
        self.clients: list[Any] = []
        self.callers = Callers(self.settings.router_connections,
                               self.settings.max_inflight_per_caller)
        self.metrics = GatewayMetrics()
        self.metrics.connection_in_flight = lambda: self.callers.in_flight
        self.answering = 0  # HTTP requests being answered now (a gauge reads it)
        self.metrics.in_flight.set_function(lambda: self.answering)
        self.tokens = Tokens(self.settings.tokens) if self.settings.tokens else None
        self.status_cache = health.StatusCache(self.settings.status_max_age)
        self._openapi = render_openapi(self.settings.version)
        self._exact: dict[tuple[str, str], Callable] = {
            ("GET", "/health/live"): self.live,
            ("GET", "/health/ready"): self.ready,
            ("GET", "/metrics"): self.prometheus,
            ("GET", "/openapi.json"): self.openapi,
            ("GET", "/v2"): self.v2_server,
            ("GET", "/v2/health/live"): self.live,
            ("GET", "/v2/health/ready"): self.v2_ready,
        }

    # -- ASGI -------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)

    async def start(self) -> None:
        """Open the ``router_connections`` clients, in the server's event loop; raises
        what a client raises (closing those opened)."""
        try:
            for _ in range(self.settings.router_connections):
                self.clients.append(self._make_client())
        except Exception:
            await self.close_clients()
            raise
        self.metrics.overrun_count = lambda: sum(c.streams_overrun for c in self.clients)

    @property
    def client(self) -> Any:
        """The connection that asks the router for STATUS (readiness, KServe pages)."""
        return self.clients[0]

    async def close_clients(self) -> None:
        """Close every connection; what is still outstanding on them is cancelled."""
        clients, self.clients = self.clients, []
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        metrics = self.metrics
        self.answering += 1
        endpoint, status = "other", 500
        try:
            endpoint, status = await self.route(scope, receive, send)
        except Disconnected:
            metrics.disconnects.inc()
            status = 499  # nginx's word for it: nothing was answered
        except Exception:  # a bug costs this request, never the server
            log.exception("gateway: %s %s failed", scope["method"], scope["path"][:200])
            try:
                await _reply(send, 500, error_json(error_map(
                    "WorkerPoolError", "the gateway failed on this request (see its log)")))
            except Exception:
                pass  # the reply had begun: the server ends the connection
        finally:
            self.answering -= 1
            metrics.answered(endpoint, status, time.monotonic() - started)

    async def route(self, scope: Scope, receive: Receive, send: Send) -> tuple[str, int]:
        """Answer one request; returns (endpoint label, status)."""
        path, method = scope["path"], scope["method"]
        if self.tokens is not None and path not in OPEN_PATHS:
            auth = _header(scope, b"authorization")
            if not self.tokens.allows(auth, time.monotonic()):
                why = "no bearer token" if auth is None else "this token is not allowed"
                return "auth", await _error(send, error_map("Unauthorized", why),
                                            [(b"www-authenticate", b'Bearer realm="workerpool"')])
        if path.startswith("/v1/"):
            service, sep, name = path[4:].partition("/")
            if not service or not sep or not name or "/" in name:
                return "v1", await _error(send, _not_found(path))
            if method != "POST":
                return "v1", await _error(send, _not_allowed(method, "POST"))
            return await self.as_caller(scope, send, "v1", lambda client: self.call_v1(
                scope, receive, send, service, name, client))
        if path.startswith("/v2/models/"):
            return await self.as_caller(scope, send, "v2", lambda client: self.v2_model(
                scope, receive, send, path[len("/v2/models/"):], client))
        page = self._exact.get((method if method != "HEAD" else "GET", path))
        if page is None:
            if any(p == path for _, p in self._exact):
                return "other", await _error(send, _not_allowed(method, "GET"))
            return "other", await _error(send, _not_found(path))
        return await page(send)

    async def as_caller(self, scope: Scope, send: Send, endpoint: str,
                        answer: Callable[[Any], Awaitable[tuple[str, int]]]) -> tuple[str, int]:
        """``answer(client)`` on the request's caller's connection (callers.py), or 429
        when the caller already holds ``max_inflight_per_caller`` requests."""
        key = caller_key(bearer(_header(scope, b"authorization")) if self.tokens else None,
                         (scope.get("client") or (None,))[0],
                         _header(scope, b"x-forwarded-for"), self.settings.trust_forwarded)
        conn = self.callers.acquire(key)
        if conn is None:
            self.metrics.caller_limited.inc()
            cap = self.settings.max_inflight_per_caller
            wire = error_map("TooManyRequests", f"this caller already has {cap} requests in "
                             "flight (max-inflight-per-caller); send the next when one is "
                             "answered", retryable=True, code="caller-limit",
                             retry_after=CALLER_RETRY_AFTER)
            if endpoint == "v2":
                return endpoint, await _v2_error(send, 429, wire, status_of(wire)[1])
            return endpoint, await _error(send, wire)
        try:
            return await answer(self.clients[conn])
        finally:
            self.callers.release(key)

    # -- /v1 --------------------------------------------------------------------------------
    async def call_v1(self, scope: Scope, receive: Receive, send: Send, service: str,
                      method: str, client: Any) -> tuple[str, int]:
        try:
            kind = bodies.media_type(_header(scope, b"content-type"))
            fields = request_fields(scope)
            body = await self.read_body(scope, receive)
            payload = bodies.decode(body, kind)
        except BodyError as exc:
            return "v1", await _error(send, exc.error)
        accept = _header(scope, b"accept")
        if sse.wants_events(accept):
            return "v1-stream", await self.stream_v1(scope, send, service, method,
                                                     payload, fields, client)
        out = bodies.accepted(accept, kind)
        try:
            fut = await client.submit(method, payload, service=service, **fields)
            value = await _unless_gone(fut, scope)
            reply = bodies.encode(value, out)
        except WorkerPoolError as exc:
            return "v1", await _error(send, exc.to_wire())
        except BodyError as exc:
            return "v1", await _error(send, exc.error)
        return "v1", await _reply(send, 200, reply, bodies.CONTENT_TYPES[out].encode())

    async def stream_v1(self, scope: Scope, send: Send, service: str, method: str,
                        payload: Any, fields: dict, client: Any) -> int:
        """Events for a streaming method, until END, an error, or the client leaving."""
        items = client.stream(method, payload, service=service,
                              max_buffered=self.settings.max_buffered, **fields)
        pump = asyncio.ensure_future(self._pump(items, send))
        exchange = scope["extensions"][CONNECTION]
        exchange.when_gone(pump.cancel)
        try:
            return await pump
        except asyncio.CancelledError:
            if exchange.gone:
                raise Disconnected from None  # the stream was closed: CANCEL went out
            raise
        finally:
            await items.aclose()

    async def _pump(self, items: Any, send: Send) -> int:
        started = False
        try:
            async for value in items:
                event = sse.item(value)
                if not started:
                    started = True
                    await send({"type": "http.response.start", "status": 200,
                                "headers": sse.HEADERS})
                await send({"type": "http.response.body", "body": event, "more_body": True})
        except WorkerPoolError as exc:
            wire = exc.to_wire()
        except (TypeError, ValueError) as exc:  # an item with no JSON form
            wire = error_map("HandlerError", f"a streamed item cannot be written as JSON: "
                             f"{exc}", remote_type="UnencodableResult")
        else:
            if not started:
                await send({"type": "http.response.start", "status": 200,
                            "headers": sse.HEADERS})
            await send({"type": "http.response.body", "body": sse.END})
            return 200
        if not started:
            return await _error(send, wire)
        await send({"type": "http.response.body", "body": sse.error(wire)})
        return 200

    async def read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The request body; raises BodyError (413) past ``max_body_bytes``, before reading
        it when Content-Length says so, and Disconnected if the client leaves."""
        limit = self.settings.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise bodies.too_large(int(declared), limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise Disconnected
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise bodies.too_large(size, limit)
            chunks.append(chunk)
            if not msg.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # -- health, metrics, description -----------------------------------------------------------
    async def live(self, send: Send) -> tuple[str, int]:
        return "health", await _reply(send, 200, b'{"live":true}')

    async def _status(self) -> dict:
        return await self.status_cache.get(
            lambda: self.client.status(timeout=STATUS_TIMEOUT), time.monotonic())

    async def ready(self, send: Send) -> tuple[str, int]:
        import json

        try:
            ready, body = health.readiness(await self._status())
        except WorkerPoolError as exc:
            return "health", await _reply(send, 503, json.dumps(
                {"ready": False, "error": exc.to_wire()}, default=str).encode())
        return "health", await _reply(send, 200 if ready else 503, json.dumps(body).encode())

    async def prometheus(self, send: Send) -> tuple[str, int]:
        return "metrics", await _reply(send, 200, self.metrics.render(), METRICS_TYPE.encode())

    async def openapi(self, send: Send) -> tuple[str, int]:
        return "openapi", await _reply(send, 200, self._openapi)

    # -- KServe v2 --------------------------------------------------------------------------------
    async def v2_server(self, send: Send) -> tuple[str, int]:
        import json

        body = {"name": "workerpool", "version": self.settings.version,
                "extensions": ["binary_tensor_data"]}
        return "v2", await _reply(send, 200, json.dumps(body).encode())

    async def v2_ready(self, send: Send) -> tuple[str, int]:
        try:
            ready, _ = health.readiness(await self._status())
        except WorkerPoolError as exc:
            return "v2", await _v2_error(send, 400, exc.to_wire())
        return "v2", await _reply(send, 200 if ready else 400, b"{}")

    async def v2_model(self, scope: Scope, receive: Receive, send: Send,
                       rest: str, client: Any) -> tuple[str, int]:
        """``NAME``, ``NAME/ready``, ``NAME/infer``, each also under ``/versions/V``."""
        parts = rest.split("/")
        if len(parts) >= 3 and parts[1] == "versions":
            parts = [parts[0], *parts[3:]]  # one version per model: the service itself
        name, action = parts[0], "/".join(parts[1:])
        method = scope["method"]
        if not name or action not in ("", "ready", "infer"):
            return "v2", await _v2_error(send, 404, _not_found(scope["path"]))
        if action == "infer":
            if method != "POST":
                return "v2", await _v2_error(send, 405, _not_allowed(method, "POST"))
            return "v2-infer", await self.v2_infer(scope, receive, send, name, client)
        if method not in ("GET", "HEAD"):
            return "v2", await _v2_error(send, 405, _not_allowed(method, "GET"))
        try:
            methods = health.methods_of(await self._status(), name)
        except WorkerPoolError as exc:
            return "v2", await _v2_error(send, status_of(exc.to_wire())[0], exc.to_wire())
        if methods is None:
            return "v2", await _v2_error(send, 404, error_map(
                "ServiceUnavailableError", f"unknown model {name!r}", code="unknown-service"))
        if action == "ready":
            st = await self._status()
            ok = bool(health.model_ready(st, name)) and kserve.INFER_METHOD in methods
            return "v2", await _reply(send, 200 if ok else 400, b"{}")
        described = None
        if kserve.METADATA_METHOD in methods:
            try:
                described = await client.call(kserve.METADATA_METHOD, None, service=name,
                                                   timeout=METADATA_TIMEOUT)
            except WorkerPoolError as exc:
                return "v2", await _v2_error(send, status_of(exc.to_wire())[0], exc.to_wire())
        import json

        return "v2", await _reply(send, 200, json.dumps(
            kserve.model_metadata(name, described), default=bodies.to_json).encode())

    async def v2_infer(self, scope: Scope, receive: Receive, send: Send, name: str,
                       client: Any) -> int:
        try:
            fields = request_fields(scope)
            body = await self.read_body(scope, receive)
            req = kserve.parse_infer(body, _header(scope, b"inference-header-content-length"))
        except BodyError as exc:
            return await _v2_error(send, status_of(exc.error)[0], exc.error)
        if req.timeout is not None and fields.get("timeout") is None:
            fields["timeout"] = min(req.timeout, MAX_TIMEOUT)
        try:
            fut = await client.submit(kserve.INFER_METHOD, req.inputs, service=name,
                                           **fields)
            result = await _unless_gone(fut, scope)
            reply, header_length = kserve.infer_reply(name, req, result)
        except WorkerPoolError as exc:
            wire = exc.to_wire()
            return await _v2_error(send, status_of(wire)[0], wire, status_of(wire)[1])
        except BodyError as exc:
            return await _v2_error(send, status_of(exc.error)[0], exc.error)
        if header_length is None:
            return await _reply(send, 200, reply)
        return await _reply(send, 200, reply, b"application/octet-stream",
                            [(kserve.HEADER_LENGTH.encode(), str(header_length).encode())])


# -- request fields ---------------------------------------------------------------------------
def request_fields(scope: Scope) -> dict[str, Any]:
    """``timeout`` (the query's), ``priority`` (X-Priority) and ``idempotent``
    (X-Idempotent) of a request; raises BodyError (400) for a value out of range."""
    fields: dict[str, Any] = {}
    query = scope.get("query_string") or b""
    if query:
        for key, value in parse_qsl(query.decode("latin-1")):
            if key == "timeout":
                fields["timeout"] = parse_timeout(value)
    priority = _header(scope, b"x-priority")
    if priority is not None:
        text = priority.strip()
        if not (text.isascii() and text.isdigit()) or not MIN_PRIORITY <= int(text) <= MAX_PRIORITY:
            raise BodyError(error_map("ProtocolError", f"X-Priority {priority[:40]!r} is not "
                                      f"an integer in [{MIN_PRIORITY}, {MAX_PRIORITY}]",
                                      code="bad-meta"))
        fields["priority"] = int(text)
    idempotent = _header(scope, b"x-idempotent")
    if idempotent is not None:
        word = idempotent.strip().lower()
        if word not in ("true", "false"):
            raise BodyError(error_map("ProtocolError", f"X-Idempotent {idempotent[:40]!r} "
                                      "is not true or false", code="bad-meta"))
        fields["idempotent"] = word == "true"
    return fields


def parse_timeout(text: str) -> float:
    """``?timeout=SECONDS``: a number in (0, 86400]; raises BodyError (400) otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT:
        raise BodyError(error_map("ProtocolError", f"timeout {text[:40]!r} is not a number of "
                                  f"seconds in (0, {MAX_TIMEOUT:g}]", code="bad-meta"))
    return value


# -- small helpers ------------------------------------------------------------------------------
def _header(scope: Scope, name: bytes) -> str | None:
    """The request's header ``name`` (lower case; the last if it repeats), or None."""
    headers = scope.get(HEADERS)
    if headers is None:  # a dict once per request: a request asks for several
        headers = scope[HEADERS] = dict(scope["headers"])
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


def _not_found(path: str) -> dict:
    return error_map("NotFound", f"no endpoint {path[:200]!r}; see /openapi.json")


def _not_allowed(method: str, allowed: str) -> dict:
    return error_map("MethodNotAllowed", f"{method} is not allowed here; use {allowed}",
                     allow=allowed)


async def _reply(send: Send, status: int, body: bytes, ctype: bytes = JSON_TYPE,
                 headers: list | None = None) -> int:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype),
                            (b"content-length", str(len(body)).encode()), *(headers or ())]})
    await send({"type": "http.response.body", "body": body})
    return status


async def _error(send: Send, wire: dict, headers: list | None = None) -> int:
    """A /v1-style error reply: the table's status and headers, ``{"error": {...}}``."""
    status, extra = status_of(wire)
    out = [(k.encode(), v.encode()) for k, v in extra]
    if "allow" in wire:
        out.append((b"allow", str(wire["allow"]).encode()))
    return await _reply(send, status, error_json(wire), headers=[*out, *(headers or ())])


async def _v2_error(send: Send, status: int, wire: dict,
                    extra: list[tuple[str, str]] | None = None) -> int:
    """A KServe v2 error reply: ``{"error": "<type>: <message>"}``."""
    return await _reply(send, status, kserve.error_json(wire),
                        headers=[(k.encode(), v.encode()) for k, v in extra or ()])


async def _unless_gone(fut: asyncio.Future, scope: Scope) -> Any:
    """``fut``'s result; if the HTTP client leaves first, ``fut`` is cancelled (a CANCEL
    goes to the router) and Disconnected is raised."""
    if fut.done():
        return fut.result()
    exchange = scope["extensions"][CONNECTION]
    exchange.when_gone(fut.cancel)
    try:
        return await fut
    except asyncio.CancelledError:
        if exchange.gone:
            raise Disconnected from None
        raise
