"""Payload codec: Python values <-> (body frame, buffer frames).

::

    encode: value --msgpack--> body; each numpy array / torch tensor met on the way becomes
            ext type 1 (a header map) and its bytes go inline (small), into a shared-memory
            segment lent by a SegmentPool (large, same host), or into a buffer frame
    decode: body --msgpack--> value; each ext type 1 header is checked field by field and
            becomes an array over the inline bytes, the buffer frame or the mapped segment

Values msgpack cannot express are refused with ``PayloadError`` rather than pickled: bytes
from the network are never unpickled. docs/protocol.md (sections 2.3-2.5) is the normative
description.
"""

from __future__ import annotations

from typing import Any

import msgpack

from ipc import arrays
from ipc.errors import ArrayError, PayloadError, ShmError
from ipc.shm import SegmentMapper, SegmentPool

# msgpack extension codes used in bodies. An unknown code is a decoding error.
EXT_ARRAY = 1  # payload: msgpack header map of one array (docs/protocol.md 2.4)

INLINE_MAX = 4096
"""Arrays of at most this many bytes travel inside the body: a frame costs more."""
SHM_THRESHOLD = 2**18
"""Arrays of at least this many bytes go through shared memory when the peer can map it.
Measured echo round trips (bench/tensors.py): 0.68 ms against 1.06 ms in frames at 256 KiB;
at 128 KiB the two are even, and a frame needs no segment."""


SHM_UNREACHABLE = "shm-unreachable"
TOO_LARGE = "too-large"  # an encode over max_bytes; the message reads "N bytes, over ..."


class _NotPlain(Exception):
    """Raised inside msgpack's packer: the value needs the full encoding path."""


def _plain_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise _NotPlain


class _Encoding:
    """The state of one encode call: buffer frames and leases so far."""

    __slots__ = ("array_bytes", "buffers", "enc", "leases", "max_bytes", "pool", "tag")

    def __init__(self, enc: Encoder, pool: SegmentPool | None, tag: Any,
                 max_bytes: int | None) -> None:
        self.enc = enc
        self.pool = pool
        self.tag = tag
        self.max_bytes = max_bytes
        self.buffers: list = []
        self.leases: list = []
        self.array_bytes = 0

    def default(self, obj: Any) -> Any:
        if isinstance(obj, (tuple, set, frozenset)):
            return list(obj)
        out = arrays.outgoing(obj)
        if out is None:
            raise TypeError(f"cannot encode object of type {type(obj).__name__}")
        self.array_bytes += out.nbytes
        if self.max_bytes is not None and self.array_bytes > self.max_bytes:
            raise PayloadError(f"{self.array_bytes} bytes or more, over max_message_bytes="
                               f"{self.max_bytes}", code=TOO_LARGE)
        n = out.nbytes
        lease = None
        if n <= self.enc.inline_max:
            place, where = "x", out.contiguous_bytes().tobytes()
        elif (self.pool is not None and n >= self.enc.shm_threshold
              and (lease := self.pool.lend(n, self.tag)) is not None):
            self.leases.append(lease)
            try:
                out.copy_into(lease.data)
            finally:
                try:
                    lease.data.release()
                except BufferError:
                    pass  # an exception's traceback still holds a view; the GC drops it
            place, where = "m", lease.handle
        else:
            place, where = "b", len(self.buffers)
            self.buffers.append(out.contiguous_bytes())
        head = msgpack.packb(arrays.header(out, place, where), use_bin_type=True)
        return msgpack.ExtType(EXT_ARRAY, head)

    def abort(self) -> None:
        """Nothing was sent: the leases go back to the pool at once."""
        for lease in self.leases:
            self.pool.unlend(lease)


class Encoder:
    """Encode one payload into a body frame plus out-of-band buffer frames.

    Stateless between calls, so one Encoder is safe to share between threads.
    """

    def __init__(self, inline_max: int = INLINE_MAX, shm_threshold: int = SHM_THRESHOLD) -> None:
        self.inline_max = inline_max
        self.shm_threshold = shm_threshold

    def encode(self, obj: Any, *, pool: SegmentPool | None = None, tag: Any = None,
               max_bytes: int | None = None) -> tuple[bytes, list]:
        """(body, buffer frames). With ``pool``, large arrays go into segments lent under
        ``tag`` (see ``SegmentPool.lend``). ``max_bytes`` bounds the body plus every array's
        bytes, wherever they travel, and is checked before any large copy."""
        call = _Encoding(self, pool, tag, max_bytes)
        try:
            body = msgpack.packb(obj, use_bin_type=True, default=call.default)
            if max_bytes is not None and len(body) + call.array_bytes > max_bytes:
                raise PayloadError(f"{len(body) + call.array_bytes} bytes, over "
                                   f"max_message_bytes={max_bytes}", code=TOO_LARGE)
        except PayloadError:
            call.abort()
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            call.abort()
            raise PayloadError(str(exc)) from None
        except BaseException:
            call.abort()
            raise
        return body, call.buffers


