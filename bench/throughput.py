"""Throughput and latency of workerpool against three baselines, side by side in one run.

Every system gets the same no-op echo work from a closed-loop driver that keeps
``--outstanding`` (default 256) requests in flight: each completion makes room for the
next send. Latency is per request, from just before the send to the reply, recorded in
the same HDR histograms ``workerpool loadtest`` uses (workerpool/loadtest/recorder.py).
The first ``--warmup`` seconds are run but not counted; the figures cover the requests
sent in the ``--duration`` seconds after that.

Systems (2 worker processes each):

- ``workerpool (max_inflight=1)`` and ``(max_inflight=64)``: ``workerpool up --handler
  workerpool.handlers:Echo --workers 2``, driven by ``workerpool loadtest``'s own
  generator (``workerpool.loadtest.run``: the public ``Client``, closed loop).
- ``zmq echo (no broker)``: bench/zmq_echo.py, 2 processes each with a ROUTER that sends
  every message back unchanged; one DEALER connected to both. One ZeroMQ hop, nothing else.
- ``zmq broker (baseline)``: bench/baseline_broker.py, a minimal ROUTER/ROUTER broker with
  2 echo workers (two hops, a little bookkeeping).
- ``zmq proxy in C (floor)``: the same script's ``proxy``, libzmq's own proxy loop (no
  Python per message) in front of the same 2 workers: what any broker between Python
  processes over ZeroMQ pays, with nothing of its own.
- ``ProcessPoolExecutor(2)``: ``submit(noop, payload)``.
- ``wp64f`` and ``wp64a``: the ``max_inflight=64`` pool driven by a bare ``submit`` loop,
  like the executor: ``Client.submit`` from a thread, ``AsyncClient.submit`` from a
  coroutine (``--outstanding 64 --systems wp64f,wp64a`` compares the two clients).
- ``wp1f``: the pool with the defaults (``max_inflight`` 1, ``prefetch`` 1) and the same
  bare ``Client.submit`` loop. What each worker holds ahead is sized from its node's
  round trip and its handler time, both known a moment after the load starts
  (bench/startup.py shows a new pool's first seconds).

``--payload-size N`` sends N random bytes instead of ``{"i": n}`` (not to the broker,
whose protocol is one msgpack map); bench/large_payload.py runs the large sizes.

Usage::

    .venv/bin/python bench/throughput.py --duration 10          # table and ratios
    .venv/bin/python bench/throughput.py --duration 10 --json   # one JSON object
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import zmq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import _pool  # noqa: E402  (bench/ is the script's directory, first on sys.path)
from _pool import READY_TIMEOUT, BenchError  # noqa: E402

from workerpool import AsyncClient, Client  # noqa: E402
from workerpool.loadtest import LoadSpec, MethodMix, run  # noqa: E402
from workerpool.loadtest.recorder import Outcome, Recording, summarize  # noqa: E402

BROKER_SCRIPT = os.path.join(REPO, "bench", "baseline_broker.py")
ECHO_SCRIPT = os.path.join(REPO, "bench", "zmq_echo.py")
WORKERS = 2

WP1 = "workerpool (max_inflight=1)"
WP64 = "workerpool (max_inflight=64)"
WP64NP = "workerpool (max_inflight=64), numpy array payload"
WP64F = "workerpool (max_inflight=64), Client.submit loop"
WP1F = "workerpool (defaults), Client.submit loop"
WP64A = "workerpool (max_inflight=64), AsyncClient.submit loop"
WPCALL = "workerpool (defaults), Client.call from one thread"
DIRECT = "zmq echo (no broker)"
BROKER = "zmq broker (baseline)"
PROXY = "zmq proxy in C (floor)"
PPE = "ProcessPoolExecutor(2)"
SYSTEMS = {"wp1": WP1, "wp1f": WP1F, "wp64": WP64, "wp64f": WP64F, "wp64a": WP64A,
           "wpcall": WPCALL,
           "wp64np": WP64NP, "direct": DIRECT,
           "broker": BROKER, "proxy": PROXY, "ppe": PPE}

# The goals of the throughput issue, compared with every workerpool variant.
GOAL_VS_BROKER_RPS = 0.7  # workerpool req/s >= 0.7x the broker's
GOAL_VS_PPE_RPS = 2.5  # workerpool req/s >= 2.5x ProcessPoolExecutor's
GOAL_VS_BROKER_P50 = 1.2  # workerpool p50 <= 1.2x the broker's

STALL_TIMEOUT = 15.0  # seconds without a single completion before a run is abandoned
DRAIN_TIMEOUT = 15.0  # seconds to wait for the last outstanding requests after the window


def noop(payload: Any) -> Any:
    """The ProcessPoolExecutor's work: return the payload, like the Echo handler."""
    return payload


