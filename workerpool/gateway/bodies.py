"""Request and response bodies: JSON or msgpack, the project's arrays, the size limit.

::

    Content-Type -> media_type()  application/json (or none) | application/msgpack
    body bytes   -> decode()      JSON: nested lists stay lists
                                  msgpack: arrays as extension type 1 with their bytes
                                  inline (ipc/codec.py), refused otherwise
    result       -> encode()      JSON: arrays as nested lists, bytes as base64 text
                                  msgpack: arrays inline, as the clients send them

Nothing here reads a socket: the gateway hands in the bytes it read (at most the limit)
and gets a value, or a ``BodyError`` carrying the error map to answer with. Bytes from
the network are never unpickled: msgpack goes through the project's codec, which refuses
every extension but arrays, and shared-memory handles (``shm-unreachable``).
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

from ipc import codec
from workerpool.gateway.statuses import error_map

JSON = "json"
MSGPACK = "msgpack"
CONTENT_TYPES = {JSON: "application/json", MSGPACK: "application/msgpack"}
MEDIA_TYPES = {"application/json": JSON, "application/msgpack": MSGPACK,
               "application/x-msgpack": MSGPACK, "application/vnd.msgpack": MSGPACK,
               # What `curl -d` sends unless told otherwise: its body is read as JSON.
               "application/x-www-form-urlencoded": JSON}
"""Content types a body may have, by their name without parameters (``; charset=``)."""

DEFAULT_MAX_BODY_BYTES = 64 * 2**20
"""A request body larger than this is refused with 413 before it is read whole."""

_inline = codec.Encoder(inline_max=sys.maxsize)  # HTTP has one body: every array inside it


class BodyError(Exception):
    """A request the gateway refuses before it reaches the router; ``error`` is the map."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error["message"])
        self.error = error


def media_type(header: str | None) -> str:
    """``JSON`` or ``MSGPACK`` for a Content-Type header (none: JSON); raises BodyError
    (415) for any other type."""
    if not header:
        return JSON
    name = header.partition(";")[0].strip().lower()
    kind = MEDIA_TYPES.get(name)
    if kind is None:
        raise BodyError(error_map(
            "UnsupportedMediaType", f"Content-Type {name[:100]!r} is not one of "
            f"{', '.join(sorted(MEDIA_TYPES))}"))
    return kind


def accepted(header: str | None, default: str) -> str:
    """The encoding of the reply: msgpack or JSON when ``Accept`` names one (its first
    mention wins), else ``default`` (the request's own)."""
    if not header:
        return default
    for part in header.split(","):
        kind = MEDIA_TYPES.get(part.partition(";")[0].strip().lower())
        if kind is not None:
            return kind
    return default


def too_large(size: int, limit: int) -> BodyError:
    return BodyError(error_map("PayloadError", f"request body is {size} bytes or more, over "
                               f"the gateway's limit of {limit}", code="body-too-large"))


def decode(body: bytes, kind: str) -> Any:
    """The payload ``body`` holds (empty: None). Raises BodyError (400) when it does not
    decode."""
    if not body:
        return None
    if kind == JSON:
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise BodyError(error_map("PayloadError", f"body is not valid JSON: {exc}",
                                      code="bad-body")) from None
    try:
        return codec.loads(body)
    except codec.PayloadError as exc:
        raise BodyError(error_map("PayloadError", f"body is not a valid msgpack payload: "
                                  f"{exc.message}", code="bad-body")) from None
    except RecursionError:
        raise BodyError(error_map("PayloadError", "body is not a valid msgpack payload: "
                                  "nested too deeply", code="bad-body")) from None


def to_json(value: Any) -> Any:
    """``json.dumps``' ``default``: arrays and tensors as nested lists, numpy scalars as
    numbers, bytes as base64 text, sets and tuples as lists."""
    tolist = getattr(value, "tolist", None)
    if tolist is not None and hasattr(value, "dtype"):
        if "complex" in str(value.dtype):
            raise TypeError(f"a complex array ({value.dtype}) has no JSON form: ask for "
                            "application/msgpack")
        return tolist()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"a {type(value).__name__} has no JSON form")


_to_json = json.JSONEncoder(default=to_json, separators=(",", ":"), ensure_ascii=False).encode
"""One encoder for every reply: ``json.dumps`` with these options builds a new one a call."""


def encode(value: Any, kind: str) -> bytes:
    """``value`` as a reply body; raises BodyError (500) when it cannot be written so."""
    try:
        if kind == JSON:
            return _to_json(value).encode()
        return _inline.encode(value)[0]
    except (TypeError, ValueError, RecursionError, codec.PayloadError) as exc:
        raise BodyError(error_map("HandlerError", f"the result cannot be written as "
                                  f"{CONTENT_TYPES[kind]}: {exc}",
                                  remote_type="UnencodableResult")) from None
