"""CPU per request, by process: where a request's cost goes, and a figure far steadier
than req/s on a shared 2-core machine.

A pool of 2 Echo workers (``max_inflight`` 64, or ``--max-inflight``: 1 is the default)
is driven by a bare ``Client.submit`` loop that keeps ``--outstanding`` requests in flight for
``--duration`` seconds. Before and after, the CPU time (user + system) of every thread
of every process is read from ``/proc/<pid>/task/*/stat``: the router, the workers, the
supervisor (``up``) and this client process. Each is divided by the requests completed in between.

``--repo`` runs another checkout of workerpool (its pool and its client) with this same
driver, so two trees are compared side by side: run both in turn, alternating, with
nothing else running::

    .venv/bin/python bench/cpu_per_request.py --duration 5
    .venv/bin/python bench/cpu_per_request.py --duration 5 --repo ../other-checkout
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds measured (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before (default 1)")
    ap.add_argument("--outstanding", type=int, default=256, help="requests in flight (256)")
    ap.add_argument("--max-inflight", type=int, default=64,
                    help="the pool's max_inflight (64; 1 is the default)")
    ap.add_argument("--repo", default=None, help="the workerpool checkout to run (default: this)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return ap.parse_args()


ARGS = _parse()
REPO = os.path.abspath(ARGS.repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = REPO + (os.pathsep + os.environ["PYTHONPATH"]
                                   if os.environ.get("PYTHONPATH") else "")

import _pool  # noqa: E402  (bench/, beside this script)

from workerpool import Client  # noqa: E402  (from --repo)


def _role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    if b"router" in argv:
        return "router"
    if b"workerpool.worker" in argv:
        return "workers"
    return "supervisor"


def _sample(pool_pids: list[int]) -> dict[str, float]:
    out: dict[str, float] = {"client": _pool.cpu_seconds(os.getpid())}
    for pid in pool_pids:
        role = _role(pid)
        out[role] = out.get(role, 0.0) + _pool.cpu_seconds(pid)
    return out


def main() -> int:
    import subprocess

    sock = tempfile.mkdtemp(prefix="wp-cpu-")
    frontend = f"ipc://{sock}/front"
    proc = subprocess.Popen(
        [sys.executable, "-m", "workerpool.cli", "up", "--frontend", frontend, "--handler",
         "workerpool.handlers:Echo", "--workers", "2", "--max-inflight", str(ARGS.max_inflight)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("workerpool ready"):
            raise SystemExit(f"the pool did not start: {line!r}")
        with Client(frontend) as client:
            permits = threading.Semaphore(ARGS.outstanding)
            done = [0]

            def finished(_fut: object) -> None:
                done[0] += 1
                permits.release()

            def drive(seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    if permits.acquire(timeout=0.5):
                        client.submit("echo", {"i": 1}).add_done_callback(finished)

            drive(ARGS.warmup)
            pids = _pool.group_pids(proc.pid)
            before, n0, t0 = _sample(pids), done[0], time.monotonic()
            drive(ARGS.duration)
            after, n1, t1 = _sample(pids), done[0], time.monotonic()
            drained = time.monotonic() + 10  # the last replies, before the client closes
            for _ in range(ARGS.outstanding):
                if not permits.acquire(timeout=max(0.0, drained - time.monotonic())):
                    break
        n = n1 - n0
        if n <= 0:
            raise SystemExit("no request completed while measuring")
        per = {role: round((after.get(role, 0.0) - before.get(role, 0.0)) / n * 1e6, 1)
               for role in ("client", "router", "workers", "supervisor")}
        per["total"] = round(sum(per.values()), 1)
        if ARGS.json:
            print(json.dumps({"repo": REPO, "requests": n, "req_per_s": round(n / (t1 - t0)),
                              "us_per_request": per}))
        else:
            print(f"{REPO}: {n} requests in {t1 - t0:.1f}s = {n / (t1 - t0):,.0f} req/s")
            for role, us in per.items():
                print(f"  {role:<10} {us:6.1f} us/request")
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        shutil.rmtree(sock, ignore_errors=True)  # the pool's socket files
    return 0


if __name__ == "__main__":
    sys.exit(main())
