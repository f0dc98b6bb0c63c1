"""Handlers used only by tests (importable by workers as tests.handlers)."""

from __future__ import annotations

import os
import subprocess
import threading
import time

from workerpool import batched
from workerpool.errors import PayloadError
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
        import time

        time.sleep(0.2)  # os._exit ends ZeroMQ's I/O thread too: let the items leave first
        os._exit(3)

    def unencodable(self, payload):
        return object()

    def count_then_sleep(self, payload):
        import time

        yield from range(int(payload["n"]))
        time.sleep(float(payload["seconds"]))


class SysExit(Echo):
    """A handler that calls sys.exit(): SystemExit is no Exception, so it ends the worker's
    loop; the worker must leave as a crash, not say it stopped."""

    def sys_exit(self, payload=None):
        import sys

        sys.exit(int(payload or 3))


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


class CudaFaults(Echo):
    """Raises the exceptions PyTorch and CuPy raise for CUDA faults (real classes where
    installed), so the worker's classification is tested without a GPU."""

    def _torch_error(self, message, code):
        import torch

        exc = torch.AcceleratorError(message)
        exc.error_code = code
        return exc

    def illegal_access(self, payload=None):
        raise self._torch_error(
            "CUDA error: an illegal memory access was encountered\nSearch for "
            "`cudaErrorIllegalAddress' in https://docs.nvidia.com/cuda/...", 700)

    def device_assert_old_torch(self, payload=None):
        # PyTorch before 2.8 raised a plain RuntimeError with this text.
        raise RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors "
                           "might be asynchronously reported at some other API call")

    def cupy_illegal_address(self, payload=None):
        cls = type("CUDARuntimeError", (RuntimeError,), {"__module__": "cupy_backends.cuda.api.runtime"})
        exc = cls("cudaErrorIllegalAddress: an illegal memory access was encountered")
        exc.status = 700
        raise exc

    def oom(self, payload=None):
        import torch

        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
            "79.10 GiB of which 3.12 GiB is free.")

    def not_cuda(self, payload=None):
        raise ValueError("text that mentions a device-side assert is not a CUDA error")


class CudaPoison(CudaProbe):
    """Real CUDA faults on a real GPU (bin/gpu-check)."""

    def poison(self, payload=None):
        """A CuPy RawKernel writing through a bad pointer: cudaErrorIllegalAddress (700)."""
        import cupy as cp

        kernel = cp.RawKernel(r'''
        extern "C" __global__ void write_bad(unsigned long long address) {
            *(int*)address = 1;
        }''', "write_bad")
        kernel((1,), (1,), (cp.uint64(8),))
        cp.cuda.Device().synchronize()
        return "unreachable"

    def torch_assert(self, payload=None):
        """An out-of-bounds index on the GPU: a device-side assert (710)."""
        torch = self.torch
        x = torch.zeros(10, device=self.device)
        x[torch.arange(20, device=self.device)] = 2
        torch.cuda.synchronize()
        return "unreachable"

    def oom(self, payload=None):
        """Ask for far more memory than the card has."""
        torch = self.torch
        _, total = torch.cuda.mem_get_info()
        x = torch.empty(int(total * 4), dtype=torch.uint8, device=self.device)
        return x.numel()


class Chaos(Faulty, CudaFaults):
    """Everything the chaos test throws at a pool: sleeps, crashes, poisoned contexts."""


class SlowRespawn(Faulty):
    """A model that takes ``options.respawn_setup_seconds`` to load, except in a slot's
    first incarnation (so the pool starts fast but replacements are slow)."""

    def setup(self, ctx):
        import time

        if ctx.incarnation > 1:
            time.sleep(float(ctx.options.get("respawn_setup_seconds", 0)))


def _host_copy_fails(message: str):
    """A tensor whose copy to the host raises ``RuntimeError(message)``: what a CUDA result
    does when a kernel before it hit a sticky error, since the error surfaces at the next
    synchronising call, the reply's device-to-host copy (needs torch)."""
    import torch

    class HostCopyFails(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.copy_):
                raise RuntimeError(message)
            return super().__torch_function__(func, types, args, kwargs or {})

    return torch.zeros(4).as_subclass(HostCopyFails)


