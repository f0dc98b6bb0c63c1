"""The router's HTTP listener (``--metrics HOST:PORT``): its own thread, fed snapshots.

::

    Prometheus, curl, a browser --GET--> Listener thread (http.server, one request at a time)
                                            | Snapshots.get(): the latest, if fresh; else
                                            | wanted = True, wake the loop, wait for the next
    Router.run (the poll loop) <--wake fd---+
        snapshots.wanted? -> publish(take_snapshot(...))   (attribute stores: no lock)
                                            | ROUTES[path](snapshot) -> status, type, body
                                            v
                                          reply

The loop never waits for the thread: it copies its figures into an immutable ``Snapshot``
only when asked, at most every ``MAX_AGE`` seconds however many scrapes come, and
rendering (text format, JSON) happens here. A scrape that gets no new snapshot within
``SNAPSHOT_WAIT`` (the loop is busy for that long) is answered from the last one, whose
age ``workerpool_snapshot_age_seconds`` shows.

A page is one entry of ``ROUTES``: a path and a function from a snapshot to the reply.
The dashboard's pages need no snapshot of their own (``Listener.pages``): its files are
fixed, and ``/api/history`` is read from the ring (router.history) that the same thread
fills between requests, one snapshot every ``SAMPLE_INTERVAL`` from the moment it starts
(``Listener.sample``). One thread asks for every snapshot, so requests and samples never
wait on each other's hand-over.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from router import exposition
from router.history import MIN_GAP, SAMPLE_INTERVAL, History
from router.metrics import ListenerError, Snapshot
from workerpool.config import format_http_address, parse_http_address

log = logging.getLogger("workerpool.router")

MAX_AGE = 0.1
"""A snapshot at most this old (seconds) answers a request without asking the loop."""
SNAPSHOT_WAIT = 1.0
"""How long a request waits for the loop's next snapshot before it takes the last one."""
REQUEST_TIMEOUT = 5.0
"""Seconds a connection may take to send its request: the thread serves one at a time."""
CLOSE_WAIT = 0.5
"""When the router exits, how long it waits for the listener's request in hand."""

Reply = tuple[int, str, bytes]  # HTTP status, content type, body
Route = Callable[[Snapshot, float], Reply]  # (snapshot, its age in seconds) -> reply
Page = Callable[[], Reply]  # a page that needs no snapshot

DASHBOARD = Path(__file__).with_name("static")
"""The dashboard's files, served as they are: the page at ``/``, the others by name."""
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}


def metrics_page(snap: Snapshot, age: float) -> Reply:
    return 200, exposition.CONTENT_TYPE, exposition.render(snap, age)


def status_page(snap: Snapshot, age: float) -> Reply:
    """The STATUS body (docs/protocol.md, section 6) as JSON."""
    return 200, "application/json", json.dumps(snap.status, sort_keys=True).encode()


def health_page(snap: Snapshot, age: float) -> Reply:
    """Live (200) while the loop hands over a snapshot within ``SNAPSHOT_WAIT`` of being
    asked; 503 once it has not (it is stuck: a liveness probe should restart it). This
    thread answers whatever the loop does, so the age of what it got is the test."""
    live = age < SNAPSHOT_WAIT
    body = {"live": live, "snapshot_age": round(age, 3)}
    if not live:
        body["why"] = f"the router's loop has not answered for {age:.1f}s"
    return (200 if live else 503), "application/json", json.dumps(body).encode()


ROUTES: dict[str, Route] = {
    "/metrics": metrics_page,
    "/api/status": status_page,
    "/healthz": health_page,
}


def dashboard_pages(history: History, folder: Path = DASHBOARD) -> dict[str, Page]:
    """The dashboard: ``/`` (``index.html``), its other files, and ``/api/history``. The
    files are read now, so a page never touches the disk."""
    pages: dict[str, Page] = {}
    for path in sorted(folder.iterdir()):
        ctype = STATIC_TYPES.get(path.suffix)
        if ctype is not None:
            reply = (200, ctype, path.read_bytes())
            pages["/" if path.name == "index.html" else f"/{path.name}"] = lambda r=reply: r
    pages["/api/history"] = lambda: (200, "application/json", json.dumps(
        history.export(time.time()), separators=(",", ":")).encode())
    return pages


