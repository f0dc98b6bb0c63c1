"""Dynamic batching: a handler method that takes many requests at once.

::

    router --REQUEST a, b, c--> worker backlog --[a, b, c] (same method)--> method(list)
    router <--RESULT a | ERROR b | RESULT c--            <--[ra, exc_b, rc]--

A method decorated with ``@batched(max_batch_size=32, max_delay_ms=2)`` is called with a
``list`` of payloads and must return a list of the same length, one result per payload in
the same order. An exception *object* in a position fails only that caller; an exception
*raised* fails every caller in the batch. The worker gathers the batch from the requests
it holds (``workerpool/worker.py: Worker._run_batch``): it flushes when the batch is full,
when the oldest request has waited ``max_delay_ms``, or at once when the router will send
it nothing more (it holds ``max_inflight`` requests). A worker only holds several requests
when the service's ``max_inflight`` allows it, so batches hold at most ``max_inflight``
requests. Left unset, ``max_inflight`` is twice the largest ``max_batch_size`` of the
handler's batched methods (``Worker._capacity``); set explicitly, keep it >= that.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

F = TypeVar("F", bound=Callable[..., Any])
_ATTR = "__workerpool_batch__"


class BatchSpec(BaseModel):
    """How a batched method's batches are formed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(32, ge=1, le=65536,
                                description="Most requests in one call of the method.")
    max_delay_ms: float = Field(2.0, ge=0, le=60_000,
                                description="Longest the oldest request of a partial batch "
                                "waits for more before the batch runs anyway.")


def batched(max_batch_size: int = 32, max_delay_ms: float = 2.0) -> Callable[[F], F]:
    """Declare a handler method batched: it gets ``list[payload]``, returns a list as long.

    Raises ``pydantic.ValidationError`` for bad limits and ``TypeError`` for a generator
    method (a batch cannot stream).
    """
    spec = BatchSpec(max_batch_size=max_batch_size, max_delay_ms=max_delay_ms)

    def mark(fn: F) -> F:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(f"@batched method {fn.__qualname__} is a generator: batched "
                            "methods return one list of results and cannot stream")
        if inspect.iscoroutinefunction(fn):
            raise TypeError(f"@batched method {fn.__qualname__} is async: handler methods "
                            "are plain functions")
        setattr(fn, _ATTR, spec)
        return fn

    return mark


def batch_spec(method: Any) -> BatchSpec | None:
    """The ``BatchSpec`` of a method decorated with ``@batched`` (bound or not), else None."""
    spec = getattr(method, _ATTR, None)
    return spec if isinstance(spec, BatchSpec) else None


def check_results(method: str, results: Any, n: int) -> list:
    """The batch's results as a list, or ``TypeError`` naming the contract it broke."""
    if not isinstance(results, list | tuple):
        raise TypeError(f"batched method {method!r} returned {type(results).__name__}, not a "
                        f"list: it must return one result (or exception) per request, in order")
    if len(results) != n:
        raise TypeError(f"batched method {method!r} returned {len(results)} results for a "
                        f"batch of {n} requests: it must return one result (or exception) "
                        "per request, in order")
    return list(results)
