"""HTTP/1.1 for the gateway: httptools parses, the ASGI application answers, one write per
response.

::

    bytes --data_received--> httptools parser --callbacks--> Exchange (its scope, its body)
      head complete: a request the Whole handler wants (small, its length known) waits for
                     its body, then the handler answers it from callbacks (no task);
                     any other: the app runs on it as a task,
                     or it waits behind the one being answered
                     (pipelining: answers go out in request order; reading pauses meanwhile)
      app's send(): the status line and headers are held and leave with the first body part
                    as one write (a body over JOIN_LIMIT goes as a second write, not copied)
      response complete: the next pipelined request starts, or the connection waits
                         (keep-alive; closed after KEEP_ALIVE idle seconds, or
                         BODY_TIMEOUT seconds into a body that stopped arriving)
      connection lost: the app's callbacks for that exchange run (it cancels the request
                       at the router); receive() then says http.disconnect

The application is plain ASGI (``http`` scopes only) plus one extension,
``scope["extensions"]["workerpool.connection"]``: the Exchange, whose ``when_gone``
tells the app at once when its client leaves, without a task per request that waits on
``receive()``. Measured against uvicorn with the same application (docs/http.md), this
is what cut most of the gateway's own CPU per request: uvicorn's per-request scope,
cycle object, flow-control and event objects and two writes cost about five times a
bare httptools protocol's handling of the same request.

A task and a coroutine chain per request still cost the gateway about a tenth of its CPU
on a quick call (docs/benchmarks.md). So the server also takes an optional ``Whole``
handler: a request it wants, whose body is at most ``WHOLE_MAX_BYTES`` with a known length,
is given to it whole once read, and answered with ``Exchange.respond`` from whatever
callback has the answer. What such a request holds is bounded as the ASGI path's is: it
is never more than one unpaused read's worth of body.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote

import httptools

from workerpool.gateway.statuses import error_json, error_map

log = logging.getLogger("workerpool.gateway")

MAX_HEAD_BYTES = 65536
"""Bytes of request line and headers one request may have (431 past it): a client's
bytes never make the gateway hold more than this before a request runs."""
MAX_HEADERS = 128
"""Header lines one request may have (431 past it)."""
MAX_PIPELINE = 64
"""Requests read ahead of the one being answered on a connection (400 past it): one read
of many tiny pipelined requests cannot make the gateway hold thousands."""
BODY_HIGH_WATER = 262144
"""Request-body bytes held for the app before the connection stops reading."""
WHOLE_MAX_BYTES = BODY_HIGH_WATER
"""The largest declared body a ``Whole`` handler is given whole; a larger one, or one
sent in chunks, goes to the ASGI app, which reads it as it comes."""
JOIN_LIMIT = 65536
"""Body bytes joined to the response head into one write; past this the copy costs more
than the second write it saves (a large tensor reply goes as head, then body)."""
KEEP_ALIVE = 5.0
"""Seconds an idle keep-alive connection is kept."""
BODY_TIMEOUT = 30.0
"""Seconds a request's body may stop arriving before its connection is closed (the app
then sees the client leave): a client cannot hold a request open by never finishing it."""
SWEEP = 1.0
"""Seconds between looks for idle connections (and updates of the Date header)."""
ASGI = {"version": "3.0", "spec_version": "2.3"}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _status_line(code: int) -> bytes:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (code, phrase.encode("ascii"))


STATUS_LINES = {status.value: _status_line(status.value) for status in HTTPStatus}


class Whole(Protocol):
    """Answers some requests from their whole body, without a task each."""

    def wants_whole(self, scope: dict) -> bool:
        """Whether to answer the request of ``scope`` (its head read, no body yet)."""

    def answer_whole(self, exchange: Exchange, body: bytes) -> None:
        """Answer ``exchange`` (its ``scope``, its whole ``body``): now or from a later
        callback, by ``exchange.respond`` once; ``exchange.when_gone`` says if the
        client leaves first. An exception raised here ends the connection after a 500."""


class _HeadTooLarge(Exception):
    """Raised in a parser callback: the request's head is over the limits."""