def random_payload(size: int) -> bytes:
    return random.Random(f"bench/{size}").randbytes(size)


# -- results ---------------------------------------------------------------------------------------
@dataclass
class Result:
    system: str
    duration_s: float
    completed: int = 0  # requests sent in the measured window and answered with a result
    errors: int = 0
    first_error: str | None = None
    req_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


def result_from(system: str, rec: Recording, duration: float, first_error: str | None) -> Result:
    """The figures of a baseline's recording, computed as loadtest's report computes them."""
    res = Result(system, duration, completed=rec.counts["ok"],
                 errors=rec.counts["errors"] + rec.counts["unanswered"], first_error=first_error)
    _fill(res, summarize(rec.latency), rec.counts["ok"] / duration)
    return res


def _fill(res: Result, lat: dict | None, rps: float) -> None:
    res.req_per_s = rps
    if lat:
        res.p50_ms, res.p99_ms, res.p999_ms = lat["p50"], lat["p99"], lat["p99.9"]
        res.mean_ms, res.max_ms = lat["mean"], lat["max"]


class Stamps:
    """(send, reply, error) per request, appended from any thread (list.append is atomic
    under the GIL) and folded into a Recording after the run, off the measured path."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.items: list[tuple[float, float, str | None]] = []
        self.first_error: str | None = None
        self.last_completion = self.start

    def done(self, t_send: float, error: BaseException | None = None) -> None:
        t = time.perf_counter()
        self.last_completion = t
        self.items.append((t_send, t, None if error is None else type(error).__name__))
        if error is not None and self.first_error is None:
            self.first_error = f"{type(error).__name__}: {error}"

    def check_stall(self, system: str) -> None:
        quiet = time.perf_counter() - self.last_completion
        if quiet > STALL_TIMEOUT:
            raise BenchError(f"{system}: no request completed for {quiet:.0f}s "
                             f"(first error: {self.first_error})")

    def result(self, system: str, warmup: float, duration: float) -> Result:
        rec = Recording(bucket=1.0, warmup=warmup, methods=["echo"])
        end = warmup + duration
        for t_send, t_done, err in self.items:
            sent = t_send - self.start
            if sent >= end:
                continue  # sent after the window, to keep the load up while it closed
            rec.add(sent, sent, t_done - self.start, 0,
                    Outcome.OK if err is None else Outcome.ERROR, err, None)
        return result_from(system, rec, duration, self.first_error)


# -- drivers ---------------------------------------------------------------------------------------
def drive_futures(system: str, submit: Callable[[Any], concurrent.futures.Future],
                  payload: Callable[[int], Any], outstanding: int, warmup: float,
                  duration: float, check: Callable[[Any, Any], bool] | None = None) -> Result:
    """Closed loop over a Future-returning submit: at most ``outstanding`` in flight; each
    done-callback stamps the reply and returns a permit. ``check(payload, result)``, if
    given, says whether a result is the right one; a wrong one counts as an error."""
    stamps = Stamps()
    permits = threading.Semaphore(outstanding)

    def on_done(fut: concurrent.futures.Future, t_send: float, sent: Any) -> None:
        try:
            exc = fut.exception()
        except concurrent.futures.CancelledError as e:
            exc = e
        if exc is None and check is not None and not check(sent, fut.result()):
            exc = BenchError(f"wrong reply {fut.result()!r} to {sent!r}")
        stamps.done(t_send, exc)
        permits.release()

    t_end = stamps.start + warmup + duration
    i = 0
    while True:
        now = time.perf_counter()
        if now >= t_end:
            break
        if not permits.acquire(timeout=min(0.5, t_end - now)):
            stamps.check_stall(system)
            continue
        p = payload(i)
        t_send = time.perf_counter()
        try:
            fut = submit(p)
        except BaseException:
            permits.release()
            raise
        i += 1
        fut.add_done_callback(lambda f, t=t_send, p=p: on_done(f, t, p))
    drain_deadline = time.monotonic() + DRAIN_TIMEOUT
    got = 0
    while got < outstanding:
        if not permits.acquire(timeout=max(0.0, drain_deadline - time.monotonic())):
            break
        got += 1
    res = stamps.result(system, warmup, duration)
    res.notes["submitted"] = i
    res.notes["unfinished_at_exit"] = outstanding - got
    return res


async def drive_async(system: str, submit: Callable[[Any], Any], payload: Callable[[int], Any],
                      outstanding: int, warmup: float, duration: float) -> Result:
    """``drive_futures`` for a coroutine returning an asyncio Future (``AsyncClient.submit``),
    in the running loop; a watchdog task abandons the run when replies stop."""
    stamps = Stamps()
    permits = asyncio.Semaphore(outstanding)
    counts = {"submitted": 0, "done": 0}

    def on_done(fut: asyncio.Future, t_send: float) -> None:
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        stamps.done(t_send, exc)
        counts["done"] += 1
        permits.release()

    async def closed_loop() -> None:
        t_end = stamps.start + warmup + duration
        i = 0
        while time.perf_counter() < t_end:
            await permits.acquire()
            t_send = time.perf_counter()
            fut = await submit(payload(i))
            i += 1
            fut.add_done_callback(lambda f, t=t_send: on_done(f, t))
        counts["submitted"] = i
        drain_deadline = time.perf_counter() + DRAIN_TIMEOUT
        while counts["done"] < i and time.perf_counter() < drain_deadline:
            await asyncio.sleep(0.01)

    async def watchdog() -> None:
        while True:
            await asyncio.sleep(0.5)
            stamps.check_stall(system)

    main, guard = asyncio.ensure_future(closed_loop()), asyncio.ensure_future(watchdog())
    try:
        await asyncio.wait({main, guard}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        guard.cancel()
        main.cancel()
    if guard.done() and not guard.cancelled():
        guard.result()  # the watchdog's BenchError
    main.result()
    res = stamps.result(system, warmup, duration)
    res.notes["submitted"] = counts["submitted"]
    res.notes["unfinished_at_exit"] = counts["submitted"] - counts["done"]
    return res


def drive_dealer(system: str, addresses: list[str], outstanding: int, warmup: float,
                 duration: float, payload_size: int) -> Result:
    """Closed loop over one raw DEALER socket, single-threaded: one send per reply.

    Small requests are one msgpack frame ``{"i": n}``; with ``payload_size`` they are two
    frames, the request number (8 bytes) and the payload, sent without a copy.
    """
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    for address in addresses:
        sock.connect(address)
    body = random_payload(payload_size) if payload_size else b""
    packb, unpackb = msgpack.packb, msgpack.unpackb
    perf_counter = time.perf_counter

    def send(i: int) -> None:
        if payload_size:
            sock.send_multipart([i.to_bytes(8, "big"), body], copy=False)
        else:
            sock.send(packb({"i": i}))

    def number(frames: list) -> int:
        return int.from_bytes(frames[0], "big") if payload_size else unpackb(frames[0])["i"]

    time.sleep(0.2)  # let the DEALER connect to every address: its sends go round-robin
    stamps = Stamps()
    sent: dict[int, float] = {}
    try:
        t_end = stamps.start + warmup + duration
        i = 0
        for _ in range(outstanding):
            sent[i] = perf_counter()
            send(i)
            i += 1
        drain_deadline = None
        while sent:
            now = perf_counter()
            if now >= t_end:
                if drain_deadline is None:
                    drain_deadline = now + DRAIN_TIMEOUT
                elif now > drain_deadline:
                    break
            if not sock.poll(500):
                stamps.check_stall(system)
                continue
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                t_send = sent.pop(number(frames), None)
                if t_send is None:
                    stamps.done(perf_counter(), BenchError("reply for an unknown request"))
                    continue
                stamps.done(t_send)
                if perf_counter() < t_end:
                    sent[i] = perf_counter()
                    send(i)
                    i += 1
        res = stamps.result(system, warmup, duration)
        res.notes["submitted"] = i
        res.notes["unfinished_at_exit"] = len(sent)
        return res
    finally:
        sock.close(0)
        ctx.term()


# -- the systems ------------------------------------------------------------------------------------
def run_workerpool(max_inflight: int, args: argparse.Namespace, workdir: str,
                   kind: str = "bytes") -> Result:
    """``kind`` "numpy": the ``--payload-size`` random bytes as a numpy uint8 array, which
    travels as raw bytes (shared memory on this host) instead of a msgpack bin."""
    system = WP1 if max_inflight == 1 else f"workerpool (max_inflight={max_inflight})"
    if kind == "numpy":
        system = WP64NP
    with _pool.pool(workdir, f"wp{max_inflight}", workers=WORKERS,
                    flags=["--max-inflight", str(max_inflight)]) as (_, frontend, argv):
        body: dict[str, Any] = ({"payload_size": args.payload_size} if args.payload_size
                                else {"payload": {"i": 0}})
        if kind == "numpy":
            body["payload_kind"] = "numpy"
        spec = LoadSpec(router=frontend, methods=[MethodMix(method="echo")],
                        concurrency=args.outstanding, warmup=args.warmup,
                        duration=args.duration, seed=1, **body)
        report = run(spec, progress=False)
        if report["interrupted"]:
            # loadtest takes a first Ctrl-C (or our SIGTERM) as "stop and report"; for the
            # benchmark it means stop everything, not go on to the next system.
            raise KeyboardInterrupt
    req = report["requests"]
    res = Result(system, args.duration, completed=req["ok"],
                 errors=req["errors"] + req["unanswered"])
    if report["errors"]:
        res.first_error = ", ".join(f"{k} x{v}" for k, v in report["errors"].items())
    _fill(res, report["latency_ms"], report["throughput"]["ok_rps"] or 0.0)
    res.notes["command"] = _pool.command_line(argv)
    res.notes["driver"] = (f"workerpool loadtest --router {frontend} --concurrency "
                           f"{args.outstanding} --warmup {args.warmup:g} --duration "
                           f"{args.duration:g} " + (f"--payload-size {args.payload_size}"
                                                    if args.payload_size else "--payload '{\"i\": 0}'")
                           + (" --payload-kind numpy" if kind == "numpy" else ""))
    res.notes["worker_share"] = {w: v["share"] for w, v in report["workers"].items()}
    return res


def run_direct(args: argparse.Namespace, workdir: str) -> Result:
    sockdir = tempfile.mkdtemp(prefix="echo-", dir=workdir)
    addresses = [f"ipc://{sockdir}/echo{n}" for n in range(WORKERS)]
    with contextlib.ExitStack() as stack:
        for n, address in enumerate(addresses):
            stack.enter_context(_pool.process_group([sys.executable, ECHO_SCRIPT, address],
                                                    "echo ready", workdir, f"echo{n}"))
        res = drive_dealer(DIRECT, addresses, args.outstanding, args.warmup, args.duration,
                           args.payload_size)
    res.notes["command"] = " ".join(_pool.command_line([sys.executable, ECHO_SCRIPT, a])
                                    for a in addresses)
    return res


def run_broker(args: argparse.Namespace, workdir: str, role: str = "broker") -> Result:
    """bench/baseline_broker.py as ``role``: the Python broker, or libzmq's ``proxy``."""
    if args.payload_size:
        raise BenchError("the broker baseline speaks {'i': n} maps only: leave it out of "
                         "--payload-size runs (--systems wp64,direct,ppe)")
    sockdir = tempfile.mkdtemp(prefix="broker-", dir=workdir)
    frontend = f"ipc://{sockdir}/front"
    argv = [sys.executable, BROKER_SCRIPT, role, "--frontend", frontend,
            "--workers", str(WORKERS)]
    system = PROXY if role == "proxy" else BROKER
    with _pool.process_group(argv, "baseline ready", workdir, f"baseline-{role}"):
        res = drive_dealer(system, [frontend], args.outstanding, args.warmup, args.duration, 0)
    res.notes["command"] = _pool.command_line(argv)
    return res


