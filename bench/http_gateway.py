"""The HTTP gateway against the Python Client on the same pool, and against mosec and
LitServe where installed: a no-op echo on 2 workers each, side by side in one run.

::

    gateway:   wrk --HTTP/1.1 keep-alive--> workerpool gateway --ipc--> router --> 2 Echo workers
    client:    Client (in this process) ------------------------------> router --> 2 Echo workers
    mosec:     wrk --HTTP/1.1--> mosec's Rust front --> 2 Python workers (bench/mosec_server.py)
    litserve:  wrk --HTTP/1.1--> 2 uvicorn processes --> 2 Python workers (bench/litserve_server.py)

The HTTP systems are driven by ``wrk`` (Debian's; a Lua script makes the POST) at 1 and
``--connections`` (64) keep-alive connections, one request at a time on each: req/s and
p50/p99 from wrk's own latency report, non-2xx replies counted as errors. The Client runs
bench/peers.py's drivers against the gateway's pool (``Client.call`` one at a time;
``Client.submit`` with 64 outstanding). CPU per request: the CPU time of the server's
whole process group (gateway, router, workers, supervisor; or an HTTP peer's front and
workers) and of the load generator (wrk, or this process for the Client), over the measured
window, divided by the requests answered in it.

Each system is started fresh for each round, in its own process group, always stopped
as a whole. Rounds alternate the order; each figure is the median over ``--rounds``.
Ratios: gateway / best HTTP peer req/s (the peer with the most req/s at that many
connections, named; the issue's goal: >= 1), and gateway / Client. mosec and LitServe are
benchmark-only dependencies, each skipped with the command that installs it where it is
missing (bench/peers.py says which versions).

Usage (on an otherwise idle machine)::

    .venv/bin/python bench/http_gateway.py --rounds 3 --duration 5
    .venv/bin/python bench/http_gateway.py --systems gateway,client --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
for path in (REPO, BENCH):
    if path not in sys.path:
        sys.path.insert(0, path)

import _pool  # noqa: E402
import peers  # noqa: E402

WORKERS = 2
BODY = '{"i": 1}'
WRK_SCRIPT = f"""
wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""


def _seconds(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests, req/s, p50 and p99 (ms) and non-2xx replies from wrk's report."""
    done = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _seconds(re.search(r"\s50%\s+(\S+)", out).group(1)) * 1e3
    p99 = _seconds(re.search(r"\s99%\s+(\S+)", out).group(1)) * 1e3
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"completed": done, "req_per_s": rps, "p50_ms": p50, "p99_ms": p99,
            "errors": (int(bad.group(1)) if bad else 0)
            + (sum(int(g) for g in errors.groups()) if errors else 0)}


def _group_cpu(pgid: int) -> float:
    return sum(_pool.cpu_seconds(pid) for pid in _pool.group_pids(pgid))


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_wrk(url: str, connections: int, args: argparse.Namespace, script: str,
            server_pgid: int) -> dict[str, float]:
    """wrk against ``url``: a warm-up run, then the measured one with CPU counted."""
    base = ["wrk", "-t1", f"-c{connections}", "--latency", "-s", script, url]
    subprocess.run([*base[:3], f"-d{max(1, round(args.warmup))}s", *base[3:]], capture_output=True,
                   check=True, timeout=args.warmup + 30)
    server0, client0 = _group_cpu(server_pgid), _children_cpu()
    out = subprocess.run([*base[:3], f"-d{max(1, round(args.duration))}s", *base[3:]],
                         capture_output=True,
                         text=True, check=True, timeout=args.duration + 30).stdout
    server, client = _group_cpu(server_pgid) - server0, _children_cpu() - client0
    res = parse_wrk(out)
    n = max(1, res["completed"])
    res.update(server_us=server / n * 1e6, client_us=client / n * 1e6)
    return res


def run_client(frontend: str, connections: int, args: argparse.Namespace,
               server_pgid: int) -> dict[str, float]:
    ns = argparse.Namespace(warmup=args.warmup, duration=args.duration, outstanding=connections)
    server0, client0 = _group_cpu(server_pgid), _pool.cpu_seconds(os.getpid())
    runner = peers.workerpool_one if connections == 1 else peers.workerpool_many
    res = runner("client", frontend, ns)
    server, client = _group_cpu(server_pgid) - server0, _pool.cpu_seconds(os.getpid()) - client0
    # The warm-up is inside the runner: count its requests' CPU at the measured rate.
    n = max(1, res.completed) * (args.warmup + args.duration) / args.duration
    return {"completed": res.completed, "req_per_s": res.req_per_s, "p50_ms": res.p50_ms,
            "p99_ms": res.p99_ms, "errors": res.errors,
            "server_us": server / n * 1e6, "client_us": client / n * 1e6}


