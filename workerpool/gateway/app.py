"""The gateway's ASGI application: routes, each request into one AsyncClient call, and
the reply back out.

::

    HTTP client --> http11.py (httptools, uvloop)
      POST /v1/..., not events, body <= 256 KiB --> Gateway.answer_whole(exchange, body)
      any other request                         --> Gateway.__call__(scope, receive, send)
                      routes: /v1/SERVICE/METHOD   -> call_v1 (JSON | msgpack | events)
                              /health/*, /metrics, /openapi.json
                              /v2/...              -> KServe v2 (kserve.py)
    a /v1 call: headers, query -> request fields; body (<= max_body_bytes) -> bodies.decode
             -> the caller's connection (callers.py: token or address -> one of K)
             -> AsyncClient.submit_nowait / .stream  ---- K DEALERs ----> router -> workers
             -> v1_result (bodies.encode) / sse events <--------------------
             the client disconnects -> the Future is cancelled -> CANCEL to the router
               (the server's ``workerpool.connection`` extension, or the Whole exchange
               itself, says so at once)

Most requests are quick unary /v1 calls. ``answer_whole`` answers those from the Future's
callback, without the task and coroutine chain an ASGI request costs (about a tenth of
the gateway's CPU on a no-op call, docs/benchmarks.md); the same checks and the same
builders of replies (``Reply``) serve both paths, so a request is answered alike either
way, whichever path its size sends it down.

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
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple
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
CONTENT_TYPES = {kind: name.encode() for kind, name in bodies.CONTENT_TYPES.items()}
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


class Reply(NamedTuple):
    """A whole response: the ASGI path sends it as two messages, a Whole request in one
    write."""

    status: int
    body: bytes
    content_type: bytes = JSON_TYPE
    headers: tuple | list = ()

    def head(self) -> list[tuple[bytes, bytes]]:
        """Its header lines, Content-Type and Content-Length first."""
        return [(b"content-type", self.content_type),
                (b"content-length", b"%d" % len(self.body)), *self.headers]


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
                await _send(send, _failed())
            except Exception:
                pass  # the reply had begun: the server ends the connection
        finally:
            self.answering -= 1
            metrics.answered(endpoint, status, time.monotonic() - started)

    async def route(self, scope: Scope, receive: Receive, send: Send) -> tuple[str, int]:
        """Answer one request; returns (endpoint label, status)."""
        path, method = scope["path"], scope["method"]
        refused = self.refused(scope)
        if refused is not None:
            return "auth", await _send(send, refused)
        if path.startswith("/v1/"):
            target = v1_target(path, method)
            if isinstance(target, Reply):
                return "v1", await _send(send, target)
            service, name = target
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
        key = self.caller_of(scope)
        conn = self.callers.acquire(key)
        if conn is None:
            wire = self.limited()
            if endpoint == "v2":
                return endpoint, await _v2_error(send, 429, wire, status_of(wire)[1])
            return endpoint, await _error(send, wire)
        try:
            return await answer(self.clients[conn])
        finally:
            self.callers.release(key)

    # -- what every call is checked for ------------------------------------------------------
    def refused(self, scope: Scope) -> Reply | None:
        """The 401 for a request without an allowed token, when tokens are on (probes
        need none); None when it may go on."""
        if self.tokens is None or scope["path"] in OPEN_PATHS:
            return None
        auth = _header(scope, b"authorization")
        if self.tokens.allows(auth, time.monotonic()):
            return None
        why = "no bearer token" if auth is None else "this token is not allowed"
        return error_reply(error_map("Unauthorized", why),
                           [(b"www-authenticate", b'Bearer realm="workerpool"')])

    def caller_of(self, scope: Scope) -> str:
        """Who the request is from (callers.py)."""
        return caller_key(bearer(_header(scope, b"authorization")) if self.tokens else None,
                          (scope.get("client") or (None,))[0],
                          _header(scope, b"x-forwarded-for"), self.settings.trust_forwarded)

    def limited(self) -> dict:
        """The error for a caller already at ``max_inflight_per_caller`` (429), counted."""
        self.metrics.caller_limited.inc()
        cap = self.settings.max_inflight_per_caller
        return error_map("TooManyRequests", f"this caller already has {cap} requests in "
                         "flight (max-inflight-per-caller); send the next when one is "
                         "answered", retryable=True, code="caller-limit",
                         retry_after=CALLER_RETRY_AFTER)

    # -- /v1 --------------------------------------------------------------------------------
    async def call_v1(self, scope: Scope, receive: Receive, send: Send, service: str,
                      method: str, client: Any) -> tuple[str, int]:
        try:
            kind, fields = v1_head(scope)  # before the body: a 415 or 400 need not read it
            payload = bodies.decode(await self.read_body(scope, receive), kind)
        except BodyError as exc:
            return "v1", await _error(send, exc.error)
        accept = _header(scope, b"accept")
        if sse.wants_events(accept):
            return "v1-stream", await self.stream_v1(scope, send, service, method,
                                                     payload, fields, client)
        out = bodies.accepted(accept, kind)
        try:
            fut = client.submit_nowait(method, payload, service=service, **fields)
        except WorkerPoolError as exc:
            return "v1", await _error(send, exc.to_wire())
        with contextlib.suppress(WorkerPoolError):  # its outcome is the reply's
            await _unless_gone(fut, scope)
        return "v1", await _send(send, v1_result(fut, out))

    # -- /v1 unary calls from callbacks (http11.Whole) -------------------------------------------
    def wants_whole(self, scope: Scope) -> bool:
        """POST /v1/..., unless it asks for events: answered by ``answer_whole``."""
        return scope["method"] == "POST" and scope["path"].startswith("/v1/") and \
            not sse.wants_events(_header(scope, b"accept"))

    def answer_whole(self, exchange: Any, body: bytes) -> None:
        """Answer a /v1 call whose whole body is read: at once when it is refused, else
        from its Future's callback. The checks, fields and replies are ``call_v1``'s."""
        started = time.monotonic()
        self.answering += 1
        try:
            refused = self._begin_whole(exchange, body, started)
        except Exception:
            log.exception("gateway: POST %s failed", exchange.scope["path"][:200])
            refused = ("v1", _failed())
        if refused is not None:
            self._end_whole(exchange, started, *refused)

    def _begin_whole(self, exchange: Any, body: bytes,
                     started: float) -> tuple[str, Reply] | None:
        """Send the call; None once its callback is set, else (endpoint, refusal)."""
        scope = exchange.scope
        refused = self.refused(scope)
        if refused is not None:
            return "auth", refused
        target = v1_target(scope["path"], "POST")
        if isinstance(target, Reply):
            return "v1", target
        key = self.caller_of(scope)
        conn = self.callers.acquire(key)
        if conn is None:
            return "v1", error_reply(self.limited())
        try:
            kind, fields = v1_head(scope)
            payload = bodies.decode(body, kind)
            out = bodies.accepted(_header(scope, b"accept"), kind)
            fut = self.clients[conn].submit_nowait(target[1], payload, service=target[0],
                                                   **fields)
        except BaseException as exc:
            self.callers.release(key)
            if isinstance(exc, BodyError):
                return "v1", error_reply(exc.error)
            if isinstance(exc, WorkerPoolError):
                return "v1", error_reply(exc.to_wire())
            raise

        def done(fut: asyncio.Future) -> None:
            self.callers.release(key)
            try:
                reply = v1_result(fut, out)
            except BaseException:  # a bug; or cancelled by other than the client leaving
                if not exchange.gone:
                    log.exception("gateway: POST %s failed", scope["path"][:200])
                reply = _failed()
            self._end_whole(exchange, started, "v1", reply)

        fut.add_done_callback(done)
        exchange.when_gone(fut.cancel)  # a CANCEL to the router; done() then counts 499
        return None

    def _end_whole(self, exchange: Any, started: float, endpoint: str, reply: Reply) -> None:
        self.answering -= 1
        if exchange.gone:
            self.metrics.disconnects.inc()
            status = 499
        else:
            status = reply.status
            try:
                exchange.respond(status, reply.head(), reply.body)
            except Exception:  # a bug costs this request, never the server
                log.exception("gateway: answering POST %s failed", exchange.scope["path"][:200])
                exchange.abandon()
        self.metrics.answered(endpoint, status, time.monotonic() - started)

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


# -- /v1 requests and replies ---------------------------------------------------------------------
def v1_target(path: str, method: str) -> tuple[str, str] | Reply:
    """(service, method) that ``/v1/SERVICE/METHOD`` names, or the 404 or 405 reply."""
    service, sep, name = path[4:].partition("/")
    if not service or not sep or not name or "/" in name:
        return error_reply(_not_found(path))
    if method != "POST":
        return error_reply(_not_allowed(method, "POST"))
    return service, name


def v1_head(scope: Scope) -> tuple[str, dict[str, Any]]:
    """The body's encoding and the request's fields, from its head; raises BodyError."""
    return bodies.media_type(_header(scope, b"content-type")), request_fields(scope)


def v1_result(fut: asyncio.Future, out: str) -> Reply:
    """The reply to a /v1 call whose Future is done: its result in the ``out`` encoding,
    or its error. Raises CancelledError for a cancelled Future."""
    try:
        return Reply(200, bodies.encode(fut.result(), out), CONTENT_TYPES[out])
    except WorkerPoolError as exc:
        return error_reply(exc.to_wire())
    except BodyError as exc:
        return error_reply(exc.error)


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


def error_reply(wire: dict, headers: list | tuple = ()) -> Reply:
    """A /v1-style error reply: the table's status and headers, ``{"error": {...}}``."""
    status, extra = status_of(wire)
    out = [(k.encode(), v.encode()) for k, v in extra]
    if "allow" in wire:
        out.append((b"allow", str(wire["allow"]).encode()))
    return Reply(status, error_json(wire), JSON_TYPE, [*out, *headers])


def _failed() -> Reply:
    return error_reply(error_map("WorkerPoolError",
                                 "the gateway failed on this request (see its log)"))


async def _send(send: Send, reply: Reply) -> int:
    await send({"type": "http.response.start", "status": reply.status, "headers": reply.head()})
    await send({"type": "http.response.body", "body": reply.body})
    return reply.status


async def _reply(send: Send, status: int, body: bytes, ctype: bytes = JSON_TYPE,
                 headers: list | None = None) -> int:
    return await _send(send, Reply(status, body, ctype, headers or ()))


async def _error(send: Send, wire: dict, headers: list | None = None) -> int:
    return await _send(send, error_reply(wire, headers or ()))


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
