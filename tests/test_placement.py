"""Placement: workers spread over devices, each seeing only its own (from the worker's
own view of its environment), and memory use in status. Runs without a GPU: pinning is
only an environment variable until a handler touches CUDA."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, _env
from workerpool import Client


def test_workers_per_device_pins_each_worker_to_one_device(procs):
    pool = procs.pool("--devices", "0,1", "--workers-per-device", "2", "--spares", "1",
                      "--policy", "round-robin", handler="workerpool.handlers:Echo", workers=None)
    st = pool.wait_for(lambda s: sorted(w["state"] for w in s["workers"])
                       == ["ready"] * 4 + ["spare"], what="4 workers and a spare")
    rows = {w["id"]: w for w in st["workers"]}
    assert [rows[f"default/{i}"]["device"] for i in range(5)] == [
        "cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert st["services"][0]["workers"] == 4
    with Client(pool.address, timeout=10) as c:
        seen = {}
        for _ in range(8):
            me = c.call("whoami")
            seen[me["slot"]] = me
    assert len(seen) == 4
    for slot, me in seen.items():
        # The worker's own environment: it sees exactly its GPU, as index 0.
        assert me["cuda_visible_devices"] == rows[slot]["device"].split(":")[1]
        assert me["device"] == "cuda:0"


def test_status_shows_each_workers_memory(procs):
    pool = procs.pool(handler="workerpool.handlers:Echo", workers=2)
    st = pool.wait_for(lambda s: all(w["memory"].get("rss", 0) > 0 for w in s["workers"]),
                       what="memory from heartbeats")
    assert all(10 * 2**20 < w["memory"]["rss"] < 10 * 2**30 for w in st["workers"])
    assert not any("gpu_reserved" in w["memory"] for w in st["workers"])  # no CUDA here
    out = subprocess.run([sys.executable, "-m", "workerpool.cli", "status", "--router",
                          pool.address], capture_output=True, text=True, env=_env(), cwd=ROOT,
                         timeout=30)
    assert out.returncode == 0 and "MEMORY" in out.stdout and "M rss" in out.stdout


def test_placement_flags_are_checked_at_the_edge(procs):
    cli = [sys.executable, "-m", "workerpool.cli", "up", "--frontend", procs.ipc("x")]
    cases = [
        (["--workers", "2", "--workers-per-device", "2"], "not both"),
        (["--workers-per-device", "0"], "workers_per_device"),
        (["--devices", "0,1", "--workers-per-device", "600"], "less than or equal to 1024"),
        (["--devices", "zero"], "not a GPU index"),
    ]
    for args, message in cases:
        out = subprocess.run([*cli, *args], capture_output=True, text=True, env=_env(), cwd=ROOT,
                             timeout=30)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