class _Decoding:
    """The state of one decode call: which buffer frames were used, bytes so far."""

    __slots__ = ("buffers", "mapper", "max_bytes", "total", "used")

    def __init__(self, buffers: list | tuple, mapper: SegmentMapper | None,
                 max_bytes: int | None) -> None:
        self.buffers = buffers
        self.mapper = mapper
        self.max_bytes = max_bytes
        self.used: set[int] = set()
        self.total = 0

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code != EXT_ARRAY:
            raise PayloadError(f"unknown msgpack extension type {code}")
        try:
            head = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:
            raise PayloadError(f"array header is not msgpack: {exc}") from None
        try:
            kind, dtype, shape, nbytes, place = arrays.check_header(head)
            self.total += nbytes
            if self.max_bytes is not None and self.total > self.max_bytes:
                raise ArrayError(f"the message's arrays take {self.total} bytes or more, over "
                                 f"max_message_bytes={self.max_bytes}")
            raw = self._bytes(place, head[place], nbytes)
            return arrays.build(kind, dtype, shape, raw)
        except (ArrayError, ShmError) as exc:
            raise PayloadError(f"bad array: {exc}") from None

    def _bytes(self, place: str, where: Any, nbytes: int) -> Any:
        import numpy as np

        if place == "x":
            if not isinstance(where, bytes) or len(where) != nbytes:
                raise ArrayError(f"inline bytes must be bin of length n={nbytes}")
            return np.frombuffer(bytearray(where), np.uint8)
        if place == "b":
            if not self.buffers:
                raise ArrayError("the header names a buffer frame but the message has none")
            i = arrays.check_int(where, "b (buffer index)", 0, len(self.buffers) - 1)
            if i in self.used:
                raise ArrayError(f"buffer frame {i} is referenced twice")
            self.used.add(i)
            frame = self.buffers[i]
            size = memoryview(frame).nbytes
            if size != nbytes:
                raise ArrayError(f"buffer frame {i} is {size} bytes, the header says n={nbytes}")
            return np.frombuffer(frame, np.uint8)
        if (not isinstance(where, list) or len(where) != 2 or not isinstance(where[0], str)):
            raise ArrayError("shared-memory handle must be [name, generation]")
        gen = arrays.check_int(where[1], "the segment generation", 1, 2**64 - 1)
        if self.mapper is None:
            raise PayloadError("the payload is in shared memory this receiver cannot map "
                               "(it runs on another host, or was not told it may)",
                               code=SHM_UNREACHABLE)
        return self.mapper.take(where[0], gen, nbytes)

    def finish(self) -> None:
        if len(self.used) != len(self.buffers):
            unused = sorted(set(range(len(self.buffers))) - self.used)
            shown = ", ".join(map(str, unused[:8])) + (", ..." if len(unused) > 8 else "")
            raise PayloadError(f"{len(unused)} buffer frames ({shown}) are not referenced by "
                               "the body")


class Decoder:
    """Decode a body frame (and its buffer frames) back into a Python value."""

    def decode(self, body: bytes, buffers: list | tuple = (), *,
               mapper: SegmentMapper | None = None, max_bytes: int | None = None) -> Any:
        """The value. Shared-memory handles are taken through ``mapper``; without one they
        raise PayloadError with code ``shm-unreachable``. ``max_bytes`` bounds the bytes
        of all arrays, checked before anything is mapped."""
        call = _Decoding(buffers, mapper, max_bytes)
        if not body:
            call.finish()
            return None
        ext_hook = call.ext_hook
        try:
            value = msgpack.unpackb(body, raw=False, strict_map_key=False,
                                    ext_hook=ext_hook, use_list=True)
        except PayloadError:
            raise
        except Exception as exc:  # garbage raises several msgpack/value error types
            raise PayloadError(f"body is not valid msgpack: {exc}") from None
        call.finish()
        return value


_encoder = Encoder()
_decoder = Decoder()


def dumps(obj: Any, *, pool: SegmentPool | None = None, tag: Any = None,
          max_bytes: int | None = None) -> tuple[bytes, list]:
    """Encode with the shared default encoder (keywords as ``Encoder.encode``)."""
    try:
        body = msgpack.packb(obj, use_bin_type=True, default=_plain_default)
    except Exception:
        pass  # an array, or an error: the full path deals with both
    else:
        if max_bytes is None or len(body) <= max_bytes:
            return body, []
    return _encoder.encode(obj, pool=pool, tag=tag, max_bytes=max_bytes)


def _no_ext(code: int, data: bytes) -> Any:
    raise _NotPlain


def loads(body: bytes, buffers: list | tuple = (), *, mapper: SegmentMapper | None = None,
          max_bytes: int | None = None) -> Any:
    """Decode with the shared default decoder (keywords as ``Decoder.decode``)."""
    if body and not buffers:
        # The common case, a body with no arrays: no per-call state. One that holds an
        # array (an extension) is decoded again on the full path.
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=_no_ext,
                                   use_list=True)
        except _NotPlain:
            pass
        except Exception:
            pass  # garbage: the full path names the error
    return _decoder.decode(body, buffers, mapper=mapper, max_bytes=max_bytes)
