"""workerpool against mosec and LitServe, side by side in one run: a no-op echo on 2
workers each.

::

    workerpool:  Client / AsyncClient --tcp 127.0.0.1--> router --> 2 Echo workers
    mosec:       HTTP/1.1 keep-alive client --tcp 127.0.0.1--> Rust front --> 2 Python workers
    LitServe:    HTTP/1.1 keep-alive client --tcp 127.0.0.1--> 2 uvicorn processes
                 --multiprocessing queues--> 2 Python workers
    zmqproxy:    raw DEALER --tcp 127.0.0.1--> libzmq's proxy (C) --> 2 Python echo workers

``zmqproxy`` is the floor, not a peer: ``bench/baseline_broker.py proxy``, libzmq's own
forwarding loop with no Python per message in front of echo workers that send each message
back unchanged, driven by one raw DEALER socket (bench/throughput.py ``drive_dealer``). What
it reaches is the most any design reaches that puts a broker process between Python
clients and Python workers over ZeroMQ, as workerpool does; it runs in ``plain`` mode only
(it cannot batch) and its ratio to the best peer is printed beside workerpool's.

Each system runs in two modes, each started fresh in its own process group (always stopped
as a whole, on errors and Ctrl-C too):

- ``plain``: ``workerpool up --frontend tcp://127.0.0.1:PORT --handler
  workerpool.handlers:Echo --workers 2`` (every other setting default, so ``max_inflight``
  1); mosec: ``bench/mosec_server.py --workers 2``, whose worker echoes the body's bytes;
  LitServe: ``bench/litserve_server.py --workers 2``, whose ``predict`` returns its input.
- ``batched``, dynamic batching of up to 16 requests waiting at most 2 ms:
  ``--handler workerpool.handlers:BatchedEcho`` (its ``echo`` is ``@batched(16, 2 ms)``,
  ``max_inflight`` then defaults to 32); mosec and LitServe: ``--max-batch-size 16
  --max-wait-ms 2``.

Drivers, the same shape for every system; request n carries ``{"i": n}`` (msgpack for
workerpool; for the HTTP peers the JSON text ``{"i":n}`` as ``application/json``, written
as FastAPI writes JSON, so LitServe's reply can be compared byte for byte) and every
reply is checked: the same value back (workerpool), or status 200 with the same body (the
HTTP peers). A failed or wrong reply counts as an error.

- ``1 outstanding``: one request at a time (``Client.call``; one raw keep-alive HTTP
  connection): req/s, p50, p99.
- ``64 outstanding`` (``--outstanding``), closed loop, each reply making room for the next:
  ``Client.submit`` with a done-callback (bench/throughput.py ``drive_futures``);
  ``AsyncClient``, 64 asyncio tasks awaiting ``call`` in turn on one client; an HTTP peer,
  64 keep-alive HTTP/1.1 connections with one request each (no pipelining), driven by one
  thread over epoll, the request bytes built and the response parsed by hand (status
  line, content-length): no header objects, no event-loop layers, no thread hand-off per
  request. One at a time, http.client managed 0.6x the req/s of the loop by hand (3.9k
  against 6.5k). At 64 outstanding (2-core VM, under load, 4 x 3 s), this client spent
  27-33 us of its own CPU per request, an asyncio ``Protocol`` with 64 connections
  25-35 us, and the same epoll loop in 2 or 4 threads (``--http-threads``) 33-38 us, at
  req/s within the run's noise of each other: one thread leaves the servers the most CPU.

Each leg runs ``--warmup`` seconds uncounted, then counts the requests sent in the next
``--duration`` seconds (req/s = those answered / duration; latency from just before the
send to the reply, in the HDR histograms of ``workerpool loadtest``). Rounds alternate
the systems' order (forward, then reversed); each figure is the median over ``--rounds``.
Ratios, each against the best peer in the run (the HTTP peer with the most req/s, or the
lowest p50, for that mode and driver, named in the line): workerpool req/s for each mode
and driver (goals: >= 1.0 one at a time, and with batching at 64 outstanding), p50 one at
a time, and AsyncClient/Client at 64 outstanding (goal >= 0.9).

mosec and LitServe are benchmark-only dependencies, not the project's (a missing one is
named with this command; leave it out with ``--systems``)::

    .venv/bin/pip install mosec==0.9.8 litserve==0.2.19

Usage (on an otherwise idle machine)::

    .venv/bin/python bench/peers.py --rounds 3 --duration 5          # table and ratios
    .venv/bin/python bench/peers.py --rounds 3 --duration 5 --json   # one JSON object
    .venv/bin/python bench/peers.py --systems workerpool,mosec       # without LitServe
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import operator
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
for path in (REPO, BENCH):
    if path not in sys.path:
        sys.path.insert(0, path)

import _pool  # noqa: E402  (process handling shared by the bench scripts)
import throughput as tp  # noqa: E402  (Stamps, drive_futures, the table helpers)
from _pool import BenchError  # noqa: E402

from workerpool import AsyncClient, Client  # noqa: E402

WORKERS = 2
BATCH_SIZE = 16
BATCH_WAIT_MS = 2
REQUEST_TIMEOUT = 30.0  # seconds: a request never waits longer, so no leg can hang
MODES = ("plain", "batched")
HANDLERS = {"plain": "workerpool.handlers:Echo", "batched": "workerpool.handlers:BatchedEcho"}
GOAL_VS_PEERS = 1.0  # workerpool req/s >= the best peer's, one at a time and batched at 64
GOAL_ASYNC_VS_SYNC = 0.9  # AsyncClient req/s >= 0.9x Client's at 64 outstanding


class HttpPeer(NamedTuple):
    """An HTTP server measured beside workerpool: its bench script (which takes ``--port``,
    ``--workers``, ``--max-batch-size`` and ``--max-wait-ms``) and how to reach it."""

    package: str  # what it imports, and the distribution to install
    version: str  # the version measured and named in the install hint
    script: str
    ready: str  # the script's stdout line once it serves
    path: str  # the endpoint taking the JSON body


HTTP_PEERS = {
    "mosec": HttpPeer("mosec", "0.9.8", os.path.join(BENCH, "mosec_server.py"), "mosec ready",
                      "/inference"),
    "litserve": HttpPeer("litserve", "0.2.19", os.path.join(BENCH, "litserve_server.py"),
                         "litserve ready", "/predict"),
}
FLOOR = "zmqproxy"
SYSTEMS = ("workerpool", *HTTP_PEERS, FLOOR)
DRIVERS = {"workerpool": ("one", "many", "many_async"),
           **{peer: ("one", "many") for peer in HTTP_PEERS}, FLOOR: ("one", "many")}
MODES_OF = {FLOOR: ("plain",)}  # a proxy of single messages has nothing to batch


def driver_label(system: str, driver: str, outstanding: int) -> str:
    """How a leg's driver reads in the table."""
    if system == FLOOR:
        return f"{1 if driver == 'one' else outstanding} outstanding, raw DEALER"
    if driver == "one":
        return "1 outstanding, " + ("Client.call" if system == "workerpool" else "HTTP")
    how = {"many": "Client.submit" if system == "workerpool" else f"HTTP, {outstanding} conns",
           "many_async": "AsyncClient"}[driver]
    return f"{outstanding} outstanding, {how}"