@contextlib.contextmanager
def serve(system: str, workdir: str) -> Iterator[tuple[Any, int]]:
    """Start ``system``; yield (its URL or frontend, its process group id)."""
    if system in ("gateway", "client"):
        port = _pool.free_tcp_port()
        with _pool.pool(workdir, system, workers=WORKERS,
                        flags=["--http", f"127.0.0.1:{port}"]) as (proc, frontend, _):
            url = f"http://127.0.0.1:{port}/v1/default/echo"
            deadline = time.monotonic() + _pool.READY_TIMEOUT
            while subprocess.run(["curl", "-sf", "-d", BODY, url], capture_output=True,
                                 timeout=10).returncode != 0:
                if time.monotonic() > deadline:
                    raise _pool.BenchError("the gateway did not answer")
                time.sleep(0.1)
            yield (url if system == "gateway" else frontend), proc.pid
        return
    with peers.http_peer(system, "plain", workdir) as ((host, port, path), _, proc):
        yield f"http://{host}:{port}{path}", proc.pid


def available(system: str) -> str | None:
    """Why ``system`` cannot run here, or None."""
    if system != "client" and shutil.which("wrk") is None:
        return "wrk is not installed (apt-get install wrk)"
    if system in peers.HTTP_PEERS:
        return peers.peer_missing(system)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="gateway,client,mosec,litserve")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--duration", type=int, default=5, help="seconds measured per leg")
    ap.add_argument("--warmup", type=int, default=1, help="seconds uncounted before each leg")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    systems, skipped = [], {}
    for s in args.systems.split(","):
        why = available(s)
        if why is None:
            systems.append(s)
        else:
            skipped[s] = why

    def work(workdir: str) -> dict:
        script = os.path.join(workdir, "post.lua")
        with open(script, "w") as f:
            f.write(WRK_SCRIPT)
        results: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.rounds):
            for system in (systems if r % 2 == 0 else systems[::-1]):
                with serve(system, workdir) as (where, pgid):
                    for conns in (1, args.connections):
                        res = (run_client(where, conns, args, pgid) if system == "client"
                               else run_wrk(where, conns, args, script, pgid))
                        results.setdefault((system, conns), []).append(res)
        rows = [{"system": s, "connections": c,
                 **{k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}}
                for (s, c), rs in results.items()]
        return {"rows": rows, "ratios": ratios(rows), "skipped": skipped}

    out, code = _pool.measure(work, "wp-bench-http-")
    if out is None:
        return code
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(format_report(out))
    return 0


def ratios(rows: list[dict]) -> list[dict]:
    by = {(r["system"], r["connections"]): r for r in rows}
    out = []
    for conns in sorted({r["connections"] for r in rows}):
        gw = by.get(("gateway", conns))
        if gw is None:
            continue
        rivals = [by[(s, conns)] for s in peers.HTTP_PEERS if (s, conns) in by]
        best = max(rivals, key=lambda r: r["req_per_s"], default=None)
        if best and best["req_per_s"]:
            out.append({"connections": conns,
                        "ratio": f"gateway / best HTTP peer ({best['system']}) req/s",
                        "value": round(gw["req_per_s"] / best["req_per_s"], 2)})
        if ("client", conns) in by:
            out.append({"connections": conns, "ratio": "gateway / Client req/s",
                        "value": round(gw["req_per_s"] / by[("client", conns)]["req_per_s"], 2)})
    return out


def format_report(out: dict) -> str:
    lines = [f"{'system':10} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'errors':>6} {'server us/req':>13} {'client us/req':>13}"]
    for r in sorted(out["rows"], key=lambda r: (r["connections"], r["system"])):
        lines.append(f"{r['system']:10} {r['connections']:>5} {r['req_per_s']:>9.0f} "
                     f"{r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['errors']:>6.0f} "
                     f"{r['server_us']:>13.1f} {r['client_us']:>13.1f}")
    for r in out["ratios"]:
        lines.append(f"{r['connections']:>3} connections: {r['ratio']}: {r['value']}")
    for s, why in out["skipped"].items():
        lines.append(f"skipped {s}: {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