def run_workerpool_futures(args: argparse.Namespace, workdir: str,
                           max_inflight: int | None = 64) -> Result:
    """The same pool as ``wp64`` (or, ``max_inflight`` None, one with the defaults),
    driven like ProcessPoolExecutor: the closed loop of ``drive_futures`` over a bare
    ``Client.submit`` (no per-request timeout, no loadtest bookkeeping), so the two differ
    only in what is behind ``submit``."""
    system, flags = (WP1F, []) if max_inflight is None else \
        (WP64F, ["--max-inflight", str(max_inflight)])
    with _pool.pool(workdir, "wp64f" if max_inflight else "wp1f", workers=WORKERS,
                    flags=flags) as (_, frontend, argv), Client(frontend) as client:
        body = random_payload(args.payload_size) if args.payload_size else None
        res = drive_futures(system, lambda p: client.submit("echo", p),
                            (lambda i: body) if body is not None else (lambda i: {"i": i}),
                            args.outstanding, args.warmup, args.duration)
    res.notes["command"] = _pool.command_line(argv)
    return res


def run_workerpool_call(args: argparse.Namespace, workdir: str) -> Result:
    """A sequential caller: one thread, ``Client.call`` after ``Client.call``, against a
    pool with the defaults (``--outstanding`` is ignored: always one). Compare it with
    ``broker`` run with ``--outstanding 1``, whose client is one raw DEALER thread."""
    with _pool.pool(workdir, "wpcall", workers=WORKERS) as (_, frontend, argv), \
            Client(frontend) as client:
        body = random_payload(args.payload_size) if args.payload_size else None
        stamps = Stamps()
        t_end = stamps.start + args.warmup + args.duration
        i = 0
        while time.perf_counter() < t_end:
            t_send = time.perf_counter()
            try:
                client.call("echo", body if body is not None else {"i": i})
                err = None
            except Exception as exc:  # counted, as the other drivers do
                err = exc
            stamps.done(t_send, err)
            i += 1
        res = stamps.result(WPCALL, args.warmup, args.duration)
    res.notes["command"] = _pool.command_line(argv)
    return res


