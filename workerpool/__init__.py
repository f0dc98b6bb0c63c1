"""workerpool: serve GPU work from isolated, supervised worker processes.

The user-facing package: the client library, the handler base class, configuration,
errors, and (as modules) the worker runtime, the supervisor and the CLI.
"""

from workerpool.batching import batched
from workerpool.client import AsyncClient, Client
from workerpool.config import PoolConfig, RouterConfig, ServiceConfig, SupervisorConfig
from workerpool.context import WorkerContext
from workerpool.errors import (
    BackpressureError,
    ClientClosedError,
    HandlerError,
    PayloadError,
    ProtocolError,
    RequestTimeoutError,
    ServiceUnavailableError,
    UnknownMethodError,
    WorkerCrashedError,
    WorkerPoolError,
)
from workerpool.handlers import Handler

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BackpressureError",
    "Client",
    "ClientClosedError",
    "Handler",
    "HandlerError",
    "PayloadError",
    "PoolConfig",
    "ProtocolError",
    "RequestTimeoutError",
    "RouterConfig",
    "ServiceConfig",
    "ServiceUnavailableError",
    "SupervisorConfig",
    "UnknownMethodError",
    "WorkerContext",
    "WorkerCrashedError",
    "WorkerPoolError",
    "batched",
]
