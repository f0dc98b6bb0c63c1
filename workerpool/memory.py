"""A worker's memory use, as its heartbeat reports it to ``workerpool status``.

Read from counters only: this runs on the heartbeat thread while the handler may be in
the middle of a kernel, so it must never synchronise the device or create a CUDA
context. GPU figures appear once the handler has initialised CUDA through torch or CuPy.
"""

from __future__ import annotations

import os
import sys

_PAGE = os.sysconf("SC_PAGE_SIZE")
_GPU_TOTAL: dict[str, int] = {}


def memory_use() -> dict[str, int]:
    """``rss`` bytes, plus ``gpu_allocated``/``gpu_reserved``/``gpu_total`` when known."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/statm", "rb") as f:
            out["rss"] = int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():  # never initialises CUDA itself
                # Device 0 by index: the worker sees only its own GPU, and no index would
                # ask the CUDA runtime for this (heartbeat) thread's current device.
                out["gpu_allocated"] = int(torch.cuda.memory_allocated(0))
                out["gpu_reserved"] = int(torch.cuda.memory_reserved(0))
                if "torch" not in _GPU_TOTAL:
                    _GPU_TOTAL["torch"] = int(torch.cuda.get_device_properties(0).total_memory)
                out["gpu_total"] = _GPU_TOTAL["torch"]
        except Exception:  # a poisoned context or a partial install: report what we have
            pass
    cupy = sys.modules.get("cupy")
    if cupy is not None and "gpu_reserved" not in out:
        try:
            pool = cupy.get_default_memory_pool()
            if pool.total_bytes():
                out["gpu_allocated"] = int(pool.used_bytes())
                out["gpu_reserved"] = int(pool.total_bytes())
        except Exception:
            pass
    return out
