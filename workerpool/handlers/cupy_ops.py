"""``CupyOps``: array math and a hand-written CUDA kernel with CuPy, on the worker's GPU.

::

    payload {"x": [...], ...} -> cupy.asarray (host -> device) -> kernel / cuBLAS
        -> _to_reply (device -> host) -> reply

Methods: ``saxpy`` (a ``cupy.RawKernel`` compiled in ``setup()``), ``matmul``, ``softmax``
and ``norm``. CuPy is imported in ``setup()`` only: a worker placed on the CPU, or one
without CuPy, fails its setup with a message that says which, and the pool marks the slot
``failed`` rather than respawning it (docs/operations.md, "setup() fails").
"""

from __future__ import annotations

from typing import Any

from workerpool.context import WorkerContext
from workerpool.handlers import Handler

SAXPY_SOURCE = r"""
extern "C" __global__
void saxpy(const float a, const float* x, const float* y, float* out, const long long n) {
    long long i = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    long long stride = (long long)blockDim.x * gridDim.x;
    for (; i < n; i += stride) {
        out[i] = a * x[i] + y[i];
    }
}
"""
THREADS = 256
MAX_BLOCKS = 4096  # the grid-stride loop covers any n with at most this many blocks


def _to_reply(a: Any, like: Any) -> Any:
    """The one place a device array becomes a reply (``.get()`` copies it to the host): a
    numpy array when the caller sent arrays, which travel as raw bytes, else a list."""
    host = a.get()
    return host if type(like).__module__ in ("numpy", "torch") else host.tolist()


class CupyOps(Handler):
    """CuPy on the worker's GPU: a RawKernel (``saxpy``) and library math."""

    def setup(self, ctx: WorkerContext) -> None:
        if not ctx.device.startswith("cuda"):
            raise RuntimeError(
                f"CupyOps needs an NVIDIA GPU, but worker {ctx.slot} was placed on "
                f"{ctx.device!r}: start its service with --devices auto (or GPU indices)")
        try:
            import cupy
        except ImportError as exc:
            raise RuntimeError("CupyOps needs CuPy: pip install 'workerpool[cupy]', or the "
                               "cupy-cudaXXx wheel that matches your CUDA version") from exc
        self.cp = cupy
        cupy.cuda.Device(0).use()  # the worker sees only its own GPU, as device 0
        self._saxpy = cupy.RawKernel(SAXPY_SOURCE, "saxpy")
        # Warm-up: compile the kernel (NVRTC), load cuBLAS, create the context's pools now
        # rather than in the first request.
        x = cupy.ones(1024, dtype=cupy.float32)
        self._launch_saxpy(2.0, x, x)
        (x.reshape(32, 32) @ x.reshape(32, 32)).sum()
        cupy.cuda.Device().synchronize()

    # -- methods ---------------------------------------------------------------------------------
    def saxpy(self, payload: dict) -> Any:
        """``{"a": a, "x": [...], "y": [...]}`` -> ``a * x + y``, by a hand-written kernel."""
        a = float(payload["a"])
        x = self._array(payload["x"], "x", ndim=1)
        y = self._array(payload["y"], "y", ndim=1)
        if x.shape != y.shape:
            raise ValueError(f"x and y differ in length: {x.shape[0]} and {y.shape[0]}")
        return _to_reply(self._launch_saxpy(a, x, y), payload["x"])

    def matmul(self, payload: dict) -> Any:
        """``{"a": [[...]], "b": [[...]]}`` -> ``a @ b`` (cuBLAS)."""
        a = self._array(payload["a"], "a", ndim=2)
        b = self._array(payload["b"], "b", ndim=2)
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"cannot multiply {a.shape} by {b.shape}")
        return _to_reply(a @ b, payload["a"])

    def softmax(self, payload: dict) -> Any:
        """``{"x": [...] or [[...]]}`` -> softmax along the last axis (numerically stable)."""
        cp = self.cp
        x = self._array(payload["x"], "x", ndim=(1, 2))
        e = cp.exp(x - x.max(axis=-1, keepdims=True))
        return _to_reply(e / e.sum(axis=-1, keepdims=True), payload["x"])

    def norm(self, payload: dict) -> float:
        """``{"x": [...]}`` -> its Euclidean norm."""
        x = self._array(payload["x"], "x", ndim=1)
        return float(self.cp.linalg.norm(x).get())

    # -- helpers ---------------------------------------------------------------------------------
    def _array(self, value: Any, name: str, ndim: int | tuple[int, ...]) -> Any:
        """``value`` as a float32 device array of the expected rank, or ValueError."""
        cp = self.cp
        try:
            arr = cp.asarray(value, dtype=cp.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} is not a numeric array: {exc}") from None
        ranks = (ndim,) if isinstance(ndim, int) else ndim
        if arr.ndim not in ranks or arr.size == 0:
            raise ValueError(f"{name} has shape {arr.shape}: expected a non-empty array of "
                             f"rank {' or '.join(map(str, ranks))}")
        return arr

    def _launch_saxpy(self, a: float, x: Any, y: Any) -> Any:
        cp = self.cp
        out = cp.empty_like(x)
        n = x.size
        blocks = min(MAX_BLOCKS, (n + THREADS - 1) // THREADS)
        self._saxpy((blocks,), (THREADS,), (cp.float32(a), x, y, out, cp.int64(n)))
        return out
