"""Overload: workerpool offered 10x its capacity, open loop, for both capacity policies.

Setup, per policy: ``python -m workerpool.cli up --handler workerpool.handlers:Echo
--workers 2 --max-inflight 1`` in its own session; every request is ``sleep``
``{"seconds": S}`` (``--service-time``, default 0.01 s), so the pool's capacity is
``C = workers * max_inflight / S = 2 / S`` (200 req/s). It is offered ``--rate-multiple``
(default 10) times C, 2000 req/s, for ``--warmup`` (default 1) + ``--duration`` (default
20) seconds. The two policies run one after the other, each on a fresh pool, and are
reported side by side:

- ``queue``: ``--capacity-policy queue --queue-capacity 100 --max-wait 0.5``
- ``reject``: ``--capacity-policy reject``

Open loop: request ``i`` is due at ``t0 + i / rate`` and is sent then, whatever happened
to the ones before it. The offering runs in ``--procs`` child processes (default 1),
each an asyncio loop with one ``AsyncClient`` that sends its share of the schedule
(process ``k`` of ``N`` sends ``i = k, k + N, ...``) and catches up in a burst when it
wakes late. Every latency is measured from the request's *intended* send time
(``time.monotonic``, one clock for every process), so a client that falls behind is
charged for it, not hidden (no coordinated omission). How far behind the senders were is
reported as ``send lag``; if the offered rate falls short of the target the output says
so and ``--procs`` should be raised.

Figures, per policy (the "window" is the ``--duration`` seconds after the warm-up):

- offered: requests due in the window / duration, and what was actually sent.
- admitted throughput: successful results (retries included) completed in the window /
  duration, and its ratio to C.
- latency of admitted requests, from the intended send time: p50, p99, max (window);
  the router's ``queue_wait_p50_ms`` / ``queue_wait_p99_ms`` and service time
  (``status``, over its last 1024 requests).
- rejections: ``BackpressureError`` count (refused at admission vs shed after
  ``max_wait`` in the queue, told apart by the router's message), ``retry_after``
  min / median / max, and how long a rejection took to arrive.
- retry_after usability, measured two ways:
  1. *One retry*: rejected requests spread over the window are sent once more, in turn
     one of three ways (up to ``--retry-sample``, default 200, each): after exactly their
     ``retry_after``; after a random delay uniform in ``[0, 2 * retry_after]`` (the same
     mean); at once. Only rejections whose longest delay still falls inside the flood are
     sampled, so all three meet the same overload. Reported: the fraction of each that
     got a result (95% Wilson interval), and the fraction of scheduled fresh requests
     that did. While the flood lasts, the pool serves about C / offered of what arrives,
     whenever it arrives: no delay can make a single retry likely to succeed (a request
     sent off the fixed schedule even does worse than a scheduled one: it lands inside
     the gap between two scheduled arrivals, and only a worker or queue slot freed since
     the previous arrival admits it). ``retry_after`` is called
     usable if obeying it is not significantly worse (one-sided 95%, two-proportion z)
     than waiting the random delay with the same mean.
  2. *Prediction vs observation*: ``retry_after`` claims the time until the work ahead
     of a refused request has drained. Compared with what was observed: for ``queue``,
     the router's queue-wait p50 of admitted requests (how long the queue ahead actually
     took to drain); for ``reject``, the mean time between completions (1 / admitted
     throughput: how long until a worker frees).
- other errors by type, and requests left without any reply after ``--drain`` seconds
  (must be 0).
- the router's RSS (``VmRSS`` of ``/proc/<router pid>/status``, pid from ``status``):
  before the flood, peak (sampled every 0.5 s), after it, and the growth.
- the router's counters after the flood (``rejected_backpressure``, ``expired``,
  ``cancelled``, ``late_results``, ``completed``, ``errored``, the router's own
  ``counters``), cross-checked against what the clients saw.

For ``queue``, the check ``max latency <= max_wait + S + --margin`` (default 0.05 s) is
made on latency from the *actual* send, over every admitted request of the run: that is
the pool's promise. The same maximum from the intended send time (which adds the
sender's own lag) is reported next to it.

Requests carry no timeout by default (``--timeout`` sets one): a request the router
forgot then shows up as "no reply" instead of being masked by the router's deadline.

Usage::

    .venv/bin/python bench/overload.py                       # 20 s per policy, table
    .venv/bin/python bench/overload.py --duration 5 --json   # one JSON object
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import platform
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import _pool  # noqa: E402  (bench/ is the script's directory, first on sys.path)
from _pool import READY_TIMEOUT, BenchError, nearest_rank  # noqa: E402

from workerpool import AsyncClient, Client  # noqa: E402  (after the sys.path fix above)
from workerpool.errors import BackpressureError, WorkerPoolError  # noqa: E402

WORKERS = 2
MAX_INFLIGHT = 1
METHOD = "sleep"
POLICIES = ("queue", "reject")

# Outcome of one request.
OK, REJECTED, OTHER, NO_REPLY = 0, 1, 2, 3
# Kind of a rejection, from the router's message.
AT_ADMISSION, SHED_MAX_WAIT, DISPLACED = 0, 1, 2
REJECTION_KINDS = {AT_ADMISSION: "refused at admission", SHED_MAX_WAIT: "shed after max_wait",
                   DISPLACED: "displaced by higher priority"}
NAN = float("nan")
# How a sampled rejected request is retried once: after its retry_after, after a random
# delay with the same mean (uniform in [0, 2 * retry_after]), or at once.
ARMS = ("retry_after", "random", "immediate")
ARM_LABELS = {"retry_after": "after retry_after", "random": "after U(0, 2*retry_after)",
              "immediate": "immediately"}


# -- statistics ------------------------------------------------------------------------------------
def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if not n:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_z(s1: int, n1: int, s2: int, n2: int) -> float | None:
    """z statistic of p1 - p2 (pooled); None when it is undefined."""
    if not n1 or not n2:
        return None
    p = (s1 + s2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    return 0.0 if se == 0 else (s1 / n1 - s2 / n2) / se


def dist_ms(values_s: list[float]) -> dict[str, Any]:
    """n, p50, p99, max in milliseconds (nearest rank); None figures when empty."""
    v = sorted(values_s)
    if not v:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"n": len(v), "p50_ms": round(nearest_rank(v, 0.5) * 1e3, 3),
            "p99_ms": round(nearest_rank(v, 0.99) * 1e3, 3), "max_ms": round(v[-1] * 1e3, 3)}


# -- the offering processes ------------------------------------------------------------------------
def rejection_kind(exc: BackpressureError) -> int:
    msg = exc.message
    if "waited max_wait" in msg:
        return SHED_MAX_WAIT
    if "displaced" in msg:
        return DISPLACED
    return AT_ADMISSION


def offerer_main(conn: Any, plan: dict) -> None:
    """Entry point of one offering process (multiprocessing, spawn). Ctrl-C is the
    parent's business: it terminates us."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        asyncio.run(_offer(conn, plan))
    except BaseException as exc:  # tell the parent instead of dying silently
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        conn.close()