# -- HTTP/1.1 by hand -------------------------------------------------------------------------
def parse_response(buf: bytes) -> tuple[int, bytes, int] | None:
    """The first complete HTTP/1.1 response in ``buf``: (status, body, bytes it took), or
    None while it is incomplete. Raises ``BenchError`` for a response this client cannot
    frame (no content-length: mosec and uvicorn always send one for a plain reply)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].lower()
    if not head.startswith(b"http/1.1 "):
        raise BenchError(f"not an HTTP/1.1 response: {buf[:40]!r}")
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        raise BenchError(f"response without content-length: {buf[:end]!r}")
    eol = head.find(b"\r\n", at + 2)
    length = int(head[at + 17:eol if eol >= 0 else end])
    total = end + 4 + length
    if len(buf) < total:
        return None
    return int(head[9:12]), buf[end + 4:total], total


class HttpAddress(NamedTuple):
    """Where an HTTP peer takes the benchmark's POSTs."""

    host: str
    port: int
    path: str


class HttpLane:
    """One keep-alive HTTP/1.1 connection carrying at most one request at a time."""

    def __init__(self, address: HttpAddress) -> None:
        host, port, path = address
        self.sock = socket.create_connection((host, port), timeout=REQUEST_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.prefix = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                       "Content-Type: application/json\r\nContent-Length: ").encode()
        self.buf = b""
        self.body = b""  # the body in flight, which the reply must echo
        self.t_send = 0.0

    def send(self, n: int) -> None:
        self.body = b'{"i":%d}' % n
        self.t_send = time.perf_counter()
        self.sock.sendall(b"%s%d\r\n\r\n%s" % (self.prefix, len(self.body), self.body))

    def read(self) -> tuple[bool, BaseException | None]:
        """Read what arrived: (reply complete, its error or None). Raises ``OSError`` when
        the connection broke."""
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionResetError("the server closed the connection")
        self.buf += data
        reply = parse_response(self.buf)
        if reply is None:
            return False, None
        status, body, used = reply
        self.buf = self.buf[used:]
        if status != 200 or body != self.body:
            return True, BenchError(f"HTTP {status}, body {body[:80]!r} for {self.body!r}")
        return True, None

    def close(self) -> None:
        self.sock.close()


