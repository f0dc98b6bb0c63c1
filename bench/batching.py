"""Dynamic batching on real work: TorchMLP throughput with and without ``@batched``.

One pool (``workerpool up``, ``workerpool.handlers.torch_mlp:TorchMLP``, ``--workers`` worker
processes on ``--device``, ``max_inflight`` = ``--max-inflight``) serves both methods of the
same model: ``infer`` (one request per forward pass) and ``infer_batch`` (``@batched``
max_batch_size 32, max_delay_ms 2: the requests a worker holds run as one forward pass). A
closed-loop driver (bench/throughput.py's ``drive_futures``) keeps ``--concurrency``
requests in flight through the public ``Client``; each request is one input row (or
``--rows`` rows), cycled from 256 seeded random inputs. The two methods alternate for
``--rounds`` rounds on the same pool and process tree, so a busy or drifting machine hits
both alike; each figure is the median over the rounds, and the mean batch size comes from
the workers' own counters (``info`` -> ``stats``).

Usage::

    .venv/bin/python bench/batching.py --device cpu --duration 5            # table + ratio
    .venv/bin/python bench/batching.py --device cuda --duration 5 --json    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
from dataclasses import asdict
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
for path in (REPO, BENCH):
    if path not in sys.path:
        sys.path.insert(0, path)

import _pool  # noqa: E402  (process handling shared by the bench scripts)
import throughput as tp  # noqa: E402  (the closed-loop driver)

from workerpool import Client  # noqa: E402
from workerpool.devices import discover_gpus  # noqa: E402

HANDLER = "workerpool.handlers.torch_mlp:TorchMLP"
METHODS = {"unbatched": "infer", "batched": "infer_batch"}
N_INPUTS = 256


def pool_config(args: argparse.Namespace) -> str:
    """The pool's TOML: one service, the model's options, round-robin (so ``info`` calls
    reach each worker in turn)."""
    options = {"in_features": args.in_features, "hidden": args.hidden,
               "out_features": args.out_features, "layers": args.layers, "seed": 0,
               "dtype": args.dtype}
    if args.threads:
        options["threads"] = args.threads
    opts = ", ".join(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}"
                     for k, v in options.items())
    devices = "cpu" if args.device == "cpu" else (args.gpus or "auto")
    return (f'[[services]]\nname = "mlp"\nhandler = "{HANDLER}"\nworkers = {args.workers}\n'
            f'devices = "{devices}"\nmax_inflight = {args.max_inflight}\n'
            f'policy = "round-robin"\noptions = {{ {opts} }}\n')


def batch_counters(client: Client, workers: int) -> tuple[int, int, list[dict]]:
    """Sum of (batches, batched_requests) over every worker, and each worker's info."""
    infos = {}
    for _ in range(4 * workers):
        info = client.call("info", service="mlp", timeout=30)
        infos[info["slot"]] = info
        if len(infos) == workers:
            break
    batches = sum(i["stats"]["batches"] for i in infos.values())
    reqs = sum(i["stats"]["batched_requests"] for i in infos.values())
    return batches, reqs, list(infos.values())


