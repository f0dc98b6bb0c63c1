"""The CUDA paths, on a real GPU: placement, CUDA only in workers, crash recovery.

Skipped where there is no NVIDIA GPU (found without creating a CUDA context, like the
supervisor does). `bin/gpu-check` runs these on a GPU machine.
"""

from __future__ import annotations

import os
import signal

import pytest

from workerpool import Client, WorkerCrashedError
from workerpool.devices import CPU, parse_devices

# The GPUs `--devices auto` places workers on: those found, or the ones CUDA_VISIBLE_DEVICES
# names where it is set (the labels in status are then those ids, e.g. a UUID).
GPUS = [d for d in parse_devices("auto") if d != CPU]
needs_gpu = pytest.mark.skipif(
    not GPUS, reason="no NVIDIA GPU here (/proc/driver/nvidia/gpus and nvidia-smi -L found "
                     "none, or CUDA_VISIBLE_DEVICES hides them); bin/gpu-check runs these on "
                     "a GPU machine")
pytestmark = pytest.mark.gpu


def test_torch_handler_on_cpu(procs):
    """The same handler code, on the CPU path, runs everywhere (CI included)."""
    pytest.importorskip("torch", reason="torch is not installed")
    pool = procs.pool("--devices", "cpu", handler="tests.handlers:CudaProbe", workers=1)
    with Client(pool.address, timeout=60) as c:
        p = c.call("probe")
        assert p["device"] == "cpu" and p["cuda_visible_devices"] == ""
        assert c.call("matmul", {"n": 64}) == c.call("matmul", {"n": 64})
        assert c.call("spin", {"seconds": 0.05}) is True


def _maps_cuda(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libcuda" in f.read()


@needs_gpu
def test_placement_and_cuda_only_in_workers(procs):
    pool = procs.pool("--devices", "auto", handler="tests.handlers:CudaProbe",
                      workers=2 * len(GPUS))
    st = pool.status()
    assert {w["device"] for w in st["workers"]} == {f"cuda:{g}" for g in GPUS}
    with Client(pool.address, timeout=60) as c:
        seen = {}
        for _ in range(8 * len(GPUS)):
            p = c.call("probe")
            seen[p["slot"]] = p
    for slot, p in seen.items():
        assert p["device"] == "cuda:0" and p["device_count"] == 1, p  # sees only its own GPU
        assert p["cuda_visible_devices"] == pool.workers()[slot]["device"].split(":")[1]
        assert _maps_cuda(p["pid"])
    # The router and the supervisor never initialise CUDA (fork-safety, no wasted context).
    assert not _maps_cuda(st["router"]["pid"])
    assert not _maps_cuda(pool.popen.pid)


@needs_gpu
def test_gpu_compute_matches_cpu(procs):
    import math

    gpu = procs.pool("--devices", "auto", handler="tests.handlers:CudaProbe", workers=1)
    cpu = procs.pool("--devices", "cpu", handler="tests.handlers:CudaProbe", workers=1)
    with Client(gpu.address, timeout=60) as cg, Client(cpu.address, timeout=60) as cc:
        assert cg.call("probe")["device"] == "cuda:0"
        assert cc.call("probe")["device"] == "cpu"  # the same handler runs on either
        assert math.isclose(cg.call("matmul", {"n": 256}), cc.call("matmul", {"n": 256}),
                            rel_tol=1e-9)


@needs_gpu
def test_cupy_raw_kernel_in_a_worker(procs):
    pytest.importorskip("cupy", reason="CuPy is not installed")
    pool = procs.pool("--devices", "auto", handler="tests.handlers:CudaProbe", workers=1)
    with Client(pool.address, timeout=60) as c:
        n = 1000
        assert c.call("cupy_add", {"n": n}) == float(sum(range(n)) + 2 * n)


@needs_gpu
def test_kill_9_of_a_busy_gpu_worker(procs):
    pool = procs.pool("--devices", "auto", handler="tests.handlers:CudaProbe", workers=2)
    with Client(pool.address, timeout=60) as c:
        fut = c.submit("spin", {"seconds": 30})
        pool.wait_for(lambda st: any(w["in_flight"] for w in st["workers"]), what="spinning")
        victim = next(w for w in pool.status()["workers"] if w["in_flight"])
        os.kill(victim["pid"], signal.SIGKILL)
        with pytest.raises(WorkerCrashedError, match="SIGKILL"):
            fut.result(10)
        pool.wait_for(lambda st: all(w["state"] == "ready" for w in st["workers"])
                      and victim["pid"] not in {w["pid"] for w in st["workers"]},
                      timeout=60, what="GPU worker respawned")
        # The replacement has a fresh CUDA context and computes.
        results = {c.call("matmul", {"n": 128}) for _ in range(4)}
        assert len(results) == 1


@needs_gpu
def test_segfault_in_a_gpu_worker(procs):
    pool = procs.pool("--devices", "auto", handler="tests.handlers:CudaProbe", workers=1)
    with Client(pool.address, timeout=60) as c:
        c.call("probe")
        with pytest.raises(WorkerCrashedError, match="SIGSEGV"):
            c.call("segfault")
        pool.wait_ready(1, timeout=60)
        assert c.call("probe")["device"] == "cuda:0"


@needs_gpu
@pytest.mark.parametrize("method", ["poison", "torch_assert"])
def test_real_poisoned_context_is_replaced(procs, method):
    if method == "poison":
        pytest.importorskip("cupy", reason="CuPy is not installed")
    pool = procs.pool("--devices", "auto", handler="tests.handlers:CudaPoison", workers=1)
    with Client(pool.address, timeout=120) as c:
        pid = pool.status()["workers"][0]["pid"]
        with pytest.raises(WorkerCrashedError) as info:
            c.call(method)
        assert info.value.extra.get("cause") == "context-poisoned", info.value
        st = pool.wait_for(lambda s: s["workers"][0]["state"] == "ready"
                           and s["workers"][0]["pid"] != pid, timeout=120, what="respawn")
        assert "CUDA context poisoned" in st["workers"][0]["last_error"]
        assert c.call("probe")["device"] == "cuda:0"  # a fresh context computes again
        assert c.call("matmul", {"n": 64}) > 0


@needs_gpu
def test_real_oom_keeps_the_worker(procs):
    from workerpool.errors import ResourceExhaustedError

    pool = procs.pool("--devices", "auto", handler="tests.handlers:CudaPoison", workers=1)
    with Client(pool.address, timeout=120) as c:
        pid = pool.status()["workers"][0]["pid"]
        with pytest.raises(ResourceExhaustedError) as info:
            c.call("oom")
        assert info.value.retryable
        assert c.call("matmul", {"n": 64}) > 0
    assert pool.status()["workers"][0]["pid"] == pid


@needs_gpu
def test_workers_per_device_and_gpu_memory_in_status(procs):
    pool = procs.pool("--devices", "auto", "--workers-per-device", "2",
                      handler="tests.handlers:CudaProbe", workers=None)
    st = pool.wait_for(lambda s: all(w["memory"].get("gpu_reserved", 0) > 0
                                     for w in s["workers"]),
                       timeout=30, what="GPU memory in every worker's heartbeat")
    assert len(st["workers"]) == 2 * len(GPUS)
    for g in GPUS:
        assert sum(w["device"] == f"cuda:{g}" for w in st["workers"]) == 2
    for w in st["workers"]:
        assert 0 < w["memory"]["gpu_reserved"] <= w["memory"]["gpu_total"]
