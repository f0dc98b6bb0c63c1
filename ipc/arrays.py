"""numpy arrays and torch tensors as msgpack extension type 1: a small header plus raw bytes.

::

    encode: array -> Outgoing (kind, dtype, shape, nbytes) -> the codec picks where the
            bytes go (inline, a buffer frame, a shared-memory segment) -> header map
    decode: header map -> check every field -> bytes from that place -> array, no copy

Neither numpy nor torch is imported here until an array is met: an object can only be a
numpy array or a torch tensor if its module is already loaded, and decoding imports the
one the header names. The header's fields are in docs/protocol.md, section 2.4.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from ipc.errors import ArrayError

KIND_NUMPY = "numpy"
KIND_NUMPY_SCALAR = "numpy-scalar"
KIND_TORCH = "torch"
KINDS = frozenset({KIND_NUMPY, KIND_NUMPY_SCALAR, KIND_TORCH})
MAX_NDIM = 64  # numpy's own limit

# numpy dtypes by their array-interface type string (byte order, kind, size). Only fixed-size
# numeric types whose layout is the same on every platform: no long double, no objects.
NUMPY_DTYPES = frozenset(
    {"|b1", "|i1", "|u1"}
    | {f"{order}{kind}{size}" for order in "<>"
       for kind, sizes in (("i", (2, 4, 8)), ("u", (2, 4, 8)), ("f", (2, 4, 8)), ("c", (8, 16)))
       for size in sizes})

# torch dtypes by name; those the installed torch lacks are refused when they arrive.
TORCH_DTYPES = frozenset({
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
})


class Outgoing:
    """An array about to be sent: what the header says, and two ways to get its bytes."""

    __slots__ = ("dtype", "kind", "nbytes", "obj", "shape")

    def __init__(self, kind: str, dtype: str, shape: list[int], nbytes: int, obj: Any) -> None:
        self.kind = kind
        self.dtype = dtype
        self.shape = shape
        self.nbytes = nbytes
        self.obj = obj  # numpy array (scalars made 0-d) or detached, resolved torch tensor

    def contiguous_bytes(self) -> Any:
        """A flat uint8 numpy array of the C-order bytes; a copy only if the source is not
        C-contiguous (or not in host memory)."""
        import numpy as np

        if self.kind == KIND_TORCH:
            t = self.obj
            if t.device.type != "cpu":
                t = t.to("cpu")  # the one device-to-host copy
            return t.contiguous().reshape(-1).view(_torch().uint8).numpy()
        return np.ascontiguousarray(self.obj).reshape(-1).view(np.uint8)

    def copy_into(self, dst: Any) -> None:
        """Write the C-order bytes into ``dst`` (a writable buffer of exactly nbytes), in
        one pass, gathering strided sources and copying from a device directly."""
        import numpy as np

        if self.nbytes == 0:
            return
        raw = np.frombuffer(dst, np.uint8, self.nbytes)
        if self.kind == KIND_TORCH:
            torch = _torch()
            out = torch.from_numpy(raw).view(self.obj.dtype).reshape(self.obj.shape)
            out.copy_(self.obj)
        else:
            np.copyto(raw.view(self.obj.dtype).reshape(self.obj.shape), self.obj,
                      casting="no")


def _torch() -> Any:
    return sys.modules["torch"]


def outgoing(obj: Any) -> Outgoing | None:
    """Describe ``obj`` if it is a numpy array or scalar or a torch tensor, else None.

    Raises ArrayError for an array of a kind that cannot travel (object dtype, sparse...).
    """
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            ma = sys.modules.get("numpy.ma")  # no masked array exists unless it is loaded
            if ma is not None and isinstance(obj, ma.MaskedArray):
                raise ArrayError("masked arrays cannot be sent (the mask would be lost); "
                                 "send .data and .mask")
            return _numpy_outgoing(obj, KIND_NUMPY)
        if isinstance(obj, np.generic):
            return _numpy_outgoing(np.asarray(obj), KIND_NUMPY_SCALAR)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _torch_outgoing(obj)
    return None


def _numpy_outgoing(arr: Any, kind: str) -> Outgoing:
    dt = arr.dtype.str
    if dt not in NUMPY_DTYPES:
        raise ArrayError(f"numpy dtype {arr.dtype} cannot be sent: only bool, integer, float "
                         "(16, 32, 64 bit) and complex (64, 128 bit) arrays travel")
    return Outgoing(kind, dt, list(arr.shape), arr.nbytes, arr)


def _torch_outgoing(t: Any) -> Outgoing:
    torch = _torch()
    if t.layout != torch.strided:
        raise ArrayError(f"torch tensors with layout {t.layout} cannot be sent; use .to_dense()")
    if t.is_quantized or getattr(t, "is_nested", False):
        raise ArrayError("quantized and nested torch tensors cannot be sent")
    name = str(t.dtype).removeprefix("torch.")
    if name not in TORCH_DTYPES:
        raise ArrayError(f"torch dtype {name} cannot be sent")
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return Outgoing(KIND_TORCH, name, list(t.shape), t.numel() * t.element_size(), t)


# -- decoding ---------------------------------------------------------------------------------
_HEADER_KEYS = frozenset({"k", "dt", "sh", "n", "x", "b", "m"})
_PLACES = ("x", "b", "m")


def check_int(value: Any, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    """``value`` if it is an int (not a bool) in [lo, hi], else ArrayError."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ArrayError(f"array header: {what} must be an integer in [{lo}, {hi}], "
                         f"got {value!r:.60}")
    return value


