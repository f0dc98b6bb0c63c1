"""``TorchMLP``: batch inference of a PyTorch MLP with seeded random weights.

::

    payload (list / nested list / ndarray / tensor)
        -> torch.as_tensor -> [rows, in_features]   (a vector is one row)
        -> torch.cat(all requests of the batch) -> model on ctx.device (inference_mode)
        -> split back per request -> _to_reply (the kind each caller sent) -> one reply each

Weights come from a CPU ``torch.Generator`` seeded with ``seed``, so every worker, on any
device, builds the same model: the same input gives the same output from any of them. It
is the built-in handler for measuring batching and GPU placement with real work, and a
template for a model handler (docs/handlers.md).

Service ``options`` (``MLPOptions``): ``in_features``, ``hidden``, ``out_features``,
``layers``, ``seed``, ``dtype``, ``max_rows``, ``threads``. Torch is imported in
``setup()``, so the pool itself never needs it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from workerpool.batching import batch_spec, batched
from workerpool.context import WorkerContext
from workerpool.handlers import Handler


class MLPOptions(BaseModel):
    """The model and its limits, from the service's ``options``."""

    model_config = ConfigDict(extra="forbid")

    in_features: int = Field(256, ge=1, le=65536, description="Width of one input row.")
    hidden: int = Field(1024, ge=1, le=65536, description="Width of each hidden layer.")
    out_features: int = Field(256, ge=1, le=65536, description="Width of one output row.")
    layers: int = Field(4, ge=1, le=64, description="Linear layers in all (GELU between).")
    seed: int = Field(0, ge=0, description="Seed of the weights: same seed, same model.")
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = Field(
        "float32", description="Weights and compute; outputs are sent as float.")
    max_rows: int = Field(4096, ge=1, description="Most rows one request may carry.")
    threads: int | None = Field(
        None, ge=1, le=1024, description="torch intra-op threads (CPU); None: torch's default "
        "(every core). With several CPU workers set about cores / workers.")


def _to_reply(t: Any, like: Any) -> Any:
    """The one place a result tensor becomes a reply: the same kind the caller sent. A
    torch tensor or a numpy array travels as raw bytes (ipc/arrays.py); a list in gives a
    list out, for JSON callers such as ``workerpool call``."""
    if type(like).__module__ == "torch":
        return t
    if type(like).__module__ == "numpy":
        return t.numpy()
    return t.tolist()


class TorchMLP(Handler):
    """An MLP on the worker's device. ``infer`` takes one request; ``infer_batch`` is the same
    computation ``@batched``: the requests a worker holds run as one forward pass."""

    def setup(self, ctx: WorkerContext) -> None:
        try:
            import torch
        except ImportError as exc:
            raise RuntimeError("TorchMLP needs PyTorch: pip install 'workerpool[torch]' "
                               "(or a torch build for your CUDA version)") from exc
        self.torch = torch
        self.options = opts = MLPOptions.model_validate(ctx.options)
        self.device = torch.device(ctx.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"worker device is {ctx.device} but torch {torch.__version__} "
                               "sees no CUDA device (a CPU-only build, or no driver)")
        if opts.threads is not None:
            torch.set_num_threads(opts.threads)
        self.dtype = getattr(torch, opts.dtype)
        self.model = self._build(opts).to(self.device, self.dtype).eval()
        self._warm_up()

    def _build(self, opts: MLPOptions) -> Any:
        """Linear layers with GELU between, weights ~ N(0, 1/fan_in) from a seeded CPU
        generator: identical on every worker and every device."""
        torch = self.torch
        g = torch.Generator().manual_seed(opts.seed)
        widths = [opts.in_features, *[opts.hidden] * (opts.layers - 1), opts.out_features]
        mods: list[Any] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            layer = torch.nn.Linear(fan_in, fan_out)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(fan_out, fan_in, generator=g) / math.sqrt(fan_in))
                layer.bias.copy_(torch.randn(fan_out, generator=g) * 0.01)
            mods.append(layer)
            if i < len(widths) - 2:
                mods.append(torch.nn.GELU())
        return torch.nn.Sequential(*mods)

    def _warm_up(self) -> None:
        """Run the shapes serving will run, so the first requests do not pay for kernel
        selection, allocator growth or CUDA lazy initialisation."""
        spec = batch_spec(self.infer_batch)
        sizes = {1, spec.max_batch_size if spec else 1}
        for n in sorted(sizes):
            x = [[0.0] * self.options.in_features] * n
            for r in self._forward_many([x]):
                if isinstance(r, Exception):
                    raise r
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    # -- methods ---------------------------------------------------------------------------------
    def infer(self, payload: Any) -> Any:
        """One input, a vector ``[in_features]`` or a matrix ``[rows, in_features]``: the
        output of the same rank (``[out_features]`` or ``[rows, out_features]``)."""
        [result] = self._forward_many([payload])
        if isinstance(result, Exception):
            raise result
        return result

    @batched(max_batch_size=32, max_delay_ms=2)
    def infer_batch(self, payloads: list[Any]) -> list[Any]:
        """``infer`` for every request of a batch in one forward pass. Inputs may differ in
        row count (their rows are concatenated); a malformed one fails only its caller."""
        return self._forward_many(payloads)

    def info(self, payload: Any = None) -> dict:
        """What this worker runs (device, dtype, widths, seed, parameter count, threads) and
        its ``stats`` (``batches`` and ``batched_requests`` give the mean batch size)."""
        o = self.options
        return {"slot": self.context.slot, "device": str(self.device), "dtype": o.dtype,
                "in_features": o.in_features, "hidden": o.hidden,
                "out_features": o.out_features, "layers": o.layers, "seed": o.seed,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "threads": self.torch.get_num_threads(),
                "max_batch_size": batch_spec(self.infer_batch).max_batch_size,
                "stats": dataclasses.asdict(self.context.stats)}

    # -- the computation -------------------------------------------------------------------------
    def _as_rows(self, payload: Any) -> tuple[Any, bool]:
        """``payload`` as a CPU tensor ``[rows, in_features]``, and whether it was a vector."""
        torch = self.torch
        try:
            x = torch.as_tensor(payload, dtype=self.dtype, device="cpu")
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"input is not a numeric array: {exc}") from None
        n = self.options.in_features
        if x.dim() == 1 and x.shape[0] == n:
            return x.unsqueeze(0), True
        if x.dim() == 2 and x.shape[1] == n and 1 <= x.shape[0] <= self.options.max_rows:
            return x, False
        raise ValueError(f"input has shape {tuple(x.shape)}: expected [{n}] or [rows, {n}] "
                         f"with 1 <= rows <= max_rows={self.options.max_rows}")

    def _forward_many(self, payloads: list[Any]) -> list[Any]:
        """One forward pass for every well-formed input; a ValueError in the place of each
        malformed one."""
        torch = self.torch
        out: list[Any] = [None] * len(payloads)
        parts, where, vector = [], [], []
        for k, payload in enumerate(payloads):
            try:
                rows, is_vector = self._as_rows(payload)
            except ValueError as exc:
                out[k] = exc
                continue
            parts.append(rows)
            where.append(k)
            vector.append(is_vector)
        if not parts:
            return out
        with torch.inference_mode():
            x = torch.cat(parts).to(self.device, non_blocking=True)
            y = self.model(x).float().cpu()  # one device-to-host copy for the whole batch
        for k, is_vector, part in zip(where, vector, y.split([p.shape[0] for p in parts]),
                                      strict=True):
            out[k] = _to_reply(part[0] if is_vector else part, payloads[k])
        return out