# -- drivers ----------------------------------------------------------------------------------
def drive_one(system: str, call: Callable[[int], BaseException | None], warmup: float,
              duration: float) -> tp.Result:
    """One request at a time: ``call(n)`` returns None for a right reply, else the error."""
    stamps = tp.Stamps()
    t_end = stamps.start + warmup + duration
    n = 0
    while (t := time.perf_counter()) < t_end:
        try:
            err = call(n)
        except Exception as exc:  # a benchmark counts every failure and goes on
            err = exc
        stamps.done(t, err)
        n += 1
    return stamps.result(system, warmup, duration)


def echoed(payload: Any, result: Any) -> BaseException | None:
    """None when ``result`` is ``payload`` echoed, else the error to count."""
    return None if result == payload else BenchError(f"wrong reply {result!r} to {payload!r}")


def workerpool_one(system: str, frontend: str, args: argparse.Namespace) -> tp.Result:
    with Client(frontend) as client:
        def call(n: int) -> BaseException | None:
            p = {"i": n}
            return echoed(p, client.call("echo", p, timeout=REQUEST_TIMEOUT))
        return drive_one(system, call, args.warmup, args.duration)


def workerpool_many(system: str, frontend: str, args: argparse.Namespace) -> tp.Result:
    with Client(frontend) as client:
        return tp.drive_futures(
            system, lambda p: client.submit("echo", p, timeout=REQUEST_TIMEOUT),
            lambda n: {"i": n}, args.outstanding, args.warmup, args.duration,
            check=operator.eq)


def workerpool_many_async(system: str, frontend: str, args: argparse.Namespace) -> tp.Result:
    async def run() -> tp.Result:
        stamps = tp.Stamps()
        t_end = stamps.start + args.warmup + args.duration
        async with AsyncClient(frontend) as client:
            async def task(n: int) -> None:
                while (t := time.perf_counter()) < t_end:
                    p = {"i": n}
                    try:
                        err = echoed(p, await client.call("echo", p, timeout=REQUEST_TIMEOUT))
                    except Exception as exc:
                        err = exc
                    stamps.done(t, err)
                    n += args.outstanding
            await asyncio.gather(*(task(k) for k in range(args.outstanding)))
        return stamps.result(system, args.warmup, args.duration)
    return asyncio.run(run())


def http_one(system: str, address: HttpAddress, args: argparse.Namespace) -> tp.Result:
    lane: list[HttpLane] = []  # the connection, reopened after one broke

    def call(n: int) -> BaseException | None:
        if not lane:
            lane.append(HttpLane(address))
        try:
            lane[0].send(n)
            while True:
                complete, err = lane[0].read()
                if complete:
                    return err
        except OSError:
            lane.pop().close()
            raise

    try:
        return drive_one(system, call, args.warmup, args.duration)
    finally:
        for conn in lane:
            conn.close()


