"""workerpool: serve GPU work from isolated, supervised worker processes.

The user-facing package: the client library, the handler base class, configuration,
errors, and (as modules) the worker runtime, the supervisor and the CLI.

Names are imported on first use (PEP 562), so a process that needs one submodule (the
router needs ``workerpool.config``) does not load the client and asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "AsyncClient": "workerpool.client",
    "Client": "workerpool.client",
    "Handler": "workerpool.handlers",
    "WorkerContext": "workerpool.context",
    "batched": "workerpool.batching",
    "PoolConfig": "workerpool.config",
    "RouterConfig": "workerpool.config",
    "ServiceConfig": "workerpool.config",
    "SupervisorConfig": "workerpool.config",
    **{name: "workerpool.errors" for name in (
        "AdminError",
        "BackpressureError",
        "ClientClosedError",
        "HandlerError",
        "PayloadError",
        "PermissionDeniedError",
        "PoisonedRequestError",
        "ProtocolError",
        "RequestCancelledError",
        "RequestTimeoutError",
        "ResourceExhaustedError",
        "RouterRestartedError",
        "ServiceUnavailableError",
        "UnknownMethodError",
        "WorkerCrashedError",
        "WorkerPoolError",
    )},
}

__all__ = [
    "AdminError",
    "AsyncClient",
    "BackpressureError",
    "Client",
    "ClientClosedError",
    "Handler",
    "HandlerError",
    "PayloadError",
    "PermissionDeniedError",
    "PoisonedRequestError",
    "PoolConfig",
    "ProtocolError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "ResourceExhaustedError",
    "RouterConfig",
    "RouterRestartedError",
    "ServiceConfig",
    "ServiceUnavailableError",
    "SupervisorConfig",
    "UnknownMethodError",
    "WorkerContext",
    "WorkerCrashedError",
    "WorkerPoolError",
    "batched",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'workerpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # next time, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from workerpool.batching import batched
    from workerpool.client import AsyncClient, Client
    from workerpool.config import PoolConfig, RouterConfig, ServiceConfig, SupervisorConfig
    from workerpool.context import WorkerContext
    from workerpool.errors import (
        AdminError,
        BackpressureError,
        ClientClosedError,
        HandlerError,
        PayloadError,
        PermissionDeniedError,
        PoisonedRequestError,
        ProtocolError,
        RequestCancelledError,
        RequestTimeoutError,
        ResourceExhaustedError,
        RouterRestartedError,
        ServiceUnavailableError,
        UnknownMethodError,
        WorkerCrashedError,
        WorkerPoolError,
    )
    from workerpool.handlers import Handler
