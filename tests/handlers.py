"""Handlers used only by tests (importable by workers as tests.handlers)."""

from __future__ import annotations

import os

from workerpool.handlers import Echo, Faulty


class BadSetup(Echo):
    """setup() fails: the slot must be marked failed, never respawned in a loop."""

    def setup(self, ctx):
        raise FileNotFoundError("weights not found: /nonexistent/model.pt")


class Streams(Echo):
    """Streams that fail or crash midway."""

    def count_then_fail(self, payload):
        yield from range(int(payload["n"]))
        raise RuntimeError("stream broke")

    def count_then_crash(self, payload):
        yield from range(int(payload["n"]))
        os._exit(3)

    def unencodable(self, payload):
        return object()


class FailFirstSlot(Echo):
    """setup() fails in slot N/0 only: one failed worker among healthy ones."""

    def setup(self, ctx):
        if ctx.slot.endswith("/0"):
            raise FileNotFoundError(f"weights not found for {ctx.slot}")


class Big(Echo):
    def big(self, payload):
        return b"x" * int(payload["n"])


class CudaProbe(Faulty):
    """Touches the worker's device for real (torch, and CuPy when installed)."""

    def setup(self, ctx):
        import torch

        self.torch = torch
        self.device = torch.device(ctx.device)
        torch.ones(1, device=self.device).sum().item()  # creates the CUDA context here

    def probe(self, payload=None):
        torch = self.torch
        out = {"slot": self.context.slot, "pid": os.getpid(), "device": str(self.device),
               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        if self.device.type == "cuda":
            out["device_count"] = torch.cuda.device_count()
            out["name"] = torch.cuda.get_device_name(0)
        return out

    def matmul(self, payload):
        """Sum of a seeded n x n matrix squared, on the worker's device, as a float."""
        torch = self.torch
        n = int(payload["n"])
        g = torch.Generator().manual_seed(0)
        a = torch.rand(n, n, generator=g, dtype=torch.float64).to(self.device)
        return float((a @ a).sum().item())

    def spin(self, payload):
        """Keeps the GPU busy with kernels for ``seconds``."""
        import time

        torch = self.torch
        end = time.monotonic() + float(payload["seconds"])
        x = torch.rand(1024, 1024, device=self.device)
        while time.monotonic() < end:
            x = (x @ x).clamp_(0, 1)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        return True

    def cupy_add(self, payload):
        """A CuPy RawKernel adding two vectors on the worker's GPU."""
        import cupy as cp

        kernel = cp.RawKernel(r'''
        extern "C" __global__ void add(const float* a, const float* b, float* c, int n) {
            int i = blockDim.x * blockIdx.x + threadIdx.x;
            if (i < n) c[i] = a[i] + b[i];
        }''', "add")
        n = int(payload["n"])
        a = cp.arange(n, dtype=cp.float32)
        b = cp.full(n, 2, dtype=cp.float32)
        c = cp.empty_like(a)
        kernel(((n + 255) // 256,), (256,), (a, b, c, cp.int32(n)))
        return float(c.sum().get())


class Recorder(Echo):
    """Numbers the requests in the order this worker runs them."""

    def setup(self, ctx):
        self.n = 0

    def record(self, payload):
        self.n += 1
        if isinstance(payload, dict) and payload.get("sleep"):
            import time

            time.sleep(float(payload["sleep"]))
        return {"payload": payload, "n": self.n}
