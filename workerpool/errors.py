"""Every error workerpool raises, as one tree under ``WorkerPoolError``.

The classes are defined with the wire protocol (``ipc.errors``), since the codec raises
some of them; this is their public home. ``to_wire`` and ``from_wire`` are the only
translation points between an error and an ERROR message's body.
"""

from ipc.errors import (
    AdminError,
    ArrayError,
    BackpressureError,
    ClientClosedError,
    FrameError,
    HandlerError,
    IllegalTransition,
    PayloadError,
    PermissionDeniedError,
    PoisonedRequestError,
    ProtocolError,
    RemoteTraceback,
    RequestCancelledError,
    RequestTimeoutError,
    ResourceExhaustedError,
    RouterRestartedError,
    ServiceUnavailableError,
    ShmError,
    UnknownMethodError,
    WorkerCrashedError,
    WorkerPoolError,
    from_wire,
)

__all__ = [
    "AdminError",
    "ArrayError",
    "BackpressureError",
    "ClientClosedError",
    "FrameError",
    "HandlerError",
    "IllegalTransition",
    "PayloadError",
    "PermissionDeniedError",
    "PoisonedRequestError",
    "ProtocolError",
    "RemoteTraceback",
    "RequestCancelledError",
    "RequestTimeoutError",
    "ResourceExhaustedError",
    "RouterRestartedError",
    "ServiceUnavailableError",
    "ShmError",
    "UnknownMethodError",
    "WorkerCrashedError",
    "WorkerPoolError",
    "from_wire",
]