async def _offer(conn: Any, plan: dict) -> None:
    rate, procs, k = plan["rate"], plan["procs"], plan["index"]
    n = len(range(k, plan["total"], procs))  # this process's share of the schedule
    payload = {"seconds": plan["service_time"]}
    timeout = plan["timeout"]
    client = AsyncClient(plan["address"])
    try:
        await client.status(timeout=READY_TIMEOUT)  # connected, and the router answers
        conn.send(("ready", os.getpid()))
        t0 = conn.recv()  # the common start time (time.monotonic); blocking is fine here
        cpu0 = time.process_time()
        t_win0 = t0 + plan["warmup"]
        t_end = t_win0 + plan["duration"]
        loop = asyncio.get_running_loop()
        monotonic = time.monotonic

        sent = array.array("d", [NAN]) * n  # actual send time - t0
        done = array.array("d", [NAN]) * n  # reply time - t0
        outcome = array.array("b", [NO_REPLY]) * n
        retry_after = array.array("d", [NAN]) * n
        rej_kind = array.array("b", [-1]) * n
        other: Counter[str] = Counter()
        retries: list[dict] = []  # one per sampled rejection
        tasks: set[asyncio.Task] = set()  # retry senders, referenced until they finish
        state = {"pending": 0, "rejections": 0, "sampled": 0}
        quota = dict(plan["retry_quota"])  # arm -> retries this process still owes
        rng = random.Random(1000 + k)
        idle = asyncio.Event()
        idle.set()

        def due(j: int) -> float:
            return t0 + (k + procs * j) / rate

        def settle() -> None:
            state["pending"] -= 1
            if not state["pending"]:
                idle.set()

        def on_primary(j: int, fut: asyncio.Future) -> None:
            t = monotonic()
            done[j] = t - t0
            exc = None if fut.cancelled() else fut.exception()
            if fut.cancelled():
                outcome[j] = OTHER
                other["CancelledError"] += 1
            elif exc is None:
                outcome[j] = OK
            elif isinstance(exc, BackpressureError):
                outcome[j] = REJECTED
                retry_after[j] = exc.retry_after
                rej_kind[j] = rejection_kind(exc)
                maybe_retry(j, t, exc.retry_after)
            else:
                outcome[j] = OTHER
                other[type(exc).__name__] += 1
            settle()

        def maybe_retry(j: int, t_rejected: float, after: float) -> None:
            # Same eligibility for every arm: the longest delay (2 * retry_after) must
            # still fall inside the flood.
            if due(j) < t_win0 or t_rejected + 2 * after >= t_end:
                return
            state["rejections"] += 1
            if state["rejections"] % plan["retry_every"]:
                return
            arm = ARMS[state["sampled"] % len(ARMS)]
            state["sampled"] += 1
            if quota[arm] <= 0:
                return
            quota[arm] -= 1
            delay = {"retry_after": after, "random": rng.uniform(0.0, 2 * after),
                     "immediate": 0.0}[arm]
            entry = {"primary": j, "arm": arm, "retry_after": after, "delay": delay,
                     "due": t_rejected + delay - t0, "sent": NAN, "done": NAN,
                     "outcome": NO_REPLY, "error": None}
            retries.append(entry)
            state["pending"] += 1
            loop.call_at(t_rejected + delay, start_retry, entry)

        def start_retry(entry: dict) -> None:
            task = loop.create_task(send_retry(entry))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def send_retry(entry: dict) -> None:
            entry["sent"] = monotonic() - t0
            try:
                fut = await client.submit(METHOD, payload, timeout=timeout)
            except WorkerPoolError as exc:
                entry.update(done=monotonic() - t0, outcome=OTHER, error=type(exc).__name__)
                settle()
                return
            fut.add_done_callback(lambda f: on_retry(entry, f))

        def on_retry(entry: dict, fut: asyncio.Future) -> None:
            entry["done"] = monotonic() - t0
            exc = None if fut.cancelled() else fut.exception()
            if exc is None and not fut.cancelled():
                entry["outcome"] = OK
            elif isinstance(exc, BackpressureError):
                entry.update(outcome=REJECTED, error=REJECTION_KINDS[rejection_kind(exc)])
            else:
                entry.update(outcome=OTHER, error=type(exc).__name__ if exc else "CancelledError")
            settle()

        j = 0
        while j < n:
            now = monotonic()
            wait = due(j) - now
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            # Send everything that is due (a burst when we woke late): the schedule rules.
            while j < n and due(j) <= now:
                sent[j] = monotonic() - t0
                state["pending"] += 1
                idle.clear()
                try:
                    fut = await client.submit(METHOD, payload, timeout=timeout)
                except WorkerPoolError as exc:
                    done[j] = monotonic() - t0
                    outcome[j] = OTHER
                    other[type(exc).__name__] += 1
                    settle()
                else:
                    fut.add_done_callback(lambda f, j=j: on_primary(j, f))
                j += 1
        # The flood is over: wait for every reply (retries included), up to the drain limit.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(idle.wait(), max(0.0, t_end + plan["drain"] - monotonic()))
        conn.send(("result", {
            "index": k, "n": n, "sent": sent, "done": done, "outcome": outcome,
            "retry_after": retry_after, "rej_kind": rej_kind, "other": dict(other),
            "retries": retries, "unanswered": state["pending"],
            "cpu_s": time.process_time() - cpu0, "wall_s": monotonic() - t0,
        }))
    finally:
        await client.close()


