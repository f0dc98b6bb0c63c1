"""Throughput and latency of workerpool against two baselines, side by side in one run.

Every system gets the same no-op echo work (payload ``{"i": n}``) from a closed-loop
driver that keeps ``--outstanding`` (default 256) requests in flight: each completion
immediately makes room for the next submit. Latency is measured per request, from just
before submit to completion, with ``time.perf_counter``. The first ``--warmup`` seconds
are run but not counted; figures cover the ``--duration`` seconds after that.

Systems:

- ``workerpool (max_inflight=1)`` and ``workerpool (max_inflight=64)``: ``python -m
  workerpool.cli up --handler workerpool.handlers:Echo --workers 2`` as a subprocess,
  driven through the public ``workerpool.Client.submit`` (concurrent.futures.Future).
- ``zmq broker (baseline)``: bench/baseline_broker.py, a minimal pyzmq ROUTER/ROUTER
  broker with 2 echo worker processes, round-robin, no capacity limit, driven by a raw
  DEALER socket with msgpack bodies.
- ``ProcessPoolExecutor(2)``: ``ProcessPoolExecutor(2).submit(noop, payload)``.

Usage::

    .venv/bin/python bench/throughput.py --duration 10          # table and ratios
    .venv/bin/python bench/throughput.py --duration 10 --json   # one JSON object
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import zmq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROKER_SCRIPT = os.path.join(REPO, "bench", "baseline_broker.py")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from workerpool import Client  # noqa: E402  (after the sys.path fix above)

WP1 = "workerpool (max_inflight=1)"
WP64 = "workerpool (max_inflight=64)"
BROKER = "zmq broker (baseline)"
PPE = "ProcessPoolExecutor(2)"
SYSTEMS = {"wp1": WP1, "wp64": WP64, "broker": BROKER, "ppe": PPE}

# The goals, compared with every workerpool variant.
GOAL_VS_BROKER_RPS = 0.7  # workerpool req/s >= 0.7x the broker's
GOAL_VS_PPE_RPS = 2.5  # workerpool req/s >= 2.5x ProcessPoolExecutor's
GOAL_VS_BROKER_P50 = 1.2  # workerpool p50 <= 1.2x the broker's

READY_TIMEOUT = 60.0  # seconds a pool/broker may take to come up (busy 2-core machines)
STALL_TIMEOUT = 15.0  # seconds without a single completion before a run is abandoned
DRAIN_TIMEOUT = 15.0  # seconds to wait for the last outstanding requests after the window


def noop(payload: Any) -> Any:
    """The ProcessPoolExecutor's work: return the payload, like the Echo handler."""
    return payload


