"""The built-in GPU handlers and batching on a real GPU: TorchMLP on CUDA (same model as on
the CPU, batched equal to unbatched), CupyOps (a RawKernel and library math), real CUDA
faults inside a batch, and the batching benchmark. Skipped where there is no NVIDIA GPU;
bin/gpu-check runs them on a GPU machine."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT, _env
from tests.test_torch_handler import _close, _inputs, _mlp_pool
from workerpool import Client, HandlerError, WorkerCrashedError
from workerpool.devices import CPU, parse_devices
from workerpool.errors import ResourceExhaustedError

GPUS = [d for d in parse_devices("auto") if d != CPU]  # where --devices auto places workers
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not GPUS, reason="no NVIDIA GPU here (/proc/driver/nvidia/gpus and "
                                        "nvidia-smi -L found none); bin/gpu-check runs these "
                                        "on a GPU machine"),
]
needs_cupy = pytest.mark.skipif(bool(GPUS) and importlib.util.find_spec("cupy") is None,
                                reason="CuPy is not installed (pip install 'workerpool[cupy]')")


def _gpu_pool(procs, handler, workers=1, max_inflight=32):
    return procs.pool("--devices", "auto", "--max-inflight", str(max_inflight),
                      handler=handler, workers=workers)


def test_torch_mlp_on_cuda_matches_cpu_and_batches(procs):
    pytest.importorskip("torch", reason="torch is not installed")
    gpu = _mlp_pool(procs, devices="auto")
    cpu = _mlp_pool(procs)
    inputs = _inputs(48, seed=3)
    with Client(gpu.address, timeout=120) as g, Client(cpu.address, timeout=120) as c:
        assert g.call("info")["device"] == "cuda:0"
        assert c.call("info")["device"] == "cpu"
        on_gpu = [g.submit("infer_batch", x) for x in inputs]
        on_gpu_plain = [g.submit("infer", x) for x in inputs]
        on_cpu = [c.submit("infer", x) for x in inputs]
        for fb, fp, fc in zip(on_gpu, on_gpu_plain, on_cpu, strict=True):
            assert _close(fb.result(), fp.result(), tol=1e-4)
            assert _close(fb.result(), fc.result(), tol=1e-4)  # the same model on either device
        stats = g.call("info")["stats"]
        assert stats["batched_requests"] == 48


@needs_cupy
def test_cupy_ops_raw_kernel_and_math(procs):
    pool = _gpu_pool(procs, "workerpool.handlers.cupy_ops:CupyOps")
    n = 100_000
    x = [float(i % 97) for i in range(n)]
    y = [1.0] * n
    with Client(pool.address, timeout=60) as c:
        out = c.call("saxpy", {"a": 2.0, "x": x, "y": y})
        assert len(out) == n and all(o == 2.0 * a + 1.0 for o, a in zip(out, x, strict=True))
        a = [[1.0, 2.0], [3.0, 4.0]]
        assert c.call("matmul", {"a": a, "b": [[5.0], [6.0]]}) == [[17.0], [39.0]]
        sm = c.call("softmax", {"x": [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]})
        e = [math.exp(v - 3.0) for v in (1.0, 2.0, 3.0)]
        assert _close(sm[0], [v / sum(e) for v in e], tol=1e-6)
        assert _close(sm[1], [1 / 3] * 3, tol=1e-6)
        assert math.isclose(c.call("norm", {"x": [3.0, 4.0]}), 5.0, rel_tol=1e-6)
        with pytest.raises(HandlerError, match="differ in length"):
            c.call("saxpy", {"a": 1.0, "x": [1.0], "y": [1.0, 2.0]})
        with pytest.raises(HandlerError, match="cannot multiply"):
            c.call("matmul", {"a": a, "b": [[1.0, 2.0, 3.0]]})


def _batch(c, method, n=3):
    """n requests to ``method``, submitted together: they run as one batch (or, on a slow
    machine, several; each caller's error is the same either way)."""
    return [c.submit(method, i) for i in range(n)]


def test_real_oom_in_a_batch_fails_each_caller_and_keeps_the_worker(procs):
    pytest.importorskip("torch", reason="torch is not installed")
    pool = _gpu_pool(procs, "tests.handlers:GpuBatches")
    with Client(pool.address, timeout=120) as c:
        pid = pool.status()["workers"][0]["pid"]
        for f in _batch(c, "oom_batch"):
            with pytest.raises(ResourceExhaustedError) as info:
                f.result()
            assert info.value.retryable
        assert c.call("matmul", {"n": 64}) > 0
    assert pool.status()["workers"][0]["pid"] == pid


def test_real_device_assert_in_a_batch_answers_each_caller_and_replaces_the_worker(procs):
    pytest.importorskip("torch", reason="torch is not installed")
    pool = _gpu_pool(procs, "tests.handlers:GpuBatches")
    with Client(pool.address, timeout=120) as c:
        pid = pool.status()["workers"][0]["pid"]
        for f in _batch(c, "assert_batch"):
            with pytest.raises(WorkerCrashedError) as info:
                f.result()
            assert info.value.extra.get("cause") == "context-poisoned"
        pool.wait_for(lambda s: s["workers"][0]["state"] == "ready"
                      and s["workers"][0]["pid"] != pid, timeout=120, what="respawn")
        assert c.call("matmul", {"n": 64}) > 0


def test_batching_benchmark_runs_on_the_gpu():
    """bench/batching.py --device cuda end to end (short): both modes answer every request.
    Throughput figures are printed for the record, not judged here."""
    proc = subprocess.run(
        [sys.executable, "bench/batching.py", "--device", "cuda", "--duration", "2",
         "--warmup", "0.5", "--rounds", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=_env())  # PYTHONPATH keeps what is there: on the GPU machine, /tmp/site's pyzmq
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    print(json.dumps({k: out[k] for k in ("model", "speedup")}),
          {m: round(r["req_per_s"]) for m, r in out["results"].items()})
    assert out["model"]["device"] == "cuda:0"
    assert all(r["errors"] == 0 and r["req_per_s"] > 0 for r in out["results"].values())
    assert out["results"]["batched"]["mean_batch_size"] > 1
