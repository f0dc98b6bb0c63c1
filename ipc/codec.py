"""Payload codec: Python values <-> (body frame, buffer frames).

Bodies are msgpack. Values msgpack cannot express natively are refused with
``PayloadError`` rather than pickled: bytes from the network are never unpickled.
Extension type codes are reserved here so that large binary buffers (arrays, tensors)
can travel later as their own frames, referenced from the body by index.
"""

from __future__ import annotations

from typing import Any

import msgpack

# msgpack extension codes used in bodies. An unknown code is a decoding error.
EXT_BUFFER_REF = 1  # payload: u32 index into the message's buffer frames (reserved)


class PayloadError(ValueError):
    """A value that cannot be encoded, or a body that cannot be decoded."""


class Encoder:
    """Encode one payload into a body frame plus out-of-band buffer frames."""

    # Stateless (msgpack.packb per call) so one Encoder is safe to share between threads.

    @staticmethod
    def _default(obj: Any) -> Any:
        if isinstance(obj, (tuple, set, frozenset)):
            return list(obj)
        raise TypeError(f"cannot encode object of type {type(obj).__name__}")

    def encode(self, obj: Any) -> tuple[bytes, list]:
        try:
            return msgpack.packb(obj, use_bin_type=True, default=self._default), []
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(str(exc)) from None


class Decoder:
    """Decode a body frame (and its buffer frames) back into a Python value."""

    def _ext_hook(self, code: int, data: bytes) -> Any:
        raise PayloadError(f"unknown msgpack extension type {code}")

    def decode(self, body: bytes, buffers: list | tuple = ()) -> Any:
        if not body:
            return None
        try:
            return msgpack.unpackb(
                body, raw=False, strict_map_key=False, ext_hook=self._ext_hook, use_list=True
            )
        except PayloadError:
            raise
        except Exception as exc:  # garbage raises several msgpack/value error types
            raise PayloadError(f"body is not valid msgpack: {exc}") from None


_encoder = Encoder()
_decoder = Decoder()


def dumps(obj: Any) -> tuple[bytes, list]:
    """Encode with the shared default encoder."""
    return _encoder.encode(obj)


def loads(body: bytes, buffers: list | tuple = ()) -> Any:
    """Decode with the shared default decoder."""
    return _decoder.decode(body, buffers)
