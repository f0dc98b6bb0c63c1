"""CUDA fault classification: sticky errors end the worker (and it is respawned), OOM is
retryable and keeps it, everything else is a domain error. Uses torch's real exception
classes (CPU build) and the messages PyTorch and CuPy raise; bin/gpu-check poisons a real
context on a GPU."""

from __future__ import annotations

import pytest

from workerpool import Client, HandlerError, WorkerCrashedError
from workerpool.errors import ResourceExhaustedError
from workerpool.faults import Fate, classify

pytest.importorskip("torch", reason="torch is not installed")


def _torch_error(message, code=None):
    import torch

    exc = torch.AcceleratorError(message)
    if code is not None:
        exc.error_code = code
    return exc


@pytest.mark.parametrize(("exc", "fate"), [
    (_torch_error("CUDA error: an illegal memory access was encountered", 700), Fate.POISONED),
    (_torch_error("CUDA error: device-side assert triggered", 710), Fate.POISONED),
    (_torch_error("CUDA error: unspecified launch failure", 719), Fate.POISONED),
    (_torch_error("CUDA error: misaligned address", 716), Fate.POISONED),
    (_torch_error("CUDA error: an illegal instruction was encountered", 715), Fate.POISONED),
    (_torch_error("CUDA error: hardware stack error", 714), Fate.POISONED),
    (_torch_error("CUDA error: uncorrectable ECC error encountered", 214), Fate.POISONED),
    (_torch_error("CUDA error: the provided PTX was compiled with an unsupported toolchain",
                  222), Fate.DOMAIN),  # AcceleratorError, but not sticky: by code, not type
    (RuntimeError("CUDA error: an illegal memory access was encountered"), Fate.POISONED),
    (RuntimeError("CUDA error: device-side assert triggered"), Fate.POISONED),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB"), Fate.EXHAUSTED),
    (ValueError("a device-side assert, says the text"), Fate.DOMAIN),
    (RuntimeError("shape mismatch"), Fate.DOMAIN),
    (KeyError("x"), Fate.DOMAIN),
])
def test_classify(exc, fate):
    assert classify(exc) is fate


def test_classify_real_torch_oom_and_wrapped_errors():
    import torch

    assert classify(torch.cuda.OutOfMemoryError("CUDA out of memory.")) is Fate.EXHAUSTED
    try:
        try:
            raise _torch_error("CUDA error: an illegal memory access was encountered", 700)
        except RuntimeError as inner:
            raise ValueError("model forward failed") from inner
    except ValueError as outer:
        assert classify(outer) is Fate.POISONED  # the cause decides


@pytest.mark.parametrize("method", ["illegal_access", "device_assert_old_torch",
                                    "cupy_illegal_address"])
def test_poisoned_worker_answers_exits_and_is_respawned(procs, method):
    pool = procs.pool(handler="tests.handlers:CudaFaults", workers=1)
    with Client(pool.address, timeout=30) as c:
        pid = pool.status()["workers"][0]["pid"]
        with pytest.raises(WorkerCrashedError, match="sticky CUDA error") as info:
            c.call(method)
        assert info.value.extra["cause"] == "context-poisoned"
        st = pool.wait_for(lambda s: s["workers"][0]["state"] == "ready"
                           and s["workers"][0]["pid"] != pid, what="respawn")
        w = st["workers"][0]
        assert w["restarts"] == 1
        assert "CUDA context poisoned" in w["last_error"] and "code 75" in w["last_error"]
        assert c.call("echo", 1) == 1


def test_oom_is_retryable_and_keeps_the_worker(procs):
    pool = procs.pool(handler="tests.handlers:CudaFaults", workers=1)
    with Client(pool.address, timeout=30) as c:
        pid = pool.status()["workers"][0]["pid"]
        with pytest.raises(ResourceExhaustedError, match="out of device memory") as info:
            c.call("oom")
        assert info.value.retryable is True
        with pytest.raises(HandlerError):
            c.call("not_cuda")
        assert c.call("echo", 2) == 2
    w = pool.status()["workers"][0]
    assert w["pid"] == pid and w["restarts"] == 0 and w["errored"] == 2