def run_workerpool_async(args: argparse.Namespace, workdir: str) -> Result:
    """``wp64f`` with ``AsyncClient``: the same pool and closed loop, in one event loop."""
    body = random_payload(args.payload_size) if args.payload_size else None

    async def drive(frontend: str) -> Result:
        async with AsyncClient(frontend) as client:
            return await drive_async(WP64A, lambda p: client.submit("echo", p),
                                     (lambda i: body) if body is not None else (lambda i: {"i": i}),
                                     args.outstanding, args.warmup, args.duration)

    with _pool.pool(workdir, "wp64a", workers=WORKERS, flags=["--max-inflight", "64"]) as (
            _, frontend, argv):
        res = asyncio.run(drive(frontend))
    res.notes["command"] = _pool.command_line(argv)
    return res


def run_ppe(args: argparse.Namespace, workdir: str) -> Result:
    ex = _pool.start_executor(WORKERS)
    body = random_payload(args.payload_size) if args.payload_size else None
    ok = False
    try:
        ex.submit(noop, None).result(READY_TIMEOUT)  # start the workers outside the timing
        res = drive_futures(PPE, lambda p: ex.submit(noop, p),
                            (lambda i: body) if body is not None else (lambda i: {"i": i}),
                            args.outstanding, args.warmup, args.duration)
        ok = True
    finally:
        _pool.stop_executor(ex, ok)  # interrupted: nothing queued is waited for, nothing survives
    return res


