"""Built-in handlers for demos and tests, and the ``Handler`` base class.

A handler is a class; the worker instantiates it with no arguments, calls ``setup(ctx)``
once (load weights there), then calls its public methods by name with the request's
payload. A method that returns a generator streams: each item is one PARTIAL reply; a
method declared ``@batched`` gets a list of payloads (workerpool/batching.py), as
``BatchedEcho.echo`` does.

Handlers that do real work live in their own modules, which import their framework only
in ``setup()``: ``workerpool.handlers.torch_mlp:TorchMLP`` (PyTorch) and
``workerpool.handlers.cupy_ops:CupyOps`` (CuPy). docs/handlers.md shows how to write one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any

from workerpool.batching import batched
from workerpool.context import WorkerContext

_SPIN_BUFFER = bytes(16384)  # hashed in about 20-40 µs: the spin's granularity


class Handler:
    """Optional base class. Public methods (no leading underscore) are callable remotely."""

    #: Set by the worker before ``setup``; handlers may read it at any time.
    context: WorkerContext | None = None

    def setup(self, ctx: WorkerContext) -> None:
        """Called once, before the first request, on the worker's own device."""

    def teardown(self) -> None:
        """Called once when the worker stops gracefully (never after a crash)."""


class Echo(Handler):
    """Returns what it gets: the no-op handler for tests, demos and benchmarks."""

    def echo(self, payload: Any) -> Any:
        return payload

    def count(self, payload: dict) -> Iterator[int]:
        """Streams 0..n-1 for ``{"n": n}``."""
        n = int(payload["n"])
        yield from range(n)

    def sleep(self, payload: dict) -> Any:
        """Sleeps ``{"seconds": s}``, then returns its payload."""
        time.sleep(float(payload.get("seconds", 0)))
        return payload

    def spin(self, payload: dict) -> Any:
        """Computes in Python, holding the GIL, for ``{"seconds": s}``, then returns its
        payload: a handler that keeps the CPU busy where ``sleep`` lets it go."""
        end = time.perf_counter() + float(payload.get("seconds", 0))
        while time.perf_counter() < end:
            pass
        return payload

    def spin_released(self, payload: dict) -> Any:
        """Keeps a CPU busy in C with the GIL released, for ``{"seconds": s}``, then returns
        its payload: a handler waiting on a GPU as CUDA's default synchronize does (it
        spins), seen from the CPU."""
        end = time.perf_counter() + float(payload.get("seconds", 0))
        while time.perf_counter() < end:
            hashlib.md5(_SPIN_BUFFER)  # hashlib lets go of the GIL for more than 2 KiB
        return payload

    def whoami(self, payload: Any = None) -> dict:
        """The worker's view of itself: slot, pid, device and the CUDA_VISIBLE_DEVICES it saw."""
        ctx = self.context
        return {
            "slot": ctx.slot if ctx else None,
            "pid": os.getpid(),
            "device": ctx.device if ctx else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "stats": dataclasses.asdict(ctx.stats) if ctx else None,
        }


class BatchedEcho(Echo):
    """``Echo`` whose ``echo`` is ``@batched`` (16 requests, 2 ms): the no-op that shows what
    batching itself costs (bench/peers.py)."""

    @batched(max_batch_size=16, max_delay_ms=2)
    def echo(self, payloads: list) -> list:
        return payloads


class Faulty(Echo):
    """Echo plus methods that fail in every way a worker can: for fault-injection tests."""

    def raise_error(self, payload: Any = None) -> None:
        """Raises ValueError (a domain error: the worker stays up)."""
        message = payload.get("message", "requested failure") if isinstance(payload, dict) else (
            "requested failure"
        )
        raise ValueError(message)

    def exit(self, payload: Any = None) -> None:
        """Ends the process at once with ``{"code": c}`` (default 1), skipping cleanup."""
        code = int(payload.get("code", 1)) if isinstance(payload, dict) else 1
        os._exit(code)

    def segfault(self, payload: Any = None) -> None:
        """Dereferences NULL: a real SIGSEGV."""
        ctypes.string_at(0)

    def hang(self, payload: Any = None) -> None:
        """Never returns (until the process is killed)."""
        while True:
            time.sleep(3600)
