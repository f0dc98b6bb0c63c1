"""How a worker answers: it builds reply frames and puts them on its DEALER socket.

::

    handler value --codec.dumps (arrays: shm segment or zero-copy frames)--> RESULT/PARTIAL
    WorkerPoolError --to_wire--> ERROR body              each with meta {"worker": slot}

Used by the worker's loop (workerpool/worker.py) and its batch runner
(workerpool/batching.py). Zero-copy frames are read by ZeroMQ after ``send`` returns, so
``wait_unsent`` is called before a handler runs again: it may refill the array it
returned last time.

A final reply of one frame (RESULT, ERROR, END) is *held* until ``flush``, which sends
everything held as few messages as ``protocol.pack`` makes (BUNDLEs, docs/protocol.md
2.6). The worker decides when to flush (workerpool/holding.py); any other message (a
PARTIAL, a reply of several frames, READY, GOODBYE, a pong, STARTED) goes out at once,
after what is held, so the order of messages to the router never changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import msgpack
import zmq

from ipc import codec, protocol, shm, transport
from ipc.protocol import Kind
from workerpool.config import TIMINGS
from workerpool.errors import WorkerPoolError
from workerpool.logs import slot_logger


class UnencodableResult(Exception):
    """The handler returned a value that cannot be sent (the caller gets a PayloadError)."""


class Replies:
    """Sends one worker's replies; every reply's meta names the worker's slot."""

    def __init__(self, sock: zmq.Socket, slot: str, max_message_bytes: int,
                 pool: shm.SegmentPool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slot = slot
        self._limit = max_message_bytes
        self._pool = pool  # lends shared memory to replies for clients on this host
        # Every reply carries the worker's slot so errors and results name who produced them.
        self._meta = protocol.pack_meta({"worker": slot})
        self._put: Callable[..., list] = partial(transport.send, sock)  # (frames, track=)
        self._unsent: list = []  # zero-copy frames ZeroMQ still reads: each has wait(timeout)
        self._log = slot_logger(logging.getLogger("workerpool.worker"), slot)
        self._clock = clock
        self.held: list[bytes] = []  # one-frame final replies not sent yet, oldest first
        self.held_bytes = 0
        self.held_since = 0.0  # when the oldest of them was held (clock)

    def send_through(self, put: Callable[..., list]) -> None:
        """Hand every message from now on to ``put(frames, track=...)`` instead of the
        socket (the worker's socket thread, workerpool/wire.py); it returns what
        ``wait_unsent`` waits on for the zero-copy frames."""
        self._put = put

    def send(self, kind: Kind, req_id: int, meta: dict | bytes | None = None,
             body: bytes = b"", buffers: list | tuple = ()) -> None:
        """A message that is not a final reply (READY, GOODBYE, a pong, STARTED): sent now,
        after what is held."""
        self._send_now(protocol.encode(kind, req_id, meta, body, buffers))

    def flush(self) -> None:
        """Send every held reply now, in order, as few messages as the bundle bounds allow."""
        if not self.held:
            return
        held = self.held
        self.held = []
        self.held_bytes = 0
        put = self._put
        for message in protocol.pack(held):
            put([message])

    def _final(self, frames: list) -> None:
        """A final reply: held when it is one frame, else sent now."""
        if len(frames) != 1:
            self._send_now(frames)
            return
        if not self.held:
            self.held_since = self._clock()
        self.held.append(frames[0])
        self.held_bytes += len(frames[0])

    def _send_now(self, frames: list, track: bool = False) -> list:
        if self.held:
            if len(frames) == 1:  # it travels in the same bundle, after them
                self.held.append(frames[0])
                self.flush()
                return []
            self.flush()
        return self._put(frames, track=track)

    def value(self, kind: Kind, req_id: int, value: Any, shm_ok: bool = False) -> None:
        """RESULT or PARTIAL carrying ``value``; raises UnencodableResult (nothing sent)."""
        try:
            body, buffers = codec.dumps(value, pool=self._pool if shm_ok else None,
                                        max_bytes=self._limit)
        except codec.PayloadError as exc:
            if exc.code == codec.TOO_LARGE:
                raise UnencodableResult(f"handler returned {exc}") from None
            raise UnencodableResult(
                f"handler returned a value that cannot be sent: {exc}") from None
        size = len(body) + sum(len(b) for b in buffers)
        if size > self._limit:
            raise UnencodableResult(f"handler returned {size} bytes, over max_message_bytes="
                                    f"{self._limit}")
        frames = protocol.encode(kind, req_id, self._meta, body, buffers)
        if kind is Kind.RESULT and len(frames) == 1:
            self._final(frames)
        else:  # a PARTIAL goes now; buffers are tracked (zero-copy)
            self._unsent += self._send_now(frames, track=bool(buffers))

    def end(self, req_id: int) -> None:
        """END: the stream ``req_id`` has no more items."""
        self._final(protocol.encode(Kind.END, req_id, self._meta))

    def error(self, req_id: int, err: WorkerPoolError) -> None:
        self._final(self.error_frames(req_id, err))

    def error_frames(self, req_id: int, err: WorkerPoolError) -> list:
        """The ERROR reply answering ``req_id`` with ``err``, built but not sent: it reads
        nothing that changes, so any thread may call it."""
        err.worker = self.slot
        return protocol.encode(Kind.ERROR, req_id, self._meta,
                               msgpack.packb(err.to_wire(), use_bin_type=True, default=str))

    def wait_unsent(self) -> None:
        """Block until ZeroMQ has finished reading the zero-copy frames sent so far, so a
        handler that refills the array it returned last time cannot change a reply that is
        still on its way. What is held is sent first: it must not wait while this does."""
        if not self._unsent:
            return
        self.flush()
        for tracker in self._unsent:
            try:
                tracker.wait(TIMINGS.unsent_wait)
            except zmq.NotDone:
                # No router to read it (it restarted): ZeroMQ sends it on reconnection, to
                # a router that drops it as unknown. Don't hold the next request for that.
                self._log.warning("a reply was not sent within %gs; going on",
                                  TIMINGS.unsent_wait)
                break
        self._unsent.clear()