class Snapshots:
    """The one hand-over between the loop and the listener thread. The loop reads
    ``wanted`` each pass and calls ``publish``; the thread calls ``get``."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self.wanted = False  # set by the thread, cleared by the loop's publish
        self._stopped = False  # the loop has ended: nothing more will be published
        self._latest: Snapshot | None = None
        self._published: queue.SimpleQueue[None] = queue.SimpleQueue()

    def publish(self, snap: Snapshot) -> None:
        """Loop thread: make ``snap`` the latest. Never blocks (SimpleQueue.put)."""
        self._latest = snap
        self.wanted = False
        self._published.put(None)

    def stop(self) -> None:
        """The loop has ended: requests take the last snapshot without waiting."""
        self._stopped = True
        self._published.put(None)

    def give_up(self) -> None:
        """Loop thread: no snapshot this time (building one failed): stop asking."""
        self.wanted = False

    def get(self, max_age: float = MAX_AGE, wait: float = SNAPSHOT_WAIT) -> Snapshot | None:
        """Listener thread: a snapshot at most ``max_age`` old, asking the loop for one if
        need be; the last one if none comes within ``wait``; None before the first."""
        snap = self._latest
        if self._stopped or (snap is not None and time.monotonic() - snap.taken_at <= max_age):
            return snap
        while True:  # tokens of earlier publishes: not the answer to this request
            try:
                self._published.get_nowait()
            except queue.Empty:
                break
        self.wanted = True
        self._wake()
        try:
            self._published.get(timeout=wait)
        except queue.Empty:
            pass
        return self._latest


class _Server(HTTPServer):
    allow_reuse_address = True  # a port in TIME_WAIT from a previous run is still free

    def __init__(self, host: str, port: int, listener: Listener) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = listener
        super().__init__((host, port), _Handler)

    def service_actions(self) -> None:
        # serve_forever calls this after each request and each idle poll_interval.
        self.listener.sample()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's fully qualified name (DNS): not needed.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _Handler(BaseHTTPRequestHandler):
    server_version = "workerpool"
    protocol_version = "HTTP/1.0"  # one request per connection: the thread is not held open
    timeout = REQUEST_TIMEOUT

    def do_GET(self) -> None:
        self.server.listener.answer(self, head=False)

    def do_HEAD(self) -> None:
        self.server.listener.answer(self, head=True)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics listener: " + format, *args)


class Listener:
    """An HTTP server on ``address`` (``HOST:PORT``), serving ``routes`` from the
    snapshots the loop publishes; ``wake`` makes the loop's poll return.

    Binding happens here, so a taken address fails before anything else starts; the
    thread starts with ``start``. Raises ListenerError when the address cannot be bound.
    """

    def __init__(self, address: str, wake: Callable[[], None],
                 routes: dict[str, Route] | None = None) -> None:
        host, port = parse_http_address(address)
        self.routes = dict(ROUTES if routes is None else routes)
        self.snapshots = Snapshots(wake)
        self.history = History()
        self.pages = dashboard_pages(self.history)
        self._next_sample = 0.0  # monotonic time the history is next due a sample
        self._history_failed = False
        try:
            self._server = _Server(host, port, self)
        except OSError as exc:
            raise ListenerError(f"cannot serve metrics on {address}: {exc.strerror or exc}") \
                from None
        self.address = format_http_address(*self._server.server_address[:2])
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,),
                                        name="metrics-listener", daemon=True)
        self._thread.start()
        log.info("metrics: http://%s/metrics and /api/status; dashboard at http://%s/",
                 self.address, self.address)

    def close(self) -> None:
        """Stop serving; waits at most CLOSE_WAIT for the request in hand."""
        self.snapshots.stop()
        if self._thread is not None:
            # shutdown() returns once the request in hand is done, and a client that sends
            # nothing holds it for REQUEST_TIMEOUT: the router is leaving, so wait less.
            threading.Thread(target=self._server.shutdown, daemon=True).start()
            self._thread.join(CLOSE_WAIT)
        self._server.server_close()

    def sample(self, now: float | None = None) -> None:
        """Listener thread, between requests: once every SAMPLE_INTERVAL, a snapshot into
        the history (a scrape's, when one is fresh enough). ``now``: time.monotonic()."""
        now = time.monotonic() if now is None else now
        if now < self._next_sample:
            return
        self._next_sample = now + SAMPLE_INTERVAL
        snap = self.snapshots.get(max_age=MIN_GAP)
        if snap is None:
            return
        try:
            self.history.record(snap, time.time() - (time.monotonic() - snap.taken_at))
        except Exception:  # a bug costs the history, never the listener
            if not self._history_failed:
                log.exception("metrics listener: recording the history failed")
            self._history_failed = True

    def answer(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        """One request: its page, or its route's reply from a fresh snapshot; or 404 / 503."""
        path = req.path.partition("?")[0]
        page = self.pages.get(path)
        route = self.routes.get(path)
        if page is None and route is not None:
            snap = self.snapshots.get()
            if snap is not None:
                page = functools.partial(route, snap, time.monotonic() - snap.taken_at)
        if page is not None:
            try:
                code, ctype, body = page()
            except Exception:  # a bug costs this page, never the listener
                log.exception("metrics listener: rendering %s failed", req.path)
                code, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        elif route is None:
            code, ctype, body = 404, "text/plain; charset=utf-8", (
                f"no page {req.path[:200]!r}; pages: "
                f"{', '.join(sorted([*self.routes, *self.pages]))}\n").encode()
        else:
            code, ctype, body = 503, "text/plain; charset=utf-8", \
                b"the router has not published its figures yet\n"
        req.send_response(code)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Cache-Control", "no-store")
        req.end_headers()
        if not head:
            req.wfile.write(body)


def probe(address: str) -> None:
    """Raise ListenerError now if ``address`` cannot be bound (``up`` checks before it
    starts anything); the port is free again on return."""
    Listener(address, lambda: None).close()