@contextlib.contextmanager
def offerers(plans: list[dict]) -> Iterator[list[tuple[Any, Any]]]:
    """Start one spawned process per plan; yield [(process, pipe)]; always stop them."""
    ctx = multiprocessing.get_context("spawn")
    started: list[tuple[Any, Any]] = []
    try:
        for plan in plans:
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(target=offerer_main, args=(child_end, plan), daemon=True,
                            name=f"overload-offerer-{plan['index']}")
            p.start()
            child_end.close()
            started.append((p, parent_end))
        yield started
    finally:
        for p, _ in started:
            if p.is_alive():
                p.terminate()
        for p, pipe in started:
            p.join(3)
            if p.is_alive():
                p.kill()
                p.join(3)
            pipe.close()


def _receive(pipe: Any, deadline: float, what: str) -> tuple[str, Any]:
    if not pipe.poll(max(0.0, deadline - time.monotonic())):
        raise BenchError(f"{what}: no answer from an offering process in time")
    try:
        tag, value = pipe.recv()
    except EOFError:
        raise BenchError(f"{what}: an offering process exited without answering") from None
    if tag == "error":
        raise BenchError(f"{what}: an offering process failed: {value}")
    return tag, value


# -- the pool --------------------------------------------------------------------------------------
def pool_flags(policy: str, args: argparse.Namespace) -> list[str]:
    if policy == "queue":
        return ["--capacity-policy", "queue", "--queue-capacity", str(args.queue_capacity),
                "--max-wait", f"{args.max_wait:g}"]
    return ["--capacity-policy", "reject"]


@contextlib.contextmanager
def pool(workdir: str, policy: str, args: argparse.Namespace) -> Iterator[tuple[list[str], str]]:
    """``workerpool up`` for one capacity policy; yields (argv, frontend address)."""
    flags = ["--max-inflight", str(MAX_INFLIGHT), *pool_flags(policy, args), "--drain-timeout", "2"]
    with _pool.pool(workdir, policy, workers=WORKERS, flags=flags) as (_, frontend, argv):
        yield argv, frontend


def vmrss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_workers(client: Client) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT
    st: dict = {}
    while time.monotonic() < deadline:
        st = client.status(timeout=10)
        ws = st["workers"]
        if len(ws) == WORKERS and all(w["state"] == "ready" for w in ws):
            return st
        time.sleep(0.05)
    raise BenchError(f"{WORKERS} ready workers not seen within {READY_TIMEOUT:.0f}s; last: "
                     f"{[(w['id'], w['state']) for w in st.get('workers', [])]}")