class _PipelineFull(Exception):
    """Raised in a parser callback: ``MAX_PIPELINE`` requests already wait on the
    connection."""


class _UpgradeWithBody(Exception):
    """Raised in a parser callback: an ``Upgrade`` request with a body, which the parser
    leaves unread (it belongs to the other protocol), so the app would get none."""


class Exchange:
    """One request and its response on a connection: the ASGI ``receive`` and ``send``,
    and the ``workerpool.connection`` extension the application is given."""

    __slots__ = ("_on_gone", "body", "buffered", "chunked", "complete", "conn",
                 "continue_wanted", "ended", "gone", "head", "head_only", "keep_alive",
                 "more_body", "scope", "started", "version_1_0", "waiter", "whole")

    def __init__(self, conn: HttpConnection, scope: dict, keep_alive: bool,
                 continue_wanted: bool) -> None:
        self.conn = conn
        self.scope: dict | None = scope  # until the app runs: see run()
        self.version_1_0 = scope["http_version"] == "1.0"
        self.body: list[bytes] = []  # request bytes the app has not received yet
        self.buffered = 0
        self.more_body = True  # the request's body is not all parsed yet
        self.ended = False  # the app has been told the body ended
        self.waiter: asyncio.Future | None = None  # receive() waiting for bytes
        self.keep_alive = keep_alive
        self.continue_wanted = continue_wanted  # Expect: 100-continue, not answered yet
        self.head: bytes | None = None  # status line and headers, held for the body
        self.head_only = scope["method"] == "HEAD"
        self.chunked = False
        self.started = False
        self.complete = False
        self.gone = False  # the client left before the response was complete
        self.whole = False  # answered by the server's Whole handler, not the ASGI app
        self._on_gone: list[Callable[[], Any]] = []

    # -- the extension -----------------------------------------------------------------------
    def when_gone(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` if the client leaves before the response is complete (now,
        if it has left already)."""
        if self.gone:
            callback()
        elif not self.complete:
            self._on_gone.append(callback)

    def lose(self) -> None:
        """The connection is gone: wake ``receive`` and run the callbacks."""
        if self.gone or self.complete:
            return
        self.gone = True
        if self.whole:
            self.conn.server.whole_done()
        self._wake()
        callbacks, self._on_gone = self._on_gone, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("gateway: a callback for a client that left failed")

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- parser side ------------------------------------------------------------------------
    def add_body(self, data: bytes) -> None:
        if self.complete or self.gone:
            return  # answered before it was read: the rest is read and dropped
        self.body.append(data)
        self.buffered += len(data)
        if self.buffered > BODY_HIGH_WATER:
            self.conn.pause_reading()
        self._wake()

    def end_body(self) -> None:
        self.more_body = False
        self._wake()

    # -- ASGI -------------------------------------------------------------------------------
    async def receive(self) -> dict:
        if self.continue_wanted:
            self.continue_wanted = False
            if self.more_body and not self.started and not self.gone:
                self.conn.transport.write(CONTINUE)  # the client holds its body until this
        while True:
            if self.gone or self.complete:
                return {"type": "http.disconnect"}
            if self.body or (not self.more_body and not self.ended):
                chunks, self.body, self.buffered = self.body, [], 0
                self.ended = not self.more_body
                self.conn.resume_reading()
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                return {"type": "http.request", "body": data, "more_body": self.more_body}
            self.conn.resume_reading()
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    async def send(self, message: dict) -> None:
        conn = self.conn
        if conn.write_paused is not None and not self.gone:
            await conn.write_paused  # a slow reader: the app waits, nothing piles up here
        if self.gone:
            return
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected http.response.start, not {kind}")
            self.started = True
            self.head = self._head(message["status"], message.get("headers", ()))
            self.continue_wanted = False
            return
        if kind != "http.response.body" or self.complete:
            raise RuntimeError(f"unexpected {kind} after the response")
        self._write(message.get("body", b""), message.get("more_body", False))

    def respond(self, status: int, headers: Any, body: bytes) -> None:
        """The whole response, in one write: how a ``Whole`` handler answers. Nothing is
        written once the client has left. It does not wait for a client that reads
        slowly: no request is handed to the Whole handler while the connection's writes
        are paused, so the transport holds at most one such response past its limit."""
        if self.gone:
            return
        if self.started:
            raise RuntimeError("respond() after the response began")
        self.started = True
        self.head = self._head(status, headers)
        self._write(body, False)

    def _write(self, body: bytes, more: bool) -> None:
        conn = self.conn
        if self.head_only:
            body = b""
        elif self.chunked:
            body = (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + \
                (b"" if more else b"0\r\n\r\n")
        head, self.head = self.head, None
        write = conn.transport.write
        if head is None:
            if body:
                write(body)
        elif len(body) <= JOIN_LIMIT:
            write(head + body)
        else:
            write(head)
            write(body)
        if not more:
            self.complete = True
            self._on_gone = []
            self._wake()
            if self.whole:
                conn.server.whole_done()
            conn.answered(self)

    def _head(self, status: int, headers: Any) -> bytes:
        lines = [STATUS_LINES.get(status) or _status_line(status), self.conn.server.date]
        sized = False
        for name, value in headers:  # the app's own headers: no client bytes reach them
            if name == b"content-length":
                sized = True
            elif name == b"connection" and b"close" in value.lower():
                self.keep_alive = False
            lines += (name, b": ", value, b"\r\n")
        if not sized and status not in (204, 304) and not self.head_only:
            if self.version_1_0:
                self.keep_alive = False  # no chunks in HTTP/1.0: the close ends the body
            else:
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
        if self.more_body and self.continue_wanted:
            # Answered before a body the client was told to hold: it may never come, so
            # the connection cannot tell where the next request begins.
            self.keep_alive = False
        if self.conn.server.closing:
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    async def run(self, app: Callable[..., Awaitable[None]]) -> None:
        # The scope holds this exchange (its extension): kept here too, the two would be a
        # reference cycle per request, freed only by the garbage collector, whose pauses
        # then showed in the tail latency. The running coroutine holds the scope instead.
        scope, self.scope = self.scope, None
        try:
            await app(scope, self.receive, self.send)
        except Exception:
            log.exception("gateway: the application failed on %s %s", scope["method"],
                          scope["path"][:200])
            self.abandon()
        else:
            if not self.complete and not self.gone:
                log.error("gateway: the application returned without completing its "
                          "response to %s %s", scope["method"], scope["path"][:200])
                self.abandon()

    def abandon(self) -> None:
        """No whole response will come (the app failed): a 500 if nothing was sent yet,
        then close."""
        if self.gone:
            return
        if not self.started:
            self.conn.transport.write(STATUS_LINES[500] + b"content-type: text/plain\r\n"
                                      b"content-length: 21\r\nconnection: close\r\n\r\n"
                                      b"Internal Server Error")
        if self.whole and not self.complete:
            self.conn.server.whole_done()
        self.complete = True
        self.conn.transport.close()


class HttpConnection(asyncio.Protocol):
    """One client connection: parses its requests and answers them in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.client: tuple | None = None
        self.sockname: tuple | None = None
        self.current: Exchange | None = None  # the exchange the app is answering
        self.reading: Exchange | None = None  # the exchange whose body is being parsed
        self.pipeline: collections.deque[Exchange] = collections.deque()
        self.read_paused = False
        self.write_paused: asyncio.Future | None = None
        self.last_active = time.monotonic()
        self.done_reading = False  # after an unreadable request or an upgrade
        self.refused: tuple[int, str] | None = None  # an error owed after the answers due
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._continue = False
        self._length: int | None = None  # the request's Content-Length
        self._chunked = False  # Transfer-Encoding named

    # -- transport events -------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = tuple(peer[:2]) if isinstance(peer, tuple) else None
        own = transport.get_extra_info("sockname")
        self.sockname = tuple(own[:2]) if isinstance(own, tuple) else None
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for exchange in (self.current, self.reading):
            if exchange is not None:
                exchange.lose()
        self.pipeline.clear()
        self.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self.done_reading:
            return  # nothing after an unreadable request (or an upgrade) is read
        self.last_active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if cause is not None and not isinstance(cause, Exception):
                raise cause from None  # KeyboardInterrupt, SystemExit: not the client's doing
            if isinstance(cause, _HeadTooLarge):
                self.refuse(431, f"a request head is over {MAX_HEAD_BYTES} bytes or "
                                 f"{MAX_HEADERS} header lines")
            elif isinstance(cause, _PipelineFull):
                self.refuse(400, f"more than {MAX_PIPELINE} requests pipelined on one "
                                 "connection")
            elif isinstance(cause, _UpgradeWithBody):
                self.refuse(400, "a request that asks for another protocol (Upgrade) "
                                 "cannot have a body here")
            else:
                log.exception("gateway: reading a request failed")
                self.refuse(400, "the request could not be read")
        except httptools.HttpParserUpgrade:
            self._last_request()
        except httptools.HttpParserError as exc:
            self.refuse(400, f"malformed HTTP/1.1 request: {exc}")

    def pause_writing(self) -> None:
        if self.write_paused is None:
            self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        waiter, self.write_paused = self.write_paused, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_reading(self) -> None:
        if not self.read_paused and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.pipeline and not self.done_reading and (
                self.reading is None or self.reading.buffered <= BODY_HIGH_WATER):
            self.read_paused = False
            self.transport.resume_reading()

    # -- parser callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._continue = False
        self._length = None
        self._chunked = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES or len(self._headers) >= MAX_HEADERS:
            raise _HeadTooLarge
        name = name.lower()
        value = value.rstrip(b" \t")
        if name == b"content-length":
            self._length = int(value) if value.isdigit() else None
        elif name == b"transfer-encoding":
            self._chunked = True
        elif name == b"expect" and value.lower() == b"100-continue":
            self._continue = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        if len(self.pipeline) >= MAX_PIPELINE:
            raise _PipelineFull
        if parser.should_upgrade() and any(
                (name == b"content-length" and value != b"0") or name == b"transfer-encoding"
                for name, value in self._headers):
            raise _UpgradeWithBody
        url = httptools.parse_url(self._url)  # HttpParserInvalidURLError: a 400
        raw_path = url.path
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path, encoding="latin-1")
        scope = {"type": "http", "asgi": ASGI, "http_version": parser.get_http_version(),
                 "method": parser.get_method().decode("ascii"), "scheme": self.server.scheme,
                 "path": path, "raw_path": raw_path, "query_string": url.query or b"",
                 "root_path": "", "headers": self._headers, "client": self.client,
                 "server": self.sockname, "extensions": {}}
        exchange = Exchange(self, scope, parser.should_keep_alive(), self._continue)
        self.reading = exchange
        whole = self.server.whole
        if self.current is None and whole is not None and self.write_paused is None \
                and not self._continue \
                and not self._chunked and (self._length or 0) <= WHOLE_MAX_BYTES \
                and whole.wants_whole(scope):
            exchange.whole = True  # answered when its body is in: on_message_complete
            self.current = exchange
            self.server.whole_open += 1
        elif self.current is None:
            self._start(exchange)
        else:  # pipelined: answered after the one before it
            self.pipeline.append(exchange)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        self.reading.add_body(body)

    def on_message_complete(self) -> None:
        exchange, self.reading = self.reading, None
        if not exchange.whole:
            exchange.end_body()
        elif not exchange.gone:
            chunks, exchange.body, exchange.buffered = exchange.body, [], 0
            try:
                self.server.whole.answer_whole(
                    exchange, chunks[0] if len(chunks) == 1 else b"".join(chunks))
            except Exception:
                log.exception("gateway: answering %s %s failed", exchange.scope["method"],
                              exchange.scope["path"][:200])
                exchange.abandon()

    # -- answers ----------------------------------------------------------------------------
    def _start(self, exchange: Exchange) -> None:
        self.current = exchange
        exchange.scope["extensions"]["workerpool.connection"] = exchange
        task = self.loop.create_task(exchange.run(self.server.app))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    def answered(self, exchange: Exchange) -> None:
        """``exchange``'s response is complete: start the next, or wait for one."""
        self.current = None
        self.last_active = time.monotonic()
        if not exchange.keep_alive or self.transport.is_closing():
            self.pipeline.clear()
            self.transport.close()
        elif self.pipeline:
            self._start(self.pipeline.popleft())
            self.resume_reading()
        elif self.refused is not None:
            self._write_refusal()
        else:
            self.resume_reading()

    def refuse(self, status: int, message: str) -> None:
        """A request that cannot be read: answer those read before it, in order, then
        ``status``, and close: nothing after it on this connection can be framed."""
        if self.done_reading:
            return
        self.done_reading = True
        self.refused = (status, message)
        self.pause_reading()
        reading, self.reading = self.reading, None
        if reading is self.current and reading is not None:
            reading.lose()  # its own body is unreadable: the refusal is its answer
            if reading.started:
                self.transport.close()
                return
            self.current = None
        elif reading is not None:
            self.pipeline.pop()  # queued, its body unreadable: never to be answered
        if self.current is None:
            self._write_refusal()

    def _last_request(self) -> None:
        """The request just read asked for another protocol (WebSocket, h2c). It is
        answered in HTTP/1.1, as a server that ignores ``Upgrade`` may; what follows it
        is in a protocol not served here, so nothing more is read and the connection
        closes after its answer."""
        self.done_reading = True
        self.pause_reading()
        last = self.pipeline[-1] if self.pipeline else self.current
        if last is None:
            self.transport.close()
        else:
            last.keep_alive = False

    def _write_refusal(self) -> None:
        status, message = self.refused
        body = error_json(error_map("ProtocolError", message, code="bad-http"))
        self.transport.write(b"".join((
            STATUS_LINES[status], self.server.date, b"content-type: application/json\r\n",
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body)))
        self.transport.close()

    def shut(self) -> None:
        """The server is stopping: close now if idle, else after the current answer."""
        if self.current is None:
            self.transport.close()
        else:
            self.pipeline.clear()
            self.current.keep_alive = False


class HttpServer:
    """Serves ``app`` on a listening socket: the connections, the idle sweep and the Date
    header, and a stop that lets answers in flight finish."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, whole: Whole | None = None,
                 scheme: str = "http", keep_alive: float = KEEP_ALIVE,
                 body_timeout: float = BODY_TIMEOUT) -> None:
        self.app = app
        self.whole = whole
        self.whole_open = 0  # Whole-handled requests not yet answered (nor their client gone)
        self._whole_drained: asyncio.Future | None = None  # stop() waits on it
        self.scheme = scheme
        self.keep_alive = keep_alive
        self.body_timeout = body_timeout
        self.connections: set[HttpConnection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.closing = False
        self.date = b""
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self, sock: Any, ssl: Any = None, backlog: int = 2048) -> None:
        """Serve on ``sock`` (bound and listening) from now, TLS when ``ssl`` is given."""
        self.loop = asyncio.get_running_loop()
        self._update_date()
        self._server = await self.loop.create_server(
            lambda: HttpConnection(self), sock=sock, ssl=ssl, backlog=backlog)
        self._sweeper = self.loop.create_task(self._sweep())

    def whole_done(self) -> None:
        """A Whole-handled request was answered, or its client left."""
        self.whole_open -= 1
        waiter = self._whole_drained
        if not self.whole_open and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _update_date(self) -> None:
        self.date = b"date: %b\r\n" % formatdate(usegmt=True).encode("ascii")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP)
            self._update_date()
            now = time.monotonic()
            idle, stalled = now - self.keep_alive, now - self.body_timeout
            for conn in list(self.connections):
                if conn.current is None and not conn.pipeline:
                    if conn.last_active < idle:
                        conn.transport.close()
                elif conn.reading is not None and not conn.read_paused \
                        and conn.last_active < stalled:  # paused: the app is behind, not it
                    log.info("gateway: closing a connection whose request body stalled "
                             "for %.0f s", self.body_timeout)
                    conn.transport.close()

    async def stop(self, timeout: float) -> None:
        """Stop accepting; close idle connections; give answers in flight ``timeout``
        seconds, then cancel what is left and close every connection."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shut()
        waiting = set(self.tasks)
        if self.whole_open:
            self._whole_drained = self.loop.create_future()
            waiting.add(self._whole_drained)
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.connections):
            conn.transport.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=1.0)