def check_header(header: Any) -> tuple[str, str, list[int], int, str]:
    """Validate a decoded header map; returns (kind, dtype, shape, nbytes, place key).

    Checks every field: known keys only, a known kind and dtype, a shape of at most 64
    non-negative dimensions, ``n == prod(shape) * itemsize``, exactly one place.
    """
    if not isinstance(header, dict):
        raise ArrayError(f"array header is a {type(header).__name__}, not a map")
    unknown = set(header) - _HEADER_KEYS
    if unknown:
        raise ArrayError(f"array header has unknown fields {sorted(map(str, unknown))}")
    kind = header.get("k")
    if kind not in KINDS:
        raise ArrayError(f"array header: kind {kind!r:.40} is not one of {sorted(KINDS)}")
    dtype = header.get("dt")
    known = TORCH_DTYPES if kind == KIND_TORCH else NUMPY_DTYPES
    if dtype not in known:
        raise ArrayError(f"array header: {kind} dtype {dtype!r:.40} is not supported")
    shape = header.get("sh")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise ArrayError(f"array header: shape must be a list of at most {MAX_NDIM} integers")
    for d in shape:
        check_int(d, "each dimension")
    if kind == KIND_NUMPY_SCALAR and shape:
        raise ArrayError("array header: a numpy scalar has shape []")
    nbytes = check_int(header.get("n"), "n (bytes)")
    itemsize = _itemsize(kind, dtype)
    expected = math.prod(shape) * itemsize
    if nbytes != expected:
        raise ArrayError(f"array header: n is {nbytes} but shape {shape} of {dtype} takes "
                         f"{expected} bytes")
    places = [p for p in _PLACES if p in header]
    if len(places) != 1:
        raise ArrayError("array header must say where the bytes are with exactly one of "
                         "x (inline), b (buffer frame), m (shared memory)")
    return kind, dtype, shape, nbytes, places[0]


def _itemsize(kind: str, dtype: str) -> int:
    if kind == KIND_TORCH:
        # Sizes in the name (float8_*: 1) are fixed; don't import torch just to validate.
        return _TORCH_ITEMSIZE[dtype]
    return int(dtype[2:])


_TORCH_ITEMSIZE = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint16": 2,
    "uint32": 4, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex32": 4, "complex64": 8, "complex128": 16, "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
}


def build(kind: str, dtype: str, shape: list[int], raw: Any) -> Any:
    """The array over ``raw`` (a flat uint8 numpy array of exactly its bytes), without a
    copy when ``raw`` is writable and aligned."""
    import numpy as np

    if kind == KIND_TORCH:
        try:
            import torch
        except ImportError:
            raise ArrayError("a torch tensor arrived but torch is not installed here") from None
        tdtype = getattr(torch, dtype, None)
        if not isinstance(tdtype, torch.dtype):
            raise ArrayError(f"torch dtype {dtype} is not available in torch "
                             f"{torch.__version__}")
        if not raw.flags.writeable or raw.ctypes.data % min(tdtype.itemsize, 8):
            raw = raw.copy()  # torch has no read-only tensors, and wants aligned data
        return torch.from_numpy(raw).view(tdtype).reshape(shape)
    npdtype = np.dtype(dtype)
    if raw.ctypes.data % npdtype.alignment:
        raw = raw.copy()
    arr = raw.view(npdtype).reshape(shape)
    return arr[()] if kind == KIND_NUMPY_SCALAR else arr


def header(out: Outgoing, place: str, where: Any) -> dict:
    """The header map for ``out`` whose bytes are at ``place`` (x, b or m) = ``where``."""
    return {"k": out.kind, "dt": out.dtype, "sh": out.shape, "n": out.nbytes, place: where}