# -- one policy ------------------------------------------------------------------------------------
def run_policy(policy: str, args: argparse.Namespace, workdir: str,
               say: Any) -> dict[str, Any]:
    capacity = WORKERS * MAX_INFLIGHT / args.service_time
    rate = args.rate_multiple * capacity
    total_s = args.warmup + args.duration
    total = round(rate * total_s)
    expected_rejections = max(1.0, (rate - capacity) * args.duration)
    per_proc_quota = [len(range(k, args.retry_sample, args.procs)) for k in range(args.procs)]
    per_proc_rejections = expected_rejections / args.procs
    retry_every = max(1, int(0.7 * per_proc_rejections
                             / max(1, len(ARMS) * max(per_proc_quota))))
    with pool(workdir, policy, args) as (argv, addr), Client(addr) as client:
        st0 = wait_workers(client)
        router_pid = int(st0["router"]["pid"])
        rss = {"start_kib": vmrss_kib(router_pid)}
        plans = [{"address": addr, "rate": rate, "procs": args.procs, "index": k,
                  "total": total, "service_time": args.service_time, "warmup": args.warmup,
                  "duration": args.duration, "drain": args.drain, "timeout": args.timeout,
                  "retry_quota": dict.fromkeys(ARMS, per_proc_quota[k]), "retry_every": retry_every}
                 for k in range(args.procs)]
        say(f"{policy}: offering {rate:,.0f} req/s ({args.rate_multiple:g}x C={capacity:,.0f}) "
            f"for {args.warmup:g}+{args.duration:g}s from {args.procs} process(es)...")
        with offerers(plans) as procs:
            deadline = time.monotonic() + READY_TIMEOUT
            for _, pipe in procs:
                _receive(pipe, deadline, "start")
            t0 = time.monotonic() + 0.2
            for _, pipe in procs:
                pipe.send(t0)
            t_end = t0 + total_s
            cpu_start = cpu_seconds(router_pid)
            peak = rss["start_kib"] or 0
            st_flood: dict | None = None
            while time.monotonic() < t_end:
                time.sleep(min(0.5, max(0.0, t_end - time.monotonic())))
                peak = max(peak, vmrss_kib(router_pid) or 0)
                if st_flood is None and time.monotonic() >= t_end - 0.6:
                    st_flood = client.status(timeout=10)  # a snapshot while still flooded
            cpu_end = cpu_seconds(router_pid)
            rss["router_cpu_cores_during_flood"] = (
                None if cpu_start is None or cpu_end is None
                else round((cpu_end - cpu_start) / (time.monotonic() - t0), 3))
            deadline = t_end + args.drain + 30.0
            parts = [_receive(pipe, deadline, "result")[1] for _, pipe in procs]
        st_end = client.status(timeout=10)
        rss.update(peak_kib=max(peak, vmrss_kib(router_pid) or 0),
                   end_kib=vmrss_kib(router_pid))
    if rss["start_kib"] is not None and rss["end_kib"] is not None:
        rss["growth_kib"] = rss["end_kib"] - rss["start_kib"]
    return analyse(policy, args, capacity, rate, parts, st_flood or st_end, st_end, rss,
                   " ".join(["python", *argv[1:]]))