def _ppe_worker_init() -> None:
    """Leave Ctrl-C and SIGTERM to the parent, which stops the pool (no tracebacks)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class BenchError(RuntimeError):
    """A system could not be started or stopped answering."""


# -- measurement ---------------------------------------------------------------------------------
@dataclass
class Result:
    system: str
    duration_s: float
    completed: int = 0  # completions inside the measured window
    errors: int = 0  # failed requests over the whole run (warm-up included)
    first_error: str | None = None
    req_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """Collects (completion time, latency) pairs; thread-safe enough under the GIL
    (list.append is atomic), which is all the callback threads need."""

    def __init__(self) -> None:
        self.done_at: list[float] = []
        self.latency: list[float] = []
        self.errors = 0
        self.first_error: str | None = None
        self.last_completion = time.perf_counter()

    def ok(self, t_submit: float, t_done: float) -> None:
        self.done_at.append(t_done)
        self.latency.append(t_done - t_submit)
        self.last_completion = t_done

    def error(self, exc: BaseException, t_done: float) -> None:
        self.errors += 1
        self.last_completion = t_done
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {exc}"

    def result(self, system: str, start: float, end: float) -> Result:
        lat = sorted(lt for t, lt in zip(self.done_at, self.latency, strict=True)
                     if start <= t <= end)
        res = Result(system, end - start, errors=self.errors, first_error=self.first_error)
        res.completed = len(lat)
        if lat:
            res.req_per_s = len(lat) / (end - start)
            res.p50_ms = _percentile(lat, 50) * 1e3
            res.p99_ms = _percentile(lat, 99) * 1e3
            res.mean_ms = statistics.fmean(lat) * 1e3
            res.max_ms = lat[-1] * 1e3
        return res


def _percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    k = math.ceil(pct / 100 * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, k))]


def drive_futures(system: str, submit: Callable[[dict], concurrent.futures.Future],
                  outstanding: int, warmup: float, duration: float) -> Result:
    """Closed loop over a Future-returning submit: at most ``outstanding`` in flight.

    The calling thread submits whenever a permit is free; each Future's done-callback
    records the latency and returns the permit.
    """
    rec = Recorder()
    permits = threading.Semaphore(outstanding)

    def on_done(fut: concurrent.futures.Future, t_submit: float) -> None:
        t_done = time.perf_counter()
        try:
            exc = fut.exception()
        except concurrent.futures.CancelledError as e:
            exc = e
        if exc is None:
            rec.ok(t_submit, t_done)
        else:
            rec.error(exc, t_done)
        permits.release()

    start = time.perf_counter()
    rec.last_completion = start
    t_measure = start + warmup
    t_end = t_measure + duration
    i = 0
    while True:
        now = time.perf_counter()
        if now >= t_end:
            break
        if not permits.acquire(timeout=min(0.5, t_end - now)):
            _check_stall(system, rec)
            continue
        t_submit = time.perf_counter()
        try:
            fut = submit({"i": i})
        except BaseException:
            permits.release()
            raise
        i += 1
        fut.add_done_callback(lambda f, t=t_submit: on_done(f, t))
    # Let what is still in flight finish, so shutting the system down fails nothing.
    drain_deadline = time.monotonic() + DRAIN_TIMEOUT
    got = 0
    while got < outstanding:
        if not permits.acquire(timeout=max(0.0, drain_deadline - time.monotonic())):
            break
        got += 1
    res = rec.result(system, t_measure, t_end)
    res.notes["submitted"] = i
    res.notes["unfinished_at_exit"] = outstanding - got
    return res


def _check_stall(system: str, rec: Recorder) -> None:
    quiet = time.perf_counter() - rec.last_completion
    if quiet > STALL_TIMEOUT:
        raise BenchError(f"{system}: no request completed for {quiet:.0f}s "
                         f"(first error: {rec.first_error})")


# -- process management ---------------------------------------------------------------------------
@contextlib.contextmanager
def process_group(argv: list[str], ready_prefix: str, logdir: str, name: str,
                  env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Start ``argv`` in its own session, wait for a stdout line starting with
    ``ready_prefix``, yield, and always tear the whole process group down: SIGTERM, a
    grace period, then SIGKILL."""
    out_path = os.path.join(logdir, f"{name}.stdout")
    err_path = os.path.join(logdir, f"{name}.stderr")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=REPO, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            with open(out_path, encoding="utf-8", errors="replace") as f:
                if any(line.startswith(ready_prefix) for line in f):
                    break
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with code {proc.returncode} before it was "
                                 f"ready; stderr:\n{_tail(err_path)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{name} was not ready within {READY_TIMEOUT:.0f}s; "
                                 f"stderr:\n{_tail(err_path)}")
            time.sleep(0.05)
        yield proc
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group led by ``proc``, wait, then SIGKILL whatever is left."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    _killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    # The leader may be gone while children of the group linger: wait for them too.
    deadline = time.monotonic() + 2.0
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    _killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: str, n: int = 4000) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# -- the systems ------------------------------------------------------------------------------------
def run_workerpool(max_inflight: int, args: argparse.Namespace, workdir: str) -> Result:
    system = WP1 if max_inflight == 1 else f"workerpool (max_inflight={max_inflight})"
    sockdir = tempfile.mkdtemp(prefix=f"wp{max_inflight}-", dir=workdir)
    frontend = f"ipc://{sockdir}/front"
    argv = [sys.executable, "-m", "workerpool.cli", "up",
            "--handler", "workerpool.handlers:Echo", "--workers", "2",
            "--frontend", frontend, "--max-inflight", str(max_inflight)]
    with process_group(argv, "workerpool ready", workdir, f"workerpool-mi{max_inflight}",
                       _child_env()), Client(frontend) as client:
        res = drive_futures(system, lambda p: client.submit("echo", p), args.outstanding,
                            args.warmup, args.duration)
    res.notes["command"] = " ".join(["python", *argv[1:]])
    return res


def run_broker(args: argparse.Namespace, workdir: str) -> Result:
    sockdir = tempfile.mkdtemp(prefix="broker-", dir=workdir)
    frontend = f"ipc://{sockdir}/front"
    argv = [sys.executable, BROKER_SCRIPT, "broker", "--frontend", frontend, "--workers", "2"]
    with process_group(argv, "baseline ready", workdir, "baseline-broker", _child_env()):
        res = drive_dealer(BROKER, frontend, args.outstanding, args.warmup, args.duration)
    res.notes["command"] = " ".join(["python", *argv[1:]])
    return res


