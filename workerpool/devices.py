"""Device discovery and pinning, without ever creating a CUDA context here.

The supervisor and router never import torch or cupy: even ``torch.cuda.device_count()``
initialises CUDA, after which forking is undefined behaviour. GPUs are found from the
driver's files (``/proc/driver/nvidia/gpus``) or ``nvidia-smi -L``, and each worker is
pinned by setting ``CUDA_VISIBLE_DEVICES`` in its environment before Python starts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

CPU = "cpu"
PROC_GPUS = "/proc/driver/nvidia/gpus"  # one entry (a PCI address) per GPU the driver holds
_SMI_GPU = re.compile(r"GPU (\d+): ")


def discover_gpus(proc_dir: str = PROC_GPUS) -> list[str]:
    """Indices of the NVIDIA GPUs on this host, as strings; empty when there are none.

    From the driver's ``proc_dir`` where it exists, else from ``nvidia-smi -L`` (some
    sandboxes have the tool but no /proc/driver/nvidia).
    """
    try:
        count = len(os.listdir(proc_dir))
    except OSError:
        count = 0
    if count:
        return [str(i) for i in range(count)]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    # "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)"; MIG devices follow their GPU as
    # indented lines, so the index is read from the line, not counted.
    return [m.group(1) for line in out.splitlines() if (m := _SMI_GPU.match(line))]


def parse_devices(spec: str, *, discover: bool = True) -> list[str]:
    """Turn ``--devices`` into a list of device ids: ``["cpu"]`` or GPU indices.

    ``cpu``; ``auto`` (every GPU found, else cpu); or comma-separated indices/UUIDs
    such as ``0,1`` or ``GPU-8f3c...``. Raises ValueError on anything else.
    """
    spec = spec.strip()
    if spec == CPU:
        return [CPU]
    if spec == "auto":
        if not discover:
            return [CPU]
        # A supervisor already confined to some GPUs spreads its workers over those only.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            # As CUDA reads it: entries up to the first invalid one (e.g. -1 hides all).
            out = []
            for d in (x.strip() for x in visible.split(",")):
                if not (d.isdigit() or d.startswith(("GPU-", "MIG-"))):
                    break
                out.append(d)
            return out or [CPU]
        return discover_gpus() or [CPU]
    parts = [p.strip() for p in spec.split(",")]
    if not parts or any(not p for p in parts):
        raise ValueError(f"--devices {spec!r}: expected 'cpu', 'auto' or a list like '0,1'")
    for p in parts:
        if not (p.isdigit() or p.startswith(("GPU-", "MIG-"))):
            raise ValueError(f"--devices {spec!r}: {p!r} is not a GPU index or UUID")
    return parts


def device_label(device: str) -> str:
    """How status shows a device: ``cpu`` or ``cuda:<physical id>``."""
    return CPU if device == CPU else f"cuda:{device}"


def worker_env(device: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a worker pinned to ``device``: it sees that GPU alone, or none."""
    env = dict(os.environ if base is None else base)
    # An empty CUDA_VISIBLE_DEVICES hides every GPU: a cpu worker cannot touch one by accident.
    env["CUDA_VISIBLE_DEVICES"] = "" if device == CPU else device
    return env
