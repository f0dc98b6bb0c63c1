"""KServe v2 ``BYTES`` and ``BF16`` tensors to and from plain values: no I/O.

::

    BYTES  binary: [u32 little-endian length][bytes] per element, row-major
             unpack_bytes() -> flat list of bytes -> nest() -> lists nested to the shape
             (what the handler gets: msgpack carries bytes, never an object array)
           the handler's nested lists of bytes/str -> shape_of() -> flat -> pack_bytes()
    BF16   binary: 2 little-endian bytes per element
             bf16_tensor() -> torch.bfloat16 (the codec's bfloat16, ipc/arrays.py)
           a torch.bfloat16 result -> bf16_bytes()

Every refusal is a ``TensorError`` whose message names what is wrong; kserve.py turns it
into the reply (400 for a request, 500 for a handler's result).
"""

from __future__ import annotations

import math
import struct
import sys
from typing import Any

from ipc import arrays
from ipc.errors import ArrayError

BYTES = "BYTES"
BF16 = "BF16"
MAX_EMPTY_LISTS = 65536
"""In a BYTES tensor with no elements, the dimensions before the first 0 multiply to at
most this (shape ``[N, 0]`` is N empty lists): that nested form costs memory the body
never paid for."""

_LENGTH = struct.Struct("<I")


class TensorError(ValueError):
    """Tensor data that does not match its datatype or shape."""


# -- BYTES ------------------------------------------------------------------------------------
def unpack_bytes(buf: bytes | memoryview, count: int) -> list[bytes]:
    """The ``count`` elements of a binary BYTES tensor: each a 4-byte little-endian length
    and that many bytes, filling ``buf`` exactly. Raises TensorError otherwise."""
    buf = bytes(buf)  # one copy: slicing bytes then makes each element directly
    out: list[bytes] = []
    at, end = 0, len(buf)
    unpack = _LENGTH.unpack_from
    while at < end:
        if len(out) == count:
            raise TensorError(f"{end - at} bytes are left after its {count} elements")
        if at + 4 > end:
            raise TensorError(f"element {len(out)}'s 4-byte length is cut off at byte {at} "
                              f"of {end}")
        (n,) = unpack(buf, at)
        at += 4
        if at + n > end:
            raise TensorError(f"element {len(out)}'s length {n} runs past the data "
                              f"({end - at} bytes left of {end})")
        out.append(buf[at:at + n])
        at += n
    if len(out) != count:
        raise TensorError(f"{len(out)} elements, but its shape holds {count}")
    return out


def pack_bytes(items: list[bytes | str]) -> bytes:
    """Elements as a binary BYTES tensor (text as its UTF-8 bytes)."""
    parts = []
    for item in items:
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts += (_LENGTH.pack(len(data)), data)
    return b"".join(parts)


def flatten(data: Any) -> list[Any]:
    """The leaves of nested lists, row-major (a non-list is one leaf). Iterative: JSON
    nests deeper than Python recurses."""
    out: list[Any] = []
    stack = [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def nest(flat: list[Any], shape: list[int]) -> Any:
    """``flat`` (row-major, exactly the shape's count) as lists nested to ``shape``; the
    element itself for shape ``[]``. Raises TensorError for an empty tensor that would
    need more than MAX_EMPTY_LISTS lists."""
    if not shape:
        return flat[0]
    if not flat:
        rows = math.prod(shape[:shape.index(0)])
        if rows > MAX_EMPTY_LISTS:
            raise TensorError(f"shape {shape} has no elements but would take {rows} "
                              f"empty lists; at most {MAX_EMPTY_LISTS}")

    def build(start: int, dims: list[int]) -> list[Any]:
        if len(dims) == 1:
            return flat[start:start + dims[0]]
        step = math.prod(dims[1:])
        return [build(start + i * step, dims[1:]) for i in range(dims[0])]

    return build(0, shape)


def is_text(value: Any) -> bool:
    """Whether ``value`` (nested lists, or one element) holds bytes or str elements: a
    BYTES tensor, as a handler returns one."""
    while isinstance(value, list | tuple) and value:
        value = value[0]
    return isinstance(value, bytes | bytearray | str)


def shape_of(value: Any) -> tuple[list[int], list[bytes | str]]:
    """(shape, row-major elements) of nested lists of bytes or str; one element is shape
    ``[]``. Raises TensorError when the lists are ragged or an element is neither."""
    shape: list[int] = []
    level = [value]
    while level and isinstance(level[0], list | tuple):
        n = len(level[0])
        if not all(isinstance(v, list | tuple) and len(v) == n for v in level):
            raise TensorError(f"ragged lists: not every list at depth {len(shape)} has "
                              f"{n} items")
        shape.append(n)
        level = [item for v in level for item in v]
    for item in level:
        if not isinstance(item, bytes | bytearray | str):
            raise TensorError(f"a BYTES tensor holds only bytes or str, not "
                              f"{type(item).__name__}")
    return shape, level


def text_of(item: bytes | str) -> str:
    """An element as JSON text; TensorError when its bytes are not UTF-8."""
    if isinstance(item, str):
        return item
    try:
        return bytes(item).decode()
    except UnicodeDecodeError:
        raise TensorError(f"element {bytes(item)[:20]!r} is not UTF-8 text") from None


# -- BF16 -------------------------------------------------------------------------------------
def bf16_tensor(buf: bytes | memoryview, shape: list[int]) -> Any:
    """A binary BF16 tensor as the codec's bfloat16, a ``torch.bfloat16`` tensor (copied out
    of ``buf``). Raises TensorError when torch is not installed."""
    import numpy as np

    try:
        return arrays.build(arrays.KIND_TORCH, "bfloat16", shape, np.frombuffer(buf, np.uint8))
    except ArrayError as exc:
        raise TensorError(f"BF16 reaches the handler as torch.bfloat16: {exc}") from None


def is_bf16(value: Any) -> bool:
    """Whether ``value`` is a torch.bfloat16 tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor) \
        and value.dtype == torch.bfloat16


def bf16_bytes(tensor: Any) -> bytes:
    """A torch.bfloat16 tensor's binary BF16 data: its row-major little-endian bytes."""
    return arrays.outgoing(tensor).contiguous_bytes().tobytes()