RUNNERS: dict[str, Callable[[argparse.Namespace, str], Result]] = {
    "wp1": lambda a, d: run_workerpool(1, a, d),
    "wp64": lambda a, d: run_workerpool(64, a, d),
    "wp64np": lambda a, d: run_workerpool(64, a, d, kind="numpy"),
    "wp64f": run_workerpool_futures,
    "wp1f": lambda a, d: run_workerpool_futures(a, d, max_inflight=None),
    "wp64a": run_workerpool_async,
    "wpcall": run_workerpool_call,
    "direct": run_direct,
    "broker": run_broker,
    "proxy": lambda a, d: run_broker(a, d, role="proxy"),
    "ppe": run_ppe,
}


# -- reporting ----------------------------------------------------------------------------------------
def ratios(results: dict[str, Result]) -> list[dict[str, Any]]:
    """Each workerpool variant against each baseline that ran (goals where the
    throughput issue set one)."""
    out = []
    direct, broker, ppe = results.get(DIRECT), results.get(BROKER), results.get(PPE)
    proxy = results.get(PROXY)
    for name, r in results.items():
        if not name.startswith("workerpool"):
            continue
        if direct and direct.req_per_s:
            out.append(goal_ratio(name, "req/s vs zmq echo", r.req_per_s / direct.req_per_s))
        if direct and direct.p50_ms and r.completed:
            out.append(goal_ratio(name, "p50 vs zmq echo", r.p50_ms / direct.p50_ms))
        if broker and broker.req_per_s:
            out.append(goal_ratio(name, "req/s vs broker", r.req_per_s / broker.req_per_s,
                                  ">=", GOAL_VS_BROKER_RPS))
        if broker and broker.p50_ms and r.completed:
            out.append(goal_ratio(name, "p50 vs broker", r.p50_ms / broker.p50_ms, "<=",
                                  GOAL_VS_BROKER_P50))
        if proxy and proxy.req_per_s:
            out.append(goal_ratio(name, "req/s vs C proxy", r.req_per_s / proxy.req_per_s))
        if proxy and proxy.p50_ms and r.completed:
            out.append(goal_ratio(name, "p50 vs C proxy", r.p50_ms / proxy.p50_ms))
        if ppe and ppe.req_per_s:
            out.append(goal_ratio(name, "req/s vs ProcessPoolExecutor",
                                  r.req_per_s / ppe.req_per_s, ">=", GOAL_VS_PPE_RPS))
        if ppe and ppe.p50_ms and r.completed:
            out.append(goal_ratio(name, "p50 vs ProcessPoolExecutor", r.p50_ms / ppe.p50_ms))
    return out