def drive_dealer(system: str, address: str, outstanding: int, warmup: float,
                 duration: float) -> Result:
    """Closed loop over a raw DEALER socket, single-threaded: one send per reply."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(address)
    rec = Recorder()
    sent: dict[int, float] = {}
    packb, unpackb = msgpack.packb, msgpack.unpackb
    perf_counter = time.perf_counter
    try:
        start = perf_counter()
        rec.last_completion = start
        t_measure = start + warmup
        t_end = t_measure + duration
        i = 0
        for _ in range(outstanding):
            sent[i] = perf_counter()
            sock.send(packb({"i": i}))
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
                _check_stall(system, rec)
                continue
            while True:
                try:
                    body = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                t_done = perf_counter()
                t_submit = sent.pop(unpackb(body)["i"], None)
                if t_submit is None:
                    rec.error(BenchError("reply for an unknown request"), t_done)
                    continue
                rec.ok(t_submit, t_done)
                if t_done < t_end:
                    sent[i] = perf_counter()
                    sock.send(packb({"i": i}))
                    i += 1
        res = rec.result(system, t_measure, t_end)
        res.notes["submitted"] = i
        res.notes["unfinished_at_exit"] = len(sent)
        return res
    finally:
        sock.close(0)
        ctx.term()


def run_ppe(args: argparse.Namespace, workdir: str) -> Result:
    ex = concurrent.futures.ProcessPoolExecutor(2, initializer=_ppe_worker_init)
    ok = False
    try:
        ex.submit(noop, None).result(READY_TIMEOUT)  # start the workers outside the timing
        res = drive_futures(PPE, lambda p: ex.submit(noop, p), args.outstanding, args.warmup,
                            args.duration)
        ok = True
    finally:
        procs = list((getattr(ex, "_processes", None) or {}).values())
        if not ok:  # interrupted: do not wait for queued work, and make sure nothing survives
            for p in procs:
                with contextlib.suppress(Exception):
                    p.terminate()
        ex.shutdown(wait=True, cancel_futures=True)
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    return res


# -- reporting ----------------------------------------------------------------------------------------
def ratios(results: dict[str, Result]) -> list[dict[str, Any]]:
    out = []
    broker, ppe = results.get(BROKER), results.get(PPE)
    for name, r in results.items():
        if not name.startswith("workerpool"):
            continue
        if broker and broker.req_per_s:
            out.append(_ratio(name, "req/s vs broker", r.req_per_s / broker.req_per_s,
                              ">=", GOAL_VS_BROKER_RPS))
        if ppe and ppe.req_per_s:
            out.append(_ratio(name, "req/s vs ProcessPoolExecutor", r.req_per_s / ppe.req_per_s,
                              ">=", GOAL_VS_PPE_RPS))
        if broker and broker.p50_ms and r.completed:
            out.append(_ratio(name, "p50 vs broker", r.p50_ms / broker.p50_ms, "<=",
                              GOAL_VS_BROKER_P50))
    return out


def _ratio(system: str, what: str, value: float, op: str, goal: float) -> dict[str, Any]:
    met = value >= goal if op == ">=" else value <= goal
    return {"system": system, "ratio": what, "value": round(value, 3),
            "goal": f"{op} {goal}", "met": met}


def format_table(results: dict[str, Result], rats: list[dict[str, Any]]) -> str:
    cols = ("system", "req/s", "p50 ms", "p99 ms", "mean ms", "completed", "errors")
    rows = [(r.system, f"{r.req_per_s:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
             f"{r.mean_ms:.2f}", str(r.completed), str(r.errors)) for r in results.values()]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(cols, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths, strict=True))))
    if rats:
        lines.append("")
        width = max(len(f"{x['system']} {x['ratio']}") for x in rats)
        for x in rats:
            label = f"{x['system']} {x['ratio']}"
            lines.append(f"{label.ljust(width)}  {x['value']:6.2f}x   goal {x['goal']}x  "
                         f"{'met' if x['met'] else 'NOT met'}")
    for r in results.values():
        if r.first_error:
            lines.append(f"{r.system}: {r.errors} errors, first: {r.first_error}")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------------
def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="workerpool vs a minimal pyzmq broker vs ProcessPoolExecutor: closed-loop "
                    "no-op echo throughput and latency.")
    ap.add_argument("--duration", type=float, default=5.0,
                    help="measured seconds per system (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="seconds run before measuring, per system (default 1)")
    ap.add_argument("--outstanding", type=int, default=256,
                    help="requests kept in flight (default 256)")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.outstanding < 1:
        ap.error("--duration must be > 0, --warmup >= 0, --outstanding >= 1")
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")

    signal.signal(signal.SIGTERM, _on_sigterm)
    runners: dict[str, Callable[[argparse.Namespace, str], Result]] = {
        "wp1": lambda a, d: run_workerpool(1, a, d),
        "wp64": lambda a, d: run_workerpool(64, a, d),
        "broker": run_broker,
        "ppe": run_ppe,
    }
    workdir = tempfile.mkdtemp(prefix="wp-bench-")
    results: dict[str, Result] = {}
    try:
        for key in chosen:
            if not args.json:
                print(f"running {SYSTEMS[key]} ({args.warmup:g}s warm-up + {args.duration:g}s)...",
                      file=sys.stderr, flush=True)
            results[SYSTEMS[key]] = runners[key](args, workdir)
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rats = ratios(results)
    if args.json:
        print(json.dumps({
            "config": {"duration_s": args.duration, "warmup_s": args.warmup,
                       "outstanding": args.outstanding, "payload": {"i": "<n>"},
                       "workers": 2, "python": platform.python_version(),
                       "cpus": os.cpu_count(), "platform": platform.platform()},
            "results": {name: asdict(r) for name, r in results.items()},
            "ratios": rats,
        }, indent=2))
    else:
        print(f"closed loop, {args.outstanding} outstanding, no-op echo of {{'i': n}}, 2 workers, "
              f"{args.duration:g}s measured after {args.warmup:g}s warm-up, "
              f"{os.cpu_count()} CPUs")
        print(format_table(results, rats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
