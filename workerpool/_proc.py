"""Process plumbing shared by every process workerpool starts (their logging set-up is
workerpool/logs.py)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

# The one pid/process-group liveness check. It lives in ipc/shm.py, whose sweep of dead
# segment owners needs it, because ipc sits below workerpool; imported here for the rest.
from ipc.shm import process_alive as process_alive

# A worker's exit statuses that mean something to its supervisor (workerpool/respawn.py).
EXIT_SETUP_FAILED = 78  # EX_CONFIG: setup() failed; the slot is marked failed, not respawned
EXIT_POISONED = 75  # EX_TEMPFAIL: left on purpose after a sticky CUDA error; respawn me


def signal_name(signum: int) -> str:
    """``SIGKILL`` for 9; ``signal N`` for a number with no name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_cause(returncode: int, hung: bool = False) -> str:
    """How a worker process ended, in one word for logs and metrics: the name of the
    signal that killed it (``SIGKILL``, ``SIGSEGV``), ``context-poisoned`` for
    EXIT_POISONED, ``exit`` for any other exit status, or ``hung`` when it was killed
    because it hung (whatever the signal)."""
    if hung:
        return "hung"
    if returncode < 0:
        return signal_name(-returncode)
    return "context-poisoned" if returncode == EXIT_POISONED else "exit"


def exit_status(returncode: int | None) -> dict[str, int | None]:
    """``returncode`` as the two fields logs carry: ``exitcode`` for a process that
    exited, ``signal`` (its number) for one a signal killed; None for the other, and
    for both when it is not known."""
    if returncode is None:
        return {"exitcode": None, "signal": None}
    if returncode < 0:
        return {"exitcode": None, "signal": -returncode}
    return {"exitcode": returncode, "signal": None}


def die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG), so
    nothing outlives a pool whose supervisor was killed with -9."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before prctl took effect


class SignalWakeup:
    """A socket pair that signals write to (``signal.set_wakeup_fd``), so a process's one
    poll loop wakes at once on SIGTERM/SIGINT instead of at its next timeout; another
    thread wakes it with ``wake()``. Register ``fileno()`` in the poller; call ``drain()``
    when it is readable."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        return self._r.fileno()

    def install(self, on_signal) -> None:
        """Run ``on_signal()`` on SIGTERM and SIGINT, waking the poll."""
        signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: on_signal())

    def wake(self) -> None:
        """Make the poll return (from any thread; never blocks: a full buffer already wakes it)."""
        try:
            self._w.send(b"\0")
        except OSError:  # full (BlockingIOError), or closed as the process stops
            pass

    def drain(self) -> None:
        try:
            while self._r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``): after a message
    that made ZeroMQ or the decoder allocate a lot at once, the allocator would otherwise
    keep it. A no-op where there is no glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
