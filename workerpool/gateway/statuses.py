"""Which HTTP status, and which headers, answer each error: a table of plain values.

::

    error body (protocol.md 5: type, message, retryable, code, retry_after, ...)
        -> status_of(body) -> (status, headers)      e.g. BackpressureError -> 503, Retry-After
        -> error_json(body) -> {"error": {...}}       the body the client reads

No I/O and no classes of the client here: the gateway hands in ``err.to_wire()`` (or an
error of its own, built the same way), so every row is tested with plain dicts.
"""

from __future__ import annotations

import json
import math
from typing import Any

# By ``type``; a ``(type, code)`` entry wins over the type's own.
STATUS_BY_TYPE: dict[str, int] = {
    "BackpressureError": 503,
    "ServiceUnavailableError": 503,
    "ResourceExhaustedError": 503,
    "ClientClosedError": 503,
    "RequestTimeoutError": 504,
    "UnknownMethodError": 404,
    "HandlerError": 500,
    "WorkerCrashedError": 502,
    "PoisonedRequestError": 502,
    "RouterRestartedError": 502,
    "PermissionDeniedError": 502,  # the router refused the gateway's key: not the caller's
    "ProtocolError": 400,
    "PayloadError": 400,
    "ArrayError": 400,
    "ShmError": 400,
    # The gateway's own, for what never reaches the router.
    "NotFound": 404,
    "MethodNotAllowed": 405,
    "Unauthorized": 401,
    "UnsupportedMediaType": 415,
    "NotAcceptable": 406,
    "TooManyRequests": 429,
}
STATUS_BY_CODE: dict[tuple[str, str], int] = {
    ("ServiceUnavailableError", "unknown-service"): 404,
    ("PayloadError", "body-too-large"): 413,
}
DEFAULT_STATUS = 500
"""An error type this table does not know (a newer router's, or a gateway bug)."""
HIDDEN_KEYS = frozenset({"traceback"})
"""Not shown to HTTP callers: a handler's traceback names files, settings and code."""


def status_of(body: dict[str, Any]) -> tuple[int, list[tuple[str, str]]]:
    """The HTTP status and extra headers for the error ``body`` (an ERROR body's map).

    A 503 or 429 with a ``retry_after`` gets ``Retry-After`` in whole seconds, rounded up
    (at least 1), as HTTP has no fractions there."""
    kind = str(body.get("type", ""))
    code = body.get("code")
    status = STATUS_BY_CODE.get((kind, code)) if isinstance(code, str) else None
    if status is None:
        status = STATUS_BY_TYPE.get(kind, DEFAULT_STATUS)
    headers: list[tuple[str, str]] = []
    after = body.get("retry_after")
    if status in (429, 503) and isinstance(after, int | float) and not isinstance(after, bool) \
            and math.isfinite(after):
        headers.append(("retry-after", str(max(1, math.ceil(after)))))
    return status, headers


def error_map(kind: str, message: str, retryable: bool = False, **extra: Any) -> dict[str, Any]:
    """An error of the gateway's own, in the shape of an ERROR body."""
    return {"type": kind, "message": message, "retryable": retryable, **extra}


def shown(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as HTTP callers see it: every key but ``HIDDEN_KEYS``, values JSON can
    carry (anything else as its text)."""
    return {str(k): v if isinstance(v, str | int | float | bool | None) else str(v)
            for k, v in body.items() if k not in HIDDEN_KEYS}


def error_json(body: dict[str, Any]) -> bytes:
    """``{"error": {...}}``, the JSON body of an error reply."""
    return json.dumps({"error": shown(body)}, separators=(",", ":")).encode()