def analyse(policy: str, args: argparse.Namespace, capacity: float, rate: float,
            parts: list[dict], st_flood: dict, st_end: dict, rss: dict,
            command: str) -> dict[str, Any]:
    win0, win1 = args.warmup, args.warmup + args.duration
    procs = args.procs
    due_win = 0
    sent_win = 0
    lags: list[float] = []
    lat_win: list[float] = []
    lat_all: list[float] = []
    lat_sent_all: list[float] = []
    ok_done_win = 0
    ok_win = 0
    rej_ra: list[float] = []
    rej_latency: dict[str, list[float]] = {}
    rej_kinds: Counter[str] = Counter()
    rejected_total = 0
    rejected_win = 0
    other: Counter[str] = Counter()
    no_reply = 0
    primaries = 0
    ok_total = 0
    retries: list[dict] = []
    for part in parts:
        k, n = part["index"], part["n"]
        sent, done, outcome = part["sent"], part["done"], part["outcome"]
        ras, kinds = part["retry_after"], part["rej_kind"]
        other.update(part["other"])
        retries.extend(part["retries"])
        primaries += n
        for j in range(n):
            intended = (k + procs * j) / rate
            in_win = win0 <= intended < win1
            o = outcome[j]
            if in_win:
                due_win += 1
                if sent[j] == sent[j]:
                    lags.append(sent[j] - intended)
            if win0 <= sent[j] < win1:
                sent_win += 1
            if o == OK:
                ok_total += 1
                lat = done[j] - intended
                lat_all.append(lat)
                lat_sent_all.append(done[j] - sent[j])
                if in_win:
                    ok_win += 1
                    lat_win.append(lat)
                if win0 <= done[j] < win1:
                    ok_done_win += 1
            elif o == REJECTED:
                rejected_total += 1
                if in_win:
                    rejected_win += 1
                    rej_ra.append(ras[j])
                    kind = REJECTION_KINDS.get(kinds[j], "other")
                    rej_kinds[kind] += 1
                    rej_latency.setdefault(kind, []).append(done[j] - intended)
            elif o == NO_REPLY:
                no_reply += 1
    retry_out: dict[str, Counter[str]] = {arm: Counter() for arm in ARMS}
    retry_lat: dict[str, list[float]] = {arm: [] for arm in ARMS}
    retry_delay: dict[str, list[float]] = {arm: [] for arm in ARMS}
    retry_rejected = 0
    for r in retries:
        out = retry_out[r["arm"]]
        out["sampled"] += 1
        retry_delay[r["arm"]].append(r["delay"])
        if r["outcome"] == OK:
            out["served"] += 1
            ok_total += 1
            lat_all.append(r["done"] - r["due"])
            lat_sent_all.append(r["done"] - r["sent"])
            retry_lat[r["arm"]].append(r["done"] - r["due"])
            if win0 <= r["done"] < win1:
                ok_done_win += 1
        elif r["outcome"] == REJECTED:
            out[f"rejected again ({r['error']})"] += 1
            retry_rejected += 1
        elif r["outcome"] == OTHER:
            out[f"error {r['error']}"] += 1
            other[f"{r['error']} (on a retry)"] += 1
        else:
            out["no reply"] += 1
            no_reply += 1
    throughput = ok_done_win / args.duration
    svc = next((s for s in st_end["services"] if s["name"] == "default"), st_end["services"][0])
    svc_flood = next((s for s in st_flood["services"] if s["name"] == svc["name"]), svc)
    ra_sorted = sorted(rej_ra)
    latency = dist_ms(lat_win)
    latency_all = dist_ms(lat_all)
    latency_sent_all = dist_ms(lat_sent_all)
    cpu = sum(p["cpu_s"] for p in parts) / max(1e-9, max(p["wall_s"] for p in parts))
    lag = dist_ms(lags)
    res: dict[str, Any] = {
        "policy": policy,
        "pool": {"capacity_policy": policy, "workers": WORKERS, "max_inflight": MAX_INFLIGHT,
                 **({"queue_capacity": args.queue_capacity, "max_wait_s": args.max_wait}
                    if policy == "queue" else {}),
                 "command": command},
        "capacity_rps": round(capacity, 3),
        "offered": {
            "target_rps": round(rate, 3),
            "due_in_window": due_win,
            "sent_rps": round(sent_win / args.duration, 1),
            "sent_vs_target": round(sent_win / args.duration / rate, 3),
            "send_lag": lag,
            "requests_total": primaries,
            "procs": procs,
            "offerer_cpu_cores": round(cpu, 3),
        },
        "admitted": {
            "throughput_rps": round(throughput, 1),
            "vs_capacity": round(throughput / capacity, 3),
            "served_in_window": ok_win,
            "served_fraction_of_offered": round(ok_win / due_win, 4) if due_win else None,
            "served_total": ok_total,
            "latency_from_intended": latency,
            "latency_all_admitted": latency_all,
            "latency_all_admitted_from_send": latency_sent_all,
            "router_queue_wait_p50_ms": svc["queue_wait_p50_ms"],
            "router_queue_wait_p99_ms": svc["queue_wait_p99_ms"],
            "router_service_time_p50_ms": svc["service_time_p50_ms"],
            "router_service_time_p99_ms": svc["service_time_p99_ms"],
        },
        "rejections": {
            "in_window": rejected_win,
            "total": rejected_total,
            "by_kind_in_window": dict(rej_kinds),
            "retry_after_s": ({"min": ra_sorted[0], "median": nearest_rank(ra_sorted, 0.5),
                               "max": ra_sorted[-1]} if ra_sorted else None),
            "time_to_rejection_by_kind": {k: dist_ms(v) for k, v in rej_latency.items()},
        },
        "other_errors": dict(other),
        "no_reply": no_reply,
        "router_rss": rss,
        "router_status_end": {
            k: svc[k] for k in ("completed", "errored", "rejected_backpressure", "expired",
                                "cancelled", "late_results", "queued", "in_flight")
        } | {"queued_during_flood": svc_flood["queued"],
             "router_requests": st_end["router"]["requests"],
             "router_counters": st_end["router"]["counters"]},
    }
    # retry_after, way 1: one retry after it, against the same retry at other delays.
    arms: dict[str, Any] = {}
    for arm in ARMS:
        out = retry_out[arm]
        n_arm, ok_arm = out["sampled"], out["served"]
        lo, hi = wilson(ok_arm, n_arm)
        arms[arm] = {"sampled": n_arm, "served": ok_arm,
                     "served_fraction": round(ok_arm / n_arm, 4) if n_arm else None,
                     "served_fraction_95ci": [round(lo, 4), round(hi, 4)],
                     "mean_delay_ms": (round(sum(retry_delay[arm]) / n_arm * 1e3, 3)
                                       if n_arm else None),
                     "outcomes": {k: v for k, v in out.items() if k != "sampled"},
                     "served_latency_from_retry_time": dist_ms(retry_lat[arm])}
    ra, rnd = arms["retry_after"], arms["random"]
    z = two_proportion_z(ra["served"], ra["sampled"], rnd["served"], rnd["sampled"])
    res["retry_once"] = {
        "arms": arms,
        "fresh_served_fraction": round(ok_win / due_win, 4) if due_win else None,
        "z_retry_after_vs_random": None if z is None else round(z, 2),
        # Usable: obeying retry_after is not significantly worse (95%, one-sided) than
        # waiting a random time with the same mean.
        "usable": None if z is None else z > -1.645,
    }
    # retry_after, way 2: the prediction vs the drain actually observed.
    predicted = res["rejections"]["retry_after_s"]["median"] if ra_sorted else None
    if policy == "queue":
        qw = svc["queue_wait_p50_ms"]
        observed = None if qw is None else qw / 1e3
        basis = "router queue_wait_p50 (time the queue ahead took to drain)"
    else:
        observed = 1.0 / throughput if throughput else None
        basis = "1 / admitted throughput (mean time until a worker frees)"
    res["retry_after_vs_observed"] = {
        "predicted_s": predicted, "observed_s": None if observed is None else round(observed, 4),
        "ratio": round(predicted / observed, 3) if predicted and observed else None,
        "observed_basis": basis,
    }
    # Checks.
    checks: dict[str, Any] = {
        "no_reply_is_zero": no_reply == 0,
        "offered_rate_reached": sent_win / args.duration >= 0.95 * rate,
        "throughput_near_capacity": throughput >= 0.8 * capacity,
        "router_agrees_with_clients": (svc["completed"] == ok_total
                                       and svc["rejected_backpressure"] == rejected_total
                                       + retry_rejected),
    }
    if policy == "queue":
        bound_ms = (args.max_wait + args.service_time + args.margin) * 1e3
        checks["max_latency_bound_ms"] = round(bound_ms, 1)
        # The pool's promise runs from when the request was sent; the client's own send
        # lag (reported above) is not the pool's doing. From the intended time: info only.
        checks["max_latency_within_bound"] = (latency_sent_all["max_ms"] is not None
                                              and latency_sent_all["max_ms"] <= bound_ms)
        checks["info_max_latency_from_intended_within_bound"] = (
            latency_all["max_ms"] is not None and latency_all["max_ms"] <= bound_ms)
    res["checks"] = checks
    return res


