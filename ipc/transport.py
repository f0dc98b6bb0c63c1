"""Moving frames on ZeroMQ sockets: the one send/receive path every process uses.

The socket knows nothing of codecs: it takes and returns lists of frames. These helpers
call pyzmq's compiled ``send``/``recv`` directly with integer flags. pyzmq's Python-level
``send_multipart`` re-checks every part and combines ``enum.Flag`` values per frame,
which costs about 2.5 µs per message (measured: 3.4 µs vs 0.8 µs for three small
frames) — on the router's hot path that is most of a request's budget.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import zmq
from zmq.backend import Socket as _CSocket

from ipc.native import frame_dropper

_send = _CSocket.send
_recv = _CSocket.recv
_get = _CSocket.get
SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_drop = frame_dropper()
COPY_THRESHOLD = 65536  # below this, copying a frame is cheaper than zero-copy bookkeeping

Again = zmq.Again
ZMQError = zmq.ZMQError


def send(sock: zmq.Socket, frames: list, flags: int = 0, track: bool = False) -> list:
    """Send ``frames`` (bytes or buffers) as one message. Large frames go zero-copy.

    ZeroMQ reads a zero-copy frame's memory after this returns. With ``track``, the result
    lists a ``zmq.MessageTracker`` per such frame; its ``done`` says the memory may change.
    """
    last = len(frames) - 1
    more = flags | SNDMORE
    trackers = []
    for i, f in enumerate(frames):
        copy = len(f) < COPY_THRESHOLD
        t = _send(sock, f, more if i < last else flags, copy, track and not copy)
        if track and not copy and t is not None:
            trackers.append(t)
    return trackers


class Truncated(list):
    """The first ``max_parts`` parts of a message that had more; ``dropped`` counts the rest,
    which were received and let go without being kept."""

    dropped = 0


def recv(sock: zmq.Socket, flags: int = 0, buffers_from: int = 1,
         max_parts: int | None = None) -> list:
    """Receive one whole message as a list of frames. Raises ``zmq.Again`` under NOBLOCK
    when nothing is waiting.

    Parts before index ``buffers_from`` (the head; 2 on a ROUTER socket, where the routing
    id comes first) are ``bytes``. The frames after them (a large body, buffers) are
    ``zmq.Frame``: not copied out of ZeroMQ, writable, and sent on again without a copy.
    A message of more than ``max_parts`` parts comes back as ``Truncated``: a peer's frame
    count costs nothing kept.
    """
    # Received as frames, whose ``more`` is a cheap check; asking the socket for RCVMORE
    # converts the option to an enum on every call (measured: 1.1 µs less per 4-part
    # message this way). Small parts are copied out to ``bytes`` once.
    frame = _recv(sock, flags, False, False)
    return _rest(sock, flags, frame, buffers_from, max_parts)


def recv_from(sock: zmq.Socket, flags: int = 0, buffers_from: int = 1,
              max_parts: int | None = None) -> tuple[list, bytes | None]:
    """``recv``, and the authenticated identity the message came with: the ``User-Id``
    the ZAP handler gave its connection (a CURVE peer's z85 public key), None on a socket
    without authentication. Only the first part is asked: every part of one message
    comes from the same connection."""
    frame = _recv(sock, flags, False, False)
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        user = None
    if isinstance(user, str):
        user = user.encode()
    return _rest(sock, flags, frame, buffers_from, max_parts), user or None


def _rest(sock: zmq.Socket, flags: int, frame: zmq.Frame, buffers_from: int,
          max_parts: int | None) -> list:
    parts = [frame.bytes]
    limit = max_parts if max_parts is not None else -1
    while frame.more:
        frame = _recv(sock, flags, False, False)
        if len(parts) == limit:
            return _drop_rest(sock, flags, parts, frame)
        parts.append(frame.bytes if len(parts) < buffers_from else frame)
    return parts


def _drop_rest(sock: zmq.Socket, flags: int, parts: list, frame: zmq.Frame) -> Truncated:
    out = Truncated(parts)
    out.dropped = 1
    if frame.more and _drop is not None:
        # In C: a peer picks the frame count, and from Python each costs 1-2 µs.
        dropped, error = _drop(sock, flags)
        out.dropped += dropped
        if not error:
            return out
    while frame.more:  # no C helper, or it stopped: pyzmq raises what it met
        frame = _recv(sock, flags, False, False)
        out.dropped += 1
    return out


def drain(sock: zmq.Socket, handle: Callable[[list], object]) -> bool:
    """Receive every message waiting, without blocking, and pass each to ``handle`` as
    ``recv`` returns it; True if there was any."""
    took = False
    while readable(sock):  # asked first: see readable()
        try:
            frames = recv(sock, NOBLOCK)
        except zmq.Again:
            break
        handle(frames)
        took = True
    return took


def readable(sock: zmq.Socket) -> bool:
    """Whether a message is waiting. A NOBLOCK ``recv`` on an empty socket costs about 3 µs
    (pyzmq builds a ``zmq.Again``); this costs under 1 µs, so a loop that usually finds
    nothing asks first."""
    return bool(_get(sock, _EVENTS) & _POLLIN)


def writable(sock: zmq.Socket) -> bool:
    """Whether a NOBLOCK send would be taken now."""
    return bool(_get(sock, _EVENTS) & _POLLOUT)


TRANSPORTS = ("tcp", "ipc", "inproc")


def check_endpoint(endpoint: str) -> None:
    """Raise ValueError, saying what an address looks like, unless ``endpoint`` names one of
    TRANSPORTS (ZeroMQ's own error for ``foo`` is a bare "Invalid argument")."""
    scheme, sep, rest = endpoint.partition("://") if isinstance(endpoint, str) else ("", "", "")
    if not sep or not rest or scheme not in TRANSPORTS or (
            scheme == "tcp" and not rest.rpartition(":")[2].isdigit() and rest[-1:] != "*"):
        raise ValueError(f"{endpoint!r} is not an address: use tcp://HOST:PORT, ipc://PATH "
                         "or inproc://NAME")


def is_loopback(endpoint: str) -> bool:
    """An endpoint only this host can reach: ipc://, inproc://, tcp on a loopback address
    or ``localhost``. ``*``, 0.0.0.0, a host name or IP, or an interface name are not."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
