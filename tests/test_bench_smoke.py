"""Every benchmark script still runs (tiny sizes and durations): they import each other's
helpers, and a refactor must not leave one broken until someone needs its figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, _env

CASES = {
    "throughput": ["--systems", "wp64,direct", "--duration", "0.5", "--warmup", "0.2", "--json"],
    "large_payload": ["--systems", "wp64", "--sizes", "65536", "--duration", "0.5",
                      "--warmup", "0.2", "--json"],
    "tensors": ["--sizes", "1", "--reps", "2", "--warmup", "1", "--json"],
    "batching": ["--duration", "0.5", "--warmup", "0.2", "--rounds", "1", "--threads", "1",
                 "--json"],
    "recovery": ["--parts", "spare", "--reps", "1", "--json"],
    "overload": ["--policies", "reject", "--duration", "1", "--warmup", "0.2", "--procs", "1",
                 "--json"],
    "chaos": ["--seconds", "2", "--rate", "50", "--json"],
    "cpu_per_request": ["--duration", "0.5", "--warmup", "0.2", "--json"],
    "idle_gap": ["--sleep-ms", "1", "--duration", "0.3", "--warmup", "0.1", "--outstanding",
                 "8", "--json"],
    "fuzz": ["--duration", "0.5", "--warmup", "0.2", "--flooders", "1", "--json"],
    "curve": ["--rounds", "1", "--duration", "0.3", "--warmup", "0.1", "--outstanding", "16",
              "--json"],
    "metrics_scrape": ["--rounds", "1", "--duration", "0.3", "--warmup", "0.1", "--outstanding",
                       "16", "--scrape-interval", "0.1", "--json"],
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_bench_script_runs(script):
    out = subprocess.run([sys.executable, f"bench/{script}.py", *CASES[script]], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)  # a JSON object with figures in it
