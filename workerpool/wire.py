"""The worker's socket, lent to a thread of its own while the handler runs with work waiting.

::

    idle, or one request at a time:  main thread  <--[DEALER]-->  router
    lent (requests waiting):         main thread --Wire.send (a deque)--> wire thread
                                     wire thread <--[DEALER]-->  router; requests --> backlog

A worker that does its own socket work between handler calls leaves its device idle for
all of it: sending the last reply, then receiving and decoding the request that arrived
while the last one ran. Lent to this thread, the socket does that work while the next
handler call runs; between two calls the main thread only hands the reply over and takes
the next request, already in the backlog (docs/benchmarks.md, "Busy fraction").

Crossing threads costs a wake-up each way, which a worker serving one request at a time
would pay on every request for nothing: so the main thread keeps the socket while it has
nothing waiting, lends it (``lend``) when it starts a request with another waiting, and
takes it back (``reclaim``) when it runs out of work.

Nor is the socket worth lending while the handler holds the GIL (computes in Python):
this thread then sends each reply only when the interpreter next switches threads, a
switch interval (5 ms) late. Whether it does shows in the one place it costs: how long
this thread, woken to send, waited to run. ``late`` says a wake-up waited half a switch
interval or more, its wait for a CPU aside. A handler that waits on a device lets go of
the GIL, and so does one that keeps a CPU busy in C (CUDA's default synchronize spins):
neither makes a wake-up late, where the handler's CPU time could not tell them apart.

ZeroMQ sockets are not thread-safe: exactly one thread uses the socket at a time. The
handover is under one lock, whose release and acquisition are the full memory barrier
ZeroMQ asks for when a socket changes threads; the wire thread sends what it was handed
before it gives the socket back, so messages leave in the order they were handed over.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

import zmq

from ipc import transport

log = logging.getLogger("workerpool.worker")

POLL_MS = 1000  # a lent socket's poll also wakes on the pipe; this only bounds a lost wake-up
LATE = 0.2  # of the switch interval (1 ms): a wake-up this late waited for the GIL


class Sent:
    """A zero-copy message handed to the wire thread: ``wait`` returns once ZeroMQ no longer
    reads its memory, or raises ``zmq.NotDone`` (as ``zmq.MessageTracker.wait`` does)."""

    def __init__(self) -> None:
        self._sent = threading.Event()
        self.trackers: list[zmq.MessageTracker] = []

    def wait(self, timeout: float) -> None:
        if not self._sent.wait(timeout):
            raise zmq.NotDone
        for tracker in self.trackers:
            tracker.wait(timeout)


class Wire(threading.Thread):
    """Owns one DEALER socket while it is lent: sends what ``send`` is given, in order, and
    passes every message received to ``on_message``, called on this thread."""

    def __init__(self, sock: zmq.Socket, on_message: Callable[[list], None]) -> None:
        super().__init__(name="workerpool-wire", daemon=True)
        self._sock = sock
        self._on_message = on_message
        self._out: deque[tuple[list, Sent | None]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._cond = threading.Condition()
        self.lent = False  # the socket is this thread's (set and cleared by the main thread)
        self._active = False  # this thread is using it (set and cleared by this thread)
        self._asleep = False  # in poll with nothing to send: a send must wake it
        self._woken_at = 0.0  # when a send last woke it (perf_counter), until it looks
        self.late = False  # a wake-up since the last lend waited for the GIL
        self._halt = False
        self._arrived = threading.Event()  # set after the thread takes messages in

    # -- the main thread ------------------------------------------------------------------------
    def send(self, frames: list, track: bool = False) -> list:
        """Send one message after every message handed over before it: at once when the
        caller holds the socket, else through this thread. With ``track``, the result is
        what to ``wait(timeout)`` on before the frames' memory may change."""
        if not self.lent and threading.current_thread() is not self:
            return transport.send(self._sock, frames, track=track)
        sent = Sent() if track else None
        self._out.append((frames, sent))
        # The thread sets _asleep, then looks at the deque once more before it polls, so an
        # append it missed always finds the flag set. The GIL orders these steps.
        if self._asleep:
            self._asleep = False
            self._woken_at = time.perf_counter()
            os.write(self._wake_w, b"x")
        return [sent] if sent is not None else []

    def await_message(self, timeout: float, ready: Callable[[], bool]) -> bool:
        """Wait up to ``timeout`` for the thread to take a message in; True at once when
        ``ready()`` says one already was."""
        self._arrived.clear()
        return ready() or self._arrived.wait(timeout)

    def lend(self) -> None:
        """Give the socket to this thread: the caller must not touch it until ``reclaim``."""
        if not self.is_alive():  # its failure was logged; the worker exits, and is replaced
            raise RuntimeError("the worker's socket thread has stopped")
        with self._cond:
            self.late = False
            self.lent = True
            self._cond.notify()

    def reclaim(self) -> None:
        """Take the socket back, once everything handed over has been sent."""
        if not self.lent:
            return
        with self._cond:
            self.lent = False
            os.write(self._wake_w, b"x")
            while self._active and self.is_alive():
                self._cond.wait(0.5)
        self._flush()  # handed over before the thread took the socket, if it never did

    def stop(self) -> None:
        """End the thread; the socket is the caller's, with everything handed over sent."""
        self.reclaim()
        with self._cond:
            self._halt = True
            self._cond.notify()
        if self.is_alive():
            self.join(5)
        if not self.is_alive() and self._wake_w >= 0:  # closed once, when nothing polls them
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    # -- this thread -------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        cond = self._cond
        try:
            while True:
                with cond:
                    while not self.lent and not self._halt:
                        cond.wait()
                    if self._halt:
                        return
                    # Taken under the lock: a reclaim() either came first (and this thread
                    # waits on) or waits for this one to give the socket back.
                    self._active = True
                try:
                    self._serve(poller)
                finally:
                    self._flush()  # before the main thread sends anything itself
                    with cond:
                        self._active = False
                        cond.notify_all()
        except Exception:
            log.exception("the worker's socket thread failed")
            raise

    def _serve(self, poller: zmq.Poller) -> None:
        """Move bytes until the socket is taken back."""
        long_wait = LATE * sys.getswitchinterval()
        with RunQueue() as queue:
            while self.lent:
                self._flush()
                self._read()
                self._asleep = True
                if self._out or not self.lent:
                    self._asleep = False
                    continue
                queued = queue.waited()
                events = dict(poller.poll(POLL_MS))
                self._asleep = False
                woken_at, self._woken_at = self._woken_at, 0.0
                if woken_at and (time.perf_counter() - woken_at
                                 - (queue.waited() - queued)) >= long_wait:
                    self.late = True
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass

    def _flush(self) -> None:
        out = self._out
        sock = self._sock
        while out:
            frames, sent = out.popleft()
            trackers = transport.send(sock, frames, track=sent is not None)
            if sent is not None:
                sent.trackers = trackers
                sent._sent.set()

    def _read(self) -> None:
        if transport.drain(self._sock, self._on_message):
            self._arrived.set()


class RunQueue:
    """This thread's time spent waiting for a CPU, from Linux's ``schedstat``, read without
    letting go of the GIL (ctypes.PyDLL): a read taken after a wait for the GIL does not
    wait for it again. Zero where Linux does not keep the figure."""

    _libc = ctypes.PyDLL(None) if sys.platform.startswith("linux") else None

    def __enter__(self) -> RunQueue:
        self._buf = ctypes.create_string_buffer(128)
        try:
            self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = -1
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)

    def waited(self) -> float:
        """Seconds this thread has been ready to run and not running, since it started."""
        if self._fd < 0 or self._libc is None:
            return 0.0
        n = self._libc.pread(self._fd, self._buf, 127, ctypes.c_long(0))
        fields = self._buf.raw[:max(n, 0)].split()
        return int(fields[1]) / 1e9 if len(fields) >= 2 else 0.0