def run(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    cfg = os.path.join(workdir, "pool.toml")
    with open(cfg, "w") as f:
        f.write(pool_config(args))
    frontend = f"ipc://{workdir}/front"
    argv = [sys.executable, "-m", "workerpool.cli", "up", "--config", cfg, "--frontend", frontend]
    rng = random.Random(0)
    inputs = [[rng.uniform(-1, 1) for _ in range(args.in_features)] for _ in range(N_INPUTS)]
    if args.rows > 1:
        inputs = [[row] * args.rows for row in inputs]
    rounds: dict[str, list[tp.Result]] = {mode: [] for mode in METHODS}
    sizes: dict[str, list[float]] = {mode: [] for mode in METHODS}
    with _pool.process_group(argv, "workerpool ready", workdir, "pool"), \
            Client(frontend, timeout=120) as client:
        _, _, infos = batch_counters(client, args.workers)
        for r in range(args.rounds):
            for mode, method in METHODS.items():
                if not args.json:
                    print(f"round {r + 1}/{args.rounds}: {mode} ({method}), {args.warmup:g}s "
                          f"warm-up + {args.duration:g}s...", file=sys.stderr, flush=True)
                b0, n0, _ = batch_counters(client, args.workers)
                res = tp.drive_futures(
                    mode, lambda n, m=method: client.submit(m, inputs[n % N_INPUTS],
                                                            service="mlp"),
                    lambda n: n, args.concurrency, args.warmup, args.duration)
                b1, n1, _ = batch_counters(client, args.workers)
                rounds[mode].append(res)
                sizes[mode].append((n1 - n0) / (b1 - b0) if b1 > b0 else 1.0)
    out: dict[str, Any] = {"model": {k: infos[0][k] for k in (
        "device", "dtype", "in_features", "hidden", "out_features", "layers", "parameters",
        "threads", "max_batch_size")}, "command": " ".join(["python", *argv[1:]]),
        "results": {}}
    for mode in METHODS:
        rs = rounds[mode]
        out["results"][mode] = {
            "method": METHODS[mode],
            "req_per_s": statistics.median(r.req_per_s for r in rs),
            "rows_per_s": statistics.median(r.req_per_s for r in rs) * args.rows,
            "p50_ms": statistics.median(r.p50_ms for r in rs),
            "p99_ms": statistics.median(r.p99_ms for r in rs),
            "mean_batch_size": statistics.median(sizes[mode]),
            "errors": sum(r.errors for r in rs),
            "first_error": next((r.first_error for r in rs if r.first_error), None),
            "rounds": [asdict(r) for r in rs],
        }
    base = out["results"]["unbatched"]["req_per_s"]
    out["speedup"] = out["results"]["batched"]["req_per_s"] / base if base else None
    return out


def format_table(out: dict[str, Any], args: argparse.Namespace) -> str:
    m = out["model"]
    lines = [f"TorchMLP {m['in_features']}->{m['hidden']}x{m['layers'] - 1}->{m['out_features']} "
             f"({m['parameters']:,} parameters, {m['dtype']}) on {m['device']}, "
             f"{args.workers} worker(s), {m['threads']} torch thread(s) each, "
             f"concurrency {args.concurrency}, max_inflight {args.max_inflight}, "
             f"{args.rows} row(s)/request, median of {args.rounds} round(s) of "
             f"{args.duration:g}s, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
             f"{'mode':<10} {'method':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'batch':>6} {'errors':>6}"]
    for mode, r in out["results"].items():
        lines.append(f"{mode:<10} {r['method']:<12} {r['req_per_s']:>9,.0f} {r['p50_ms']:>8.2f} "
                     f"{r['p99_ms']:>8.2f} {r['mean_batch_size']:>6.1f} {r['errors']:>6}")
    if out["speedup"] is not None:
        lines.append(f"batching speed-up (batched / unbatched req/s): {out['speedup']:.2f}x")
    for mode, r in out["results"].items():
        if r["first_error"]:
            lines.append(f"{mode}: first error: {r['first_error']}")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="TorchMLP throughput with and without @batched, "
                                             "side by side on one pool.")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the workers run the model (default cpu)")
    ap.add_argument("--gpus", default=None, help="with --device cuda: GPU indices (default all)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    ap.add_argument("--max-inflight", type=int, default=None,
                    help="requests one worker may hold (default: concurrency / workers, "
                         "at least 32)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--rows", type=int, default=1, help="input rows per request (default 1)")
    ap.add_argument("--in-features", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--out-features", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="float32",
                    choices=("float32", "float64", "float16", "bfloat16"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per worker (default: torch's own)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--json-out", metavar="FILE", default=None,
                    help="also write the JSON object to FILE (bin/gpu-check keeps both forms)")
    args = ap.parse_args(argv)
    if args.max_inflight is None:
        args.max_inflight = max(32, -(-args.concurrency // args.workers))
    if min(args.workers, args.concurrency, args.rounds, args.rows, args.max_inflight) < 1 \
            or args.duration <= 0 or args.warmup < 0:
        ap.error("--workers, --concurrency, --rounds, --rows, --max-inflight must be >= 1, "
                 "--duration > 0 and --warmup >= 0")
    if args.device == "cuda" and not discover_gpus():
        print("error: --device cuda but no NVIDIA GPU is visible here", file=sys.stderr)
        return 2

    out, code = _pool.measure(lambda workdir: run(args, workdir), "wp-batch-")
    if out is None:
        return code
    out["config"] = {**{k: v for k, v in vars(args).items() if k not in ("json", "json_out")},
                     "python": platform.python_version(), "cpus": os.cpu_count(),
                     "load_1min": os.getloadavg()[0], "platform": platform.platform()}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2) if args.json else format_table(out, args))
    errors = sum(r["errors"] for r in out["results"].values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