# -- reporting -------------------------------------------------------------------------------------
def _f(v: Any, fmt: str = "{:,.1f}") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (int, float)):
        return fmt.format(v)
    return str(v)


def format_table(results: dict[str, dict], args: argparse.Namespace) -> str:
    names = list(results)
    headers = {"queue": f"queue (cap {args.queue_capacity}, max_wait {args.max_wait:g}s)",
               "reject": "reject"}
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn: Any) -> None:
        vals = []
        for n in names:
            try:
                vals.append(fn(results[n]))
            except (KeyError, TypeError):
                vals.append("-")
        rows.append((label, vals))

    def mib(kib: Any) -> str:
        return "-" if kib is None else f"{kib / 1024:,.1f}"

    row("capacity C (req/s)", lambda r: _f(r["capacity_rps"], "{:,.0f}"))
    row("offered target (req/s)", lambda r: _f(r["offered"]["target_rps"], "{:,.0f}"))
    row("offered, sent (req/s)", lambda r: f"{r['offered']['sent_rps']:,.0f} "
        f"({r['offered']['sent_vs_target']:.2f}x target)")
    row("offerer CPU (cores)", lambda r: _f(r["offered"]["offerer_cpu_cores"], "{:.2f}"))
    row("send lag p50/p99/max (ms)", lambda r: "/".join(
        _f(r["offered"]["send_lag"][k], "{:.1f}") for k in ("p50_ms", "p99_ms", "max_ms")))
    row("admitted throughput (req/s)", lambda r: _f(r["admitted"]["throughput_rps"]))
    row("  vs capacity C", lambda r: _f(r["admitted"]["vs_capacity"], "{:.3f}x"))
    row("  served / offered", lambda r: _f(r["admitted"]["served_fraction_of_offered"], "{:.3f}"))
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
        row(f"admitted latency {label} (ms)",
            lambda r, key=key: _f(r["admitted"]["latency_from_intended"][key]))
    row("  max, whole run, from intended (ms)",
        lambda r: _f(r["admitted"]["latency_all_admitted"]["max_ms"]))
    row("  max, whole run, from send (ms)",
        lambda r: _f(r["admitted"]["latency_all_admitted_from_send"]["max_ms"]))
    row("  bound max_wait+S+margin (ms)", lambda r: _f(r["checks"]["max_latency_bound_ms"])
        + (" ok" if r["checks"]["max_latency_within_bound"] else " EXCEEDED"))
    row("router queue wait p50/p99 (ms)", lambda r: f"{_f(r['admitted']['router_queue_wait_p50_ms'])}"
        f"/{_f(r['admitted']['router_queue_wait_p99_ms'])}")
    row("router service time p50/p99 (ms)",
        lambda r: f"{_f(r['admitted']['router_service_time_p50_ms'])}"
        f"/{_f(r['admitted']['router_service_time_p99_ms'])}")
    row("BackpressureError (window/total)",
        lambda r: f"{r['rejections']['in_window']:,}/{r['rejections']['total']:,}")
    for kind in REJECTION_KINDS.values():
        if any(kind in r["rejections"]["by_kind_in_window"] for r in results.values()):
            row(f"  {kind}", lambda r, kind=kind: f"{r['rejections']['by_kind_in_window'].get(kind, 0):,}")
    row("retry_after min/med/max (ms)", lambda r: "/".join(
        _f(r["rejections"]["retry_after_s"][k] * 1e3) for k in ("min", "median", "max")))
    for kind in REJECTION_KINDS.values():
        if any(kind in r["rejections"]["time_to_rejection_by_kind"] for r in results.values()):
            row(f"  time to it p50/p99 ({kind.split()[0]}, ms)", lambda r, kind=kind: "/".join(
                _f(r["rejections"]["time_to_rejection_by_kind"][kind][k])
                for k in ("p50_ms", "p99_ms")))
    row("one retry of a rejected request:", lambda r: "served (95% CI)")
    for arm in ARMS:
        row(f"  {ARM_LABELS[arm]}", lambda r, arm=arm: "{}/{} {} ({:.0%}..{:.0%})".format(
            r["retry_once"]["arms"][arm]["served"], r["retry_once"]["arms"][arm]["sampled"],
            _f(r["retry_once"]["arms"][arm]["served_fraction"], "{:.1%}"),
            *r["retry_once"]["arms"][arm]["served_fraction_95ci"]))
    row("  (scheduled fresh request)",
        lambda r: _f(r["retry_once"]["fresh_served_fraction"], "{:.1%}"))
    row("  retry_after usable (not worse)", lambda r: "{} (z={})".format(
        _f(r["retry_once"]["usable"]), _f(r["retry_once"]["z_retry_after_vs_random"], "{:+.2f}")))
    row("retry_after predicted/observed (ms)", lambda r: (
        f"{_f(r['retry_after_vs_observed']['predicted_s'] * 1e3)}/"
        f"{_f(r['retry_after_vs_observed']['observed_s'] * 1e3)} "
        f"({_f(r['retry_after_vs_observed']['ratio'], '{:.2f}x')})"))
    row("other errors", lambda r: ", ".join(f"{k}={v}" for k, v in r["other_errors"].items())
        or "0")
    row("requests without any reply", lambda r: str(r["no_reply"]))
    row("router RSS start/peak/end (MiB)", lambda r: "/".join(
        mib(r["router_rss"].get(k)) for k in ("start_kib", "peak_kib", "end_kib")))
    row("router RSS growth (MiB)", lambda r: mib(r["router_rss"].get("growth_kib")))
    row("router CPU during flood (cores)",
        lambda r: _f(r["router_rss"]["router_cpu_cores_during_flood"], "{:.2f}"))
    for key in ("completed", "rejected_backpressure", "expired", "cancelled", "late_results",
                "errored"):
        row(f"router {key}", lambda r, key=key: f"{r['router_status_end'][key]:,}")
    row("router queued (flood/end)", lambda r: f"{r['router_status_end']['queued_during_flood']}"
        f"/{r['router_status_end']['queued']}")
    row("router counters", lambda r: ", ".join(
        f"{k}={v}" for k, v in sorted(r["router_status_end"]["router_counters"].items())) or "-")
    row("router agrees with clients", lambda r: _f(r["checks"]["router_agrees_with_clients"]))

    cols = [headers.get(n, n) for n in names]
    w0 = max(len(label) for label, _ in rows)
    widths = [max(len(c), *(len(vals[i]) for _, vals in rows)) for i, c in enumerate(cols)]
    out = ["".ljust(w0) + "  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    out.append("-" * w0 + "  " + "  ".join("-" * w for w in widths))
    for label, vals in rows:
        out.append(label.ljust(w0) + "  " + "  ".join(v.rjust(w)
                                                     for v, w in zip(vals, widths, strict=True)))
    return "\n".join(out)


EXPLAIN = """\
Latencies are measured from each request's intended send time (open loop). Throughput
counts successful results (sampled retries included) completed in the window.
one retry: rejected requests spread over the window (up to {sample} per arm, in turn)
are sent once more, after retry_after, after a random delay with the same mean, or at
once, while the flood still runs. Offered {mult:g}x its capacity, the pool can serve about
1/{mult:g} of what arrives whenever it arrives, so no delay makes one retry likely to
succeed; retry_after is called usable if obeying it is not significantly worse (one-sided
95%, z > -1.645) than the random delay. Every retry does worse than a scheduled fresh
request whatever its delay: it is sent off the schedule, on average well inside the gap
between two scheduled arrivals, and only a worker (or queue slot) freed since the last
arrival admits it. Compare the three arms with each other, not with fresh requests.
predicted/observed: the median retry_after against the drain actually seen: queue wait
p50 of admitted requests (queue), or 1/throughput, the mean time until a worker frees
(reject). The max-latency check uses latency from the actual send (the pool's promise);
from the intended time it also includes the sender's lag, shown above."""


def verdicts(results: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in results.items():
        bad = [k for k, v in r["checks"].items()
               if isinstance(v, bool) and not v and not k.startswith("info_")]
        if bad:
            lines.append(f"{name}: check(s) failed: {', '.join(bad)}")
        if not r["checks"]["offered_rate_reached"]:
            lines.append(f"{name}: the offering processes sent only "
                         f"{r['offered']['sent_rps']:,.0f} of {r['offered']['target_rps']:,.0f} "
                         f"req/s; raise --procs")
    return lines


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Open-loop overload of a 2-worker pool (sleep S per request) at a multiple "
                    "of its capacity, for the 'queue' and 'reject' capacity policies.")
    ap.add_argument("--duration", type=float, default=20.0,
                    help="measured seconds of overload per policy (default 20)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="seconds of overload before the window, not measured (default 1)")
    ap.add_argument("--rate-multiple", type=float, default=10.0,
                    help="offered rate as a multiple of the capacity 2/S (default 10)")
    ap.add_argument("--service-time", type=float, default=0.01,
                    help="S, seconds each request sleeps in the worker (default 0.01)")
    ap.add_argument("--procs", type=int, default=1,
                    help="processes that offer the load, each an asyncio AsyncClient (default 1)")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="comma-separated subset of queue,reject (default: both)")
    ap.add_argument("--queue-capacity", type=int, default=100,
                    help="the queue policy's --queue-capacity (default 100)")
    ap.add_argument("--max-wait", type=float, default=0.5,
                    help="the queue policy's --max-wait in seconds (default 0.5)")
    ap.add_argument("--margin", type=float, default=0.05,
                    help="seconds allowed over max_wait + S for the latency check (default 0.05)")
    ap.add_argument("--retry-sample", type=int, default=200,
                    help="rejected requests retried once after retry_after (default 200)")
    ap.add_argument("--drain", type=float, default=10.0,
                    help="seconds after the flood to wait for the last replies (default 10)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="per-request timeout sent to the router (default: none)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    if (args.duration <= 0 or args.warmup < 0 or args.rate_multiple <= 0
            or args.service_time <= 0 or args.procs < 1 or args.retry_sample < 0
            or args.drain < 0 or args.max_wait <= 0 or args.queue_capacity < 0):
        ap.error("--duration, --rate-multiple, --service-time, --max-wait must be > 0; "
                 "--procs >= 1; --warmup, --retry-sample, --drain, --queue-capacity >= 0")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        ap.error(f"--policies: choose from {', '.join(POLICIES)}")

    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    results, code = _pool.measure(
        lambda workdir: {p: run_policy(p, args, workdir, say) for p in policies},
        "wp-overload-")
    if results is None:
        return code

    capacity = WORKERS * MAX_INFLIGHT / args.service_time
    config = {"duration_s": args.duration, "warmup_s": args.warmup,
              "rate_multiple": args.rate_multiple, "service_time_s": args.service_time,
              "capacity_rps": capacity, "offered_rps": args.rate_multiple * capacity,
              "procs": args.procs, "retry_sample": args.retry_sample, "margin_s": args.margin,
              "drain_s": args.drain, "timeout_s": args.timeout, "workers": WORKERS,
              "max_inflight": MAX_INFLIGHT, "method": METHOD,
              "python": platform.python_version(), "cpus": os.cpu_count(),
              "platform": platform.platform()}
    problems = verdicts(results)
    if args.json:
        print(json.dumps({"config": config, "results": results, "problems": problems},
                         indent=2))
    else:
        print(f"open-loop overload: {args.rate_multiple:g}x C = {config['offered_rps']:,.0f} req/s "
              f"offered to {WORKERS} Echo workers (sleep {args.service_time * 1e3:g} ms, "
              f"max_inflight {MAX_INFLIGHT}, C = {capacity:,.0f} req/s) for {args.duration:g}s "
              f"after {args.warmup:g}s warm-up, from {args.procs} process(es); "
              f"{os.cpu_count()} CPUs")
        print(format_table(results, args))
        print()
        print(EXPLAIN.format(sample=args.retry_sample, mult=args.rate_multiple))
        for line in problems:
            print(f"PROBLEM: {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