def goal_ratio(system: str, what: str, value: float, op: str | None = None,
               goal: float | None = None) -> dict[str, Any]:
    """One line of a ratio table: ``value`` and, with a goal (``op`` ">=" or "<="), whether
    it is met."""
    met = None if goal is None else (value >= goal if op == ">=" else value <= goal)
    return {"system": system, "ratio": what, "value": round(value, 3),
            "goal": None if goal is None else f"{op} {goal}", "met": met}


def text_table(cols: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """The lines of a plain-text table: the first ``left`` columns aligned left, the rest
    right, a rule under the header."""
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        return "  ".join(v.ljust(w) if i < left else v.rjust(w)
                         for i, (v, w) in enumerate(zip(cells, widths, strict=True)))

    return [line(cols), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]


def format_ratios(rats: list[dict[str, Any]]) -> list[str]:
    """One line per ``goal_ratio``: its value and, where it has one, whether the goal is met."""
    width = max(len(f"{x['system']} {x['ratio']}") for x in rats)
    lines = []
    for x in rats:
        label = f"{x['system']} {x['ratio']}"
        goal = "" if x["goal"] is None else (
            f"   goal {x['goal']}x  {'met' if x['met'] else 'NOT met'}")
        lines.append(f"{label.ljust(width)}  {x['value']:6.2f}x{goal}")
    return lines


def format_table(results: dict[str, Result], rats: list[dict[str, Any]],
                 payload_size: int = 0) -> str:
    cols = ["system", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "mean ms", "completed", "errors"]
    if payload_size:
        cols.insert(2, "MiB/s")
    rows = []
    for r in results.values():
        row = [r.system, f"{r.req_per_s:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
               f"{r.p999_ms:.2f}", f"{r.mean_ms:.2f}", str(r.completed), str(r.errors)]
        if payload_size:
            row.insert(2, f"{r.req_per_s * payload_size / 2**20:,.1f}")
        rows.append(row)
    lines = text_table(cols, rows)
    if rats:
        lines += ["", *format_ratios(rats)]
    for r in results.values():
        if r.first_error:
            lines.append(f"{r.system}: {r.errors} errors, first: {r.first_error}")
    return "\n".join(lines)


def run_systems(keys: list[str], args: argparse.Namespace, quiet: bool,
                workdir: str) -> dict[str, Result]:
    """Run the chosen systems one after another; every process is stopped after each."""
    results: dict[str, Result] = {}
    for key in keys:
        if not quiet:
            size = f", {args.payload_size:,} B payload" if args.payload_size else ""
            print(f"running {SYSTEMS[key]} ({args.warmup:g}s warm-up + {args.duration:g}s"
                  f"{size})...", file=sys.stderr, flush=True)
        results[SYSTEMS[key]] = RUNNERS[key](args, workdir)
    return results


def environment() -> dict[str, Any]:
    return {"workers": WORKERS, "python": platform.python_version(), "pyzmq": zmq.__version__,
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg()}


# -- main ------------------------------------------------------------------------------------------------
def parse_systems(ap: argparse.ArgumentParser, text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="workerpool vs a raw zmq echo, a minimal pyzmq broker and "
                    "ProcessPoolExecutor: closed-loop no-op echo throughput and latency.")
    ap.add_argument("--duration", type=float, default=5.0,
                    help="measured seconds per system (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="seconds run before measuring, per system (default 1)")
    ap.add_argument("--outstanding", type=int, default=256,
                    help="requests kept in flight (default 256)")
    ap.add_argument("--payload-size", type=int, default=0,
                    help="send this many random bytes instead of {'i': n} (default 0)")
    ap.add_argument("--systems", default=None,
                    help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all; "
                         f"without broker and proxy when --payload-size is set)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.outstanding < 1 or args.payload_size < 0:
        ap.error("--duration must be > 0, --warmup >= 0, --outstanding >= 1, --payload-size >= 0")
    # The numpy leg needs --payload-size (bench/large_payload.py runs it by default).
    default = [k for k in SYSTEMS if k not in ("wp64np", "wpcall")
               and not (args.payload_size and k in ("broker", "proxy"))]
    chosen = parse_systems(ap, args.systems) if args.systems else default

    results, code = _pool.measure(lambda wd: run_systems(chosen, args, args.json, wd),
                                  "wp-bench-")
    if results is None:
        return code

    rats = ratios(results)
    payload = f"{args.payload_size} random bytes" if args.payload_size else {"i": "<n>"}
    if args.json:
        print(json.dumps({
            "config": {"duration_s": args.duration, "warmup_s": args.warmup,
                       "outstanding": args.outstanding, "payload": payload, **environment()},
            "results": {name: asdict(r) for name, r in results.items()},
            "ratios": rats,
        }, indent=2))
    else:
        what = (f"{args.payload_size:,} random bytes" if args.payload_size else "{'i': n}")
        print(f"closed loop, {args.outstanding} outstanding, no-op echo of {what}, {WORKERS} "
              f"workers, {args.duration:g}s measured after {args.warmup:g}s warm-up, "
              f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}")
        print(format_table(results, rats, args.payload_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