def http_lanes(system: str, address: HttpAddress, count: int, numbers: Iterator[int],
               stamps: tp.Stamps, t_end: float) -> int:
    """``count`` connections, one request on each, read by one thread whichever is ready
    (epoll) until ``t_end``, then drained; a broken connection counts an error and is
    replaced. Returns how many requests were still unanswered at the end."""
    poller = select.epoll()
    lanes: dict[int, HttpLane] = {}  # fd -> connection with a request in flight

    def start(lane: HttpLane | None = None) -> None:
        lane = lane or HttpLane(address)
        if lane.sock.fileno() not in lanes:
            poller.register(lane.sock.fileno(), select.EPOLLIN)
            lanes[lane.sock.fileno()] = lane
        lane.send(next(numbers))

    def retire(lane: HttpLane) -> None:
        poller.unregister(lane.sock.fileno())
        del lanes[lane.sock.fileno()]
        lane.close()

    try:
        for _ in range(count):
            start()
        drain_deadline = None
        while lanes:
            now = time.perf_counter()
            if now >= t_end:
                drain_deadline = drain_deadline or now + tp.DRAIN_TIMEOUT
                if now > drain_deadline:
                    break
            events = poller.poll(0.5)
            if not events:
                stamps.check_stall(system)
                continue
            for fd, _ in events:
                lane = lanes[fd]
                try:
                    complete, err = lane.read()
                except OSError as exc:
                    stamps.done(lane.t_send, exc)
                    retire(lane)
                    if time.perf_counter() < t_end:
                        start()
                    continue
                if not complete:
                    continue
                stamps.done(lane.t_send, err)
                if time.perf_counter() >= t_end:
                    retire(lane)
                    continue
                try:
                    start(lane)
                except OSError as exc:  # the connection broke under the send
                    stamps.done(lane.t_send, exc)
                    retire(lane)
                    start()
        return len(lanes)
    except ConnectionRefusedError as exc:
        raise BenchError(f"{system}: the server stopped accepting connections: {exc}") from exc
    finally:
        for lane in lanes.values():
            lane.close()
        poller.close()


