"""The one C helper, and how it is found: dropping the frames of a refused message.

``ipc/_framedrop.c`` is built when the package is installed (an optional extension: an
install without a compiler still works, only slower at this one thing). It calls libzmq
through function addresses taken here from the libzmq that pyzmq loaded, found through
pyzmq's compiled backend: a second copy of libzmq would not know pyzmq's sockets.

``frame_dropper()`` is None when any of that is missing (no build, pyzmq's CFFI backend,
a libzmq whose symbols are hidden); the callers then receive the frames from Python.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import zmq

FUNCTIONS = ("zmq_msg_init", "zmq_msg_recv", "zmq_msg_more", "zmq_msg_close", "zmq_errno")

Dropper = Callable[[zmq.Socket, int], tuple[int, int]]


@functools.cache
def frame_dropper() -> Dropper | None:
    """``drop(sock, flags) -> (frames, errno)``: receive and let go of frames up to the end
    of the message being read (errno 0 when it ended); None when the C helper is not here."""
    try:
        from zmq.backend.cython import _zmq

        from ipc import _framedrop
    except ImportError:
        return None
    try:
        lib = ctypes.CDLL(_zmq.__file__)  # symbols resolve through it to its own libzmq
        version = (ctypes.c_int(), ctypes.c_int(), ctypes.c_int())
        lib.zmq_version(*(ctypes.byref(v) for v in version))
        if tuple(v.value for v in version) != zmq.zmq_version_info():
            return None
        _framedrop.bind(*(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                          for name in FUNCTIONS))
    except (OSError, AttributeError):
        return None
    drop = _framedrop.drop
    return lambda sock, flags: drop(sock.underlying, flags)