class Batches(Faulty):
    """A ``@batched`` method that records every batch it runs, and fails on request.

    Each payload is a dict; keys act on the whole batch (``raise``, ``oom``, ``poison``,
    ``short``, ``not_list``, ``sleep``, ``started_file``) or on the item alone (``fail``,
    ``item_oom``, ``item_poison``, ``typed``, ``unencodable``, ``send_poison``). Other payloads (ints,
    strings, lists) are echoed.
    """

    def setup(self, ctx):
        self.batches: list[list] = []

    @batched(max_batch_size=8, max_delay_ms=300)
    def work(self, payloads):
        self.batches.append([p.get("i") if isinstance(p, dict) else p for p in payloads])
        flags = {k for p in payloads if isinstance(p, dict) for k in p}
        for p in payloads:
            if isinstance(p, dict) and p.get("started_file"):
                with open(p["started_file"], "w") as f:
                    f.write(str(os.getpid()))
        if "sleep" in flags:
            time.sleep(max(float(p.get("sleep", 0)) for p in payloads if isinstance(p, dict)))
        if "raise" in flags:
            raise ValueError("the whole batch failed")
        if "oom" in flags:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if "poison" in flags:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        out = []
        for p in payloads:
            if not isinstance(p, dict):
                out.append({"echo": p, "batch": len(payloads)})
            elif p.get("fail"):
                out.append(ValueError(f"item {p.get('i')} is bad"))
            elif p.get("item_poison"):
                out.append(RuntimeError("CUDA error: an illegal memory access was encountered"))
            elif p.get("item_oom"):
                out.append(RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB"))
            elif p.get("typed"):
                out.append(PayloadError(f"item {p.get('i')}: wrong shape"))
            elif p.get("unencodable"):
                out.append(object())
            elif p.get("send_poison"):
                out.append(_host_copy_fails(
                    "CUDA error: an illegal memory access was encountered"))
            else:
                out.append({"i": p.get("i"), "batch": len(payloads)})
        if "short" in flags:
            return out[:-1]
        if "not_list" in flags:
            return {"oops": True}
        return out

    @batched(max_batch_size=4, max_delay_ms=2000)
    def patient(self, payloads):
        """A long max_delay: with max_inflight 1 the batch must still run at once."""
        self.batches.append(list(payloads))
        return payloads

    def gate(self, payload):
        """Blocks until the file ``{"path": p}`` exists (at most 20 s): holds the worker while
        a test lines requests up behind it."""
        deadline = time.monotonic() + 20
        while not os.path.exists(payload["path"]) and time.monotonic() < deadline:
            time.sleep(0.005)
        return "opened"

    def received(self, payload):
        """Touches the file ``{"started": p}``, then waits until this worker has received
        ``{"n": n}`` requests (at most 20 s), and returns the count it saw: whether the worker
        takes requests in while a handler runs."""
        open(payload["started"], "w").close()
        stats = self.context.stats
        deadline = time.monotonic() + 20
        while stats.received < payload["n"] and time.monotonic() < deadline:
            time.sleep(0.005)
        return stats.received

    def lent(self, payload=None):
        """Whether this worker's socket is lent to its wire thread while this call runs."""
        (wire,) = [t for t in threading.enumerate() if t.name == "workerpool-wire"]
        return wire.lent

    def batch_log(self, payload=None):
        """Every batch run so far, as the list of its items' ``i``."""
        return self.batches


class GpuBatches(CudaPoison):
    """Real CUDA faults inside a @batched method, on a real GPU (bin/gpu-check)."""

    @batched(max_batch_size=8, max_delay_ms=200)
    def oom_batch(self, payloads):
        """Asks for four times the card's memory for the whole batch."""
        torch = self.torch
        _, total = torch.cuda.mem_get_info()
        x = torch.empty(int(total * 4), dtype=torch.uint8, device=self.device)
        return [x.numel()] * len(payloads)

    @batched(max_batch_size=8, max_delay_ms=200)
    def assert_batch(self, payloads):
        """An out-of-bounds index on the GPU for the whole batch: a device-side assert."""
        torch = self.torch
        x = torch.zeros(10, device=self.device)
        x[torch.arange(20, device=self.device)] = 2
        torch.cuda.synchronize()
        return [0] * len(payloads)


class Tensors(Echo):
    """Arrays and tensors: echo them, describe them, hold segments while a test kills us."""

    def setup(self, ctx):
        if ctx.device != "cpu":
            # Import torch and create the CUDA context here, as a model handler would, not in
            # the first request: both hold the GIL for seconds on a cold machine, and a
            # worker whose heartbeat thread is silent for heartbeat_liveness beats (3 s) in a
            # request is killed as hung.
            import torch

            torch.ones(1, device=ctx.device).sum().item()

    def describe(self, payload):
        """What arrived, as the worker sees it: type, dtype, shape, writability."""
        return {k: {"type": type(v).__module__ + "." + type(v).__name__, "dtype": str(v.dtype),
                    "shape": list(v.shape),
                    "writeable": bool(v.flags.writeable) if hasattr(v, "flags") else True}
                for k, v in payload.items()}

    def to_device(self, payload):
        """A tensor on the worker's own device (CUDA on a GPU worker): the reply moves it."""
        import torch

        return torch.as_tensor(payload).to(self.context.device)

    def hold(self, payload):
        """Stream the array back (the reply lends a segment), then wait to be killed."""
        yield payload["a"]
        time.sleep(float(payload["seconds"]))
        yield "done"

    def add_one(self, payload):
        payload += 1  # arrays in a request are writable and the handler's to change
        return payload


class Stall(Echo):
    """Stalls once, for a known time: the load test's coordinated-omission check."""

    def setup(self, ctx):
        self.n = 0

    def reset(self, payload=None):
        """Start counting calls of ``work`` from zero again."""
        self.n = 0

    def work(self, payload):
        """Call ``stall_at`` (counted since ``reset``) sleeps ``seconds``; the others return."""
        self.n += 1
        if self.n == int(payload["stall_at"]):
            import time

            time.sleep(float(payload["seconds"]))
        return self.n


class Configured(Echo):
    """Echo plus ``options``: what ``setup()`` got as ``ctx.options`` (--handler-option, TOML)."""

    def setup(self, ctx):
        self.seen = dict(ctx.options)

    def options(self, payload=None):
        return self.seen


class Where(Echo):
    """Says which worker ran a request: the multi-host tests tell hosts apart by it."""

    def where(self, payload=None):
        """Sleeps ``{"seconds": s}`` (default 0), then returns this worker's slot id."""
        time.sleep(float((payload or {}).get("seconds", 0)))
        return self.context.slot


class HttpModel(Faulty):
    """For the HTTP gateway's tests: a KServe v2 model (``infer``, ``metadata``), a paced
    stream and a fast stream of large items."""

    def infer(self, inputs):
        """``x`` (numeric): ``y`` = 2x and its ``total``; ``text`` (BYTES, nested lists of
        bytes): ``upper``, and each element's ``lengths`` in its shape; ``h`` (BF16, a
        torch.bfloat16 tensor): ``h2`` = 2h."""
        import numpy as np

        out = {}
        if "x" in inputs:
            x = inputs["x"]
            out.update(y=x * 2, total=np.asarray([x.sum()], dtype=x.dtype))
        if "text" in inputs:
            out["upper"] = _each(bytes.upper, inputs["text"])
            out["lengths"] = np.asarray(_each(len, inputs["text"]), dtype=np.int32)
        if "h" in inputs:
            out["h2"] = inputs["h"] * 2
        return out

    def metadata(self, payload=None):
        return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]},
                           {"name": "text", "datatype": "BYTES", "shape": [-1, -1]},
                           {"name": "h", "datatype": "BF16", "shape": [-1]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]},
                            {"name": "total", "datatype": "FP32", "shape": [1]},
                            {"name": "upper", "datatype": "BYTES", "shape": [-1, -1]},
                            {"name": "lengths", "datatype": "INT32", "shape": [-1, -1]},
                            {"name": "h2", "datatype": "BF16", "shape": [-1]}]}

    def ticks(self, payload):
        for i in range(int(payload["n"])):
            time.sleep(float(payload.get("every", 0.05)))
            yield i

    def blobs(self, payload):
        item = "x" * int(payload["size"])
        for _ in range(int(payload["n"])):
            yield item


def _each(fn, nested):
    """``fn`` of every element of lists nested to any depth, in the same nesting."""
    return [_each(fn, v) for v in nested] if isinstance(nested, list) else fn(nested)


class Orphans(Faulty):
    """``orphan`` leaves a process behind: a shell that starts ``sleep`` in the background
    and exits, so that the ``sleep`` is handed to the PID namespace's first process."""

    def orphan(self, payload):
        subprocess.run(["sh", "-c", f"sleep {float(payload)} & exit 0"], check=True)
        return True


class WireFails(Faulty):
    """``break_wire`` makes the worker's socket thread fail the next time it reads (a bug
    in it, simulated), and returns this worker's pid."""

    def break_wire(self, payload=None):
        (thread,) = [t for t in threading.enumerate() if t.name == "workerpool-wire"]

        def fail():
            raise RuntimeError("injected failure of the socket thread")

        thread._read = fail
        return os.getpid()