def http_many(system: str, address: HttpAddress, args: argparse.Namespace) -> tp.Result:
    """``--outstanding`` connections shared out over ``--http-threads`` threads, each
    running ``http_lanes`` on its share (the first in this thread)."""
    stamps = tp.Stamps()
    t_end = stamps.start + args.warmup + args.duration
    k = args.http_threads
    shares = [args.outstanding // k + (i < args.outstanding % k) for i in range(k)]
    unfinished: list[int] = []
    failed: list[BaseException] = []

    def lanes(i: int) -> None:
        try:
            unfinished.append(http_lanes(system, address, shares[i], itertools.count(i, k),
                                         stamps, t_end))
        except Exception as exc:
            failed.append(exc)

    others = [threading.Thread(target=lanes, args=(i,), daemon=True) for i in range(1, k)
              if shares[i]]
    for t in others:
        t.start()
    lanes(0)
    for t in others:
        t.join()
    if failed:
        raise failed[0]
    res = stamps.result(system, args.warmup, args.duration)
    res.notes["unfinished_at_exit"] = sum(unfinished)
    return res


RUNNERS: dict[tuple[str, str], Callable[[str, Any, argparse.Namespace], tp.Result]] = {
    ("workerpool", "one"): workerpool_one,
    ("workerpool", "many"): workerpool_many,
    ("workerpool", "many_async"): workerpool_many_async,
    **{(peer, "one"): http_one for peer in HTTP_PEERS},
    **{(peer, "many"): http_many for peer in HTTP_PEERS},
    (FLOOR, "one"): lambda label, frontend, args: tp.drive_dealer(
        label, [frontend], 1, args.warmup, args.duration, 0),
    (FLOOR, "many"): lambda label, frontend, args: tp.drive_dealer(
        label, [frontend], args.outstanding, args.warmup, args.duration, 0),
}


# -- the servers ------------------------------------------------------------------------------
@contextlib.contextmanager
def http_peer(system: str, mode: str, workdir: str
              ) -> Iterator[tuple[HttpAddress, list[str], subprocess.Popen]]:
    """Start the HTTP peer ``system`` in ``mode`` on a free loopback port, in its own process
    group; yield (its address, its argv, its process: the group's leader). The whole group
    is stopped on the way out, on errors and Ctrl-C too."""
    peer = HTTP_PEERS[system]
    port = _pool.free_tcp_port()
    argv = [sys.executable, peer.script, "--workers", str(WORKERS), "--port", str(port)]
    if system == "mosec":
        argv += ["--path", os.path.join(workdir, f"mosec-{port}")]  # its unix sockets
    if mode == "batched":
        argv += ["--max-batch-size", str(BATCH_SIZE), "--max-wait-ms", str(BATCH_WAIT_MS)]
    with _pool.process_group(argv, peer.ready, workdir, f"{system}-{mode}") as proc:
        yield HttpAddress("127.0.0.1", port, peer.path), argv, proc


@contextlib.contextmanager
def serve(system: str, mode: str, workdir: str) -> Iterator[tuple[Any, list[str]]]:
    """Start ``system`` in ``mode``; yield (where the drivers reach it, its argv)."""
    if system == "workerpool":
        port = _pool.free_tcp_port()
        with _pool.pool(workdir, f"workerpool-{mode}", handler=HANDLERS[mode], workers=WORKERS,
                        frontend=f"tcp://127.0.0.1:{port}") as (_, frontend, argv):
            yield frontend, argv
        return
    if system == FLOOR:
        frontend = f"tcp://127.0.0.1:{_pool.free_tcp_port()}"
        argv = [sys.executable, tp.BROKER_SCRIPT, "proxy", "--frontend", frontend,
                "--workers", str(WORKERS)]
        with _pool.process_group(argv, "baseline ready", workdir, FLOOR):
            yield frontend, argv
        return
    with http_peer(system, mode, workdir) as (address, argv, _):
        yield address, argv


def run_rounds(systems: list[str], args: argparse.Namespace, workdir: str
               ) -> tuple[dict[tuple[str, str, str], list[tp.Result]], dict[str, str]]:
    """Every leg, ``--rounds`` times, the systems' order alternating between rounds;
    returns the results of each (system, mode, driver) and each server's command."""
    results: dict[tuple[str, str, str], list[tp.Result]] = {}
    commands: dict[str, str] = {}
    for r in range(args.rounds):
        for system in (systems if r % 2 == 0 else systems[::-1]):
            for mode in MODES_OF.get(system, MODES):
                with serve(system, mode, workdir) as (where, argv):
                    commands[f"{system} {mode}"] = _pool.command_line(argv)
                    for driver in DRIVERS[system]:
                        label = f"{system} {mode} {driver_label(system, driver, args.outstanding)}"
                        if not args.json:
                            print(f"round {r + 1}/{args.rounds}: {label} ({args.warmup:g}s "
                                  f"warm-up + {args.duration:g}s)...", file=sys.stderr,
                                  flush=True)
                        res = RUNNERS[system, driver](label, where, args)
                        results.setdefault((system, mode, driver), []).append(res)
    return results, commands


# -- reporting --------------------------------------------------------------------------------
def summarize(results: dict[tuple[str, str, str], list[tp.Result]], outstanding: int
              ) -> list[dict[str, Any]]:
    """One row per leg: medians over the rounds, errors summed."""
    rows = []
    for (system, mode, driver), rs in results.items():
        rows.append({
            "system": system, "mode": mode, "driver": driver,
            "label": driver_label(system, driver, outstanding),
            "req_per_s": statistics.median(r.req_per_s for r in rs),
            "p50_ms": statistics.median(r.p50_ms for r in rs),
            "p99_ms": statistics.median(r.p99_ms for r in rs),
            "completed": sum(r.completed for r in rs),
            "errors": sum(r.errors for r in rs),
            "first_error": next((r.first_error for r in rs if r.first_error), None),
            "rounds": [{"req_per_s": r.req_per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                        "errors": r.errors} for r in rs],
        })
    return rows


def ratios(rows: list[dict[str, Any]], outstanding: int) -> list[dict[str, Any]]:
    """workerpool over the best HTTP peer for each mode and driver (the most req/s; the
    lowest p50), the floor over that peer and workerpool over the floor where the floor
    ran, and AsyncClient over Client."""
    at = {(r["system"], r["mode"], r["driver"]): r for r in rows}
    out = []
    for mode in MODES:
        for driver, vs in (("one", "one"), ("many", "many"), ("many_async", "many")):
            wp = at.get(("workerpool", mode, driver))
            rivals = [r for p in HTTP_PEERS if (r := at.get((p, mode, vs))) and r["completed"]]
            if not (wp and rivals):
                continue
            best = max(rivals, key=lambda r: r["req_per_s"])
            goal = GOAL_VS_PEERS if (mode, driver) in (("plain", "one"), ("batched", "many")) \
                else None
            what = "Client.call" if driver == "one" else (
                "Client.submit" if driver == "many" else "AsyncClient")
            n = 1 if driver == "one" else outstanding
            out.append(tp.goal_ratio(
                mode, f"{n} outstanding: workerpool {what} / {best['system']} req/s",
                wp["req_per_s"] / best["req_per_s"], ">=" if goal else None, goal))
            floor = at.get((FLOOR, mode, vs))
            if floor and floor["completed"] and driver != "many_async":
                out.append(tp.goal_ratio(
                    mode, f"{n} outstanding: floor (libzmq proxy) / {best['system']} req/s",
                    floor["req_per_s"] / best["req_per_s"]))
                out.append(tp.goal_ratio(
                    mode, f"{n} outstanding: workerpool {what} / floor req/s",
                    wp["req_per_s"] / floor["req_per_s"]))
            if driver == "one" and wp["completed"]:
                fastest = min(rivals, key=lambda r: r["p50_ms"])
                out.append(tp.goal_ratio(
                    mode, f"1 outstanding: workerpool / {fastest['system']} p50",
                    wp["p50_ms"] / fastest["p50_ms"]))
        sync, aio = at.get(("workerpool", mode, "many")), at.get(("workerpool", mode, "many_async"))
        if sync and aio and sync["req_per_s"]:
            out.append(tp.goal_ratio(mode, f"{outstanding} outstanding: AsyncClient / Client "
                                     "req/s", aio["req_per_s"] / sync["req_per_s"], ">=",
                                     GOAL_ASYNC_VS_SYNC))
    return out


def format_report(rows: list[dict[str, Any]], rats: list[dict[str, Any]]) -> str:
    table = [[r["system"], r["mode"], r["label"], f"{r['req_per_s']:,.0f}",
              f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", str(r["errors"])] for r in rows]
    lines = tp.text_table(["system", "mode", "driver", "req/s", "p50 ms", "p99 ms", "errors"],
                          table, left=3)
    if rats:
        lines += ["", *tp.format_ratios(rats)]
    for r in rows:
        if r["first_error"]:
            lines.append(f"{r['system']} {r['mode']} {r['label']}: {r['errors']} errors, "
                         f"first: {r['first_error']}")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------
def peer_missing(system: str) -> str | None:
    """Why the HTTP peer ``system`` cannot run here (its package does not import), with the
    command that installs it, or None when it can."""
    peer = HTTP_PEERS[system]
    try:
        importlib.import_module(peer.package)
    except ImportError as exc:
        return (f"{system} is not installed ({exc}). It is a benchmark-only dependency: "
                f"`.venv/bin/pip install {peer.package}=={peer.version}`.")
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per leg (5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before each leg (1)")
    ap.add_argument("--outstanding", type=int, default=64,
                    help="requests in flight in the concurrent legs (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--http-threads", type=int, default=1,
                    help="threads sharing an HTTP peer's connections in the concurrent legs "
                         "(default 1; see the docstring)")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"comma-separated subset of {','.join(SYSTEMS)} (default all)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems or any(s not in SYSTEMS for s in systems):
        ap.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    if args.duration <= 0 or args.warmup < 0 or min(args.outstanding, args.rounds,
                                                    args.http_threads) < 1:
        ap.error("--duration must be > 0, --warmup >= 0, --outstanding, --rounds and "
                 "--http-threads >= 1")
    missing = {s: why for s in systems if s in HTTP_PEERS and (why := peer_missing(s))}
    if missing:
        for why in missing.values():
            print(f"error: {why}", file=sys.stderr)
        rest = [s for s in systems if s not in missing]
        if rest:
            print(f"To run without {' and '.join(missing)}: `--systems {','.join(rest)}`.",
                  file=sys.stderr)
        return 2

    env = tp.environment()  # the load average before anything started
    out, code = _pool.measure(lambda workdir: run_rounds(systems, args, workdir), "wp-peers-")
    if out is None:
        return code
    results, commands = out
    rows = summarize(results, args.outstanding)
    rats = ratios(rows, args.outstanding)
    for peer in HTTP_PEERS:
        if peer in systems:
            env[peer] = importlib.metadata.version(HTTP_PEERS[peer].package)
    if args.json:
        print(json.dumps({"config": {"duration_s": args.duration, "warmup_s": args.warmup,
                                     "outstanding": args.outstanding, "rounds": args.rounds,
                                     "http_threads": args.http_threads,
                                     "batch": {"max_batch_size": BATCH_SIZE,
                                               "max_wait_ms": BATCH_WAIT_MS}, **env},
                          "commands": commands, "results": rows, "ratios": rats}, indent=2))
    else:
        print(f"no-op echo, {WORKERS} workers each, median of {args.rounds} round(s) of "
              f"{args.duration:g}s per leg after {args.warmup:g}s warm-up, batched = "
              f"{BATCH_SIZE} requests / {BATCH_WAIT_MS} ms, {env['cpus']} CPUs, load average "
              f"at start {env['loadavg_at_start'][0]:.2f}")
        print(format_report(rows, rats))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
