"""Every error workerpool raises, as one tree under ``WorkerPoolError``.

The tree lives at the bottom layer (``ipc``) because the codec and the frame decoder raise
some of it; ``workerpool.errors`` is its public name. Errors cross the wire as an ERROR
message whose body is a map ``{"type", "message", "retryable", "worker", ...}``
(docs/protocol.md). ``to_wire`` and ``from_wire`` are the only translation points, so a
client in any language sees the same ``type`` strings and Python callers get the same
classes back.
"""

from __future__ import annotations

from typing import Any


class WorkerPoolError(Exception):
    """Base class of every workerpool error.

    ``retryable`` says whether sending the same request again may succeed; ``worker``
    names the worker slot involved (e.g. ``default/2``) when there is one.
    """

    retryable_default = False

    def __init__(
        self,
        message: str = "",
        *,
        retryable: bool | None = None,
        worker: str | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.retryable_default if retryable is None else retryable
        self.worker = worker
        self.extra = extra

    @property
    def type(self) -> str:
        return type(self).__name__

    def to_wire(self) -> dict:
        out = {"type": self.type, "message": self.message, "retryable": self.retryable}
        if self.worker is not None:
            out["worker"] = self.worker
        out.update(self.extra)
        return out

    def __repr__(self) -> str:
        where = f", worker={self.worker!r}" if self.worker else ""
        return f"{self.type}({self.message!r}{where})"


# -- raised by the remote handler ---------------------------------------------------------
class HandlerError(WorkerPoolError):
    """The handler raised: ``remote_type`` is its exception type, the traceback is ``__cause__``."""

    @property
    def remote_type(self) -> str:
        return self.extra.get("remote_type", "Exception")

    @property
    def remote_traceback(self) -> str:
        return self.extra.get("traceback", "")


class UnknownMethodError(WorkerPoolError):
    """The service has no such method."""


# -- the worker or the pool failed ----------------------------------------------------------
class WorkerCrashedError(WorkerPoolError):
    """The worker running the request died (signal, exit, poisoned context) before replying."""

    retryable_default = True


class PoisonedRequestError(WorkerPoolError):
    """The request killed ``poison_threshold`` workers; it is not retried again."""


class ResourceExhaustedError(WorkerPoolError):
    """The worker ran out of a resource (device memory) for this request; it stays up."""

    retryable_default = True


class RouterRestartedError(WorkerPoolError):
    """The router restarted while holding the request: it was lost with it. Retry it."""

    retryable_default = True


class ServiceUnavailableError(WorkerPoolError):
    """No worker can take the request. ``code`` says why: ``unknown-service`` (no such
    service, or none could be resolved), ``no-live-workers`` (a known service whose slots
    all failed or stopped), ``shutting-down`` (the pool drains or drained), or
    ``supervisor-left`` (the worker's supervisor left before the request finished)."""

    retryable_default = True

    @property
    def code(self) -> str | None:
        return self.extra.get("code")


UNKNOWN_SERVICE = "unknown-service"
NO_LIVE_WORKERS = "no-live-workers"
SHUTTING_DOWN = "shutting-down"
SUPERVISOR_LEFT = "supervisor-left"


class BackpressureError(WorkerPoolError):
    """Not admitted now; try again after ``retry_after`` seconds. ``code`` says who is
    over a limit: ``service-full`` (the service's queue or workers), ``client-limit``
    (this connection holds ``max_client_inflight`` requests) or ``not-reading`` (this
    connection was cut off for not reading its replies)."""

    retryable_default = True

    @property
    def retry_after(self) -> float:
        return float(self.extra.get("retry_after", 1.0))

    @property
    def code(self) -> str | None:
        return self.extra.get("code")


class RequestTimeoutError(WorkerPoolError, TimeoutError):
    """The request's deadline passed before its final reply."""

    retryable_default = True


class RequestCancelledError(WorkerPoolError):
    """The request was cancelled before it finished (by its caller or the router)."""


# -- the bytes were wrong ---------------------------------------------------------------------
class ProtocolError(WorkerPoolError):
    """A message broke the wire protocol (bad frames, version, kind, or meta).

    ``code`` names the rule it broke (docs/protocol.md, section 9), when there is one.
    """

    def __init__(self, message: str = "", code: str | None = None, **kwargs: Any) -> None:
        if code is not None:
            kwargs["code"] = code
        super().__init__(message, **kwargs)

    @property
    def code(self) -> str | None:
        return self.extra.get("code")


class FrameError(ProtocolError, ValueError):
    """A message that does not decode into frames, header and meta; never leaves a process
    as itself: the router answers it as ``ProtocolError`` with the same ``code``."""

    def __init__(self, code: str, message: str, req_id: int | None = None) -> None:
        super().__init__(message, code=code)
        self.req_id = req_id


class PayloadError(ProtocolError, ValueError):
    """A payload could not be encoded or decoded (not msgpack, unsupported type).

    ``code`` is ``shm-unreachable`` when the body names shared memory this receiver cannot
    map (the sender can send it again in frames), ``too-large`` for an encode over its
    ``max_bytes``.
    """


class ArrayError(PayloadError):
    """An array that cannot be sent, or a header that does not describe a valid array."""


class ShmError(PayloadError):
    """A shared-memory segment handle that cannot be taken: wrong name, gone, stale, too small."""


class PermissionDeniedError(WorkerPoolError):
    """The connection's key may not do this: a client key sent ADMIN, or the key was
    revoked (``code`` ``role`` or ``revoked``; docs/security.md)."""

    @property
    def code(self) -> str | None:
        return self.extra.get("code")


class AdminError(WorkerPoolError):
    """An operator command could not be carried out (unknown worker, no supervisor)."""


# -- local to the client ------------------------------------------------------------------------
class ClientClosedError(WorkerPoolError):
    """The client was closed while the request was outstanding, or used after close."""


# -- inside the router ---------------------------------------------------------------------------
class IllegalTransition(WorkerPoolError):
    """A worker state change the lifecycle table forbids; the caller keeps the old state."""


_BY_NAME: dict[str, type[WorkerPoolError]] = {
    cls.__name__: cls
    for cls in (
        WorkerPoolError,
        HandlerError,
        UnknownMethodError,
        WorkerCrashedError,
        ResourceExhaustedError,
        PoisonedRequestError,
        RouterRestartedError,
        ServiceUnavailableError,
        BackpressureError,
        RequestTimeoutError,
        RequestCancelledError,
        ProtocolError,
        PayloadError,
        ArrayError,
        ShmError,
        ClientClosedError,
        AdminError,
        PermissionDeniedError,
    )
}


WIRE_TYPES: frozenset[str] = frozenset(_BY_NAME)
"""The ``type`` names an ERROR body may carry that this version knows."""


class RemoteTraceback(Exception):
    """Carries a remote traceback's text as an exception's ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def from_wire(body: Any) -> WorkerPoolError:
    """Rebuild the error an ERROR message carries. Never raises, whatever ``body`` is."""
    if not isinstance(body, dict):
        return ProtocolError(f"malformed error reply: {body!r:.200}")
    fields = dict(body)
    name = str(fields.pop("type", "WorkerPoolError"))
    message = str(fields.pop("message", ""))
    retryable = fields.pop("retryable", None)
    worker = fields.pop("worker", None)
    cls = _BY_NAME.get(name, WorkerPoolError)
    if cls is WorkerPoolError and name != "WorkerPoolError":
        fields["wire_type"] = name  # a newer peer's error type: keep its name visible
    err = cls(
        message,
        retryable=bool(retryable) if retryable is not None else None,
        worker=str(worker) if worker is not None else None,
        **{str(k): v for k, v in fields.items()},
    )
    tb = fields.get("traceback")
    if tb:
        err.__cause__ = RemoteTraceback(str(tb))
    return err
