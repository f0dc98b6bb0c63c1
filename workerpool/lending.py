"""When a worker lends its socket to its wire thread, and when it takes it back
(workerpool/wire.py does the moving): plain values and the caller's clock, no I/O.

Lending pays while requests come back to back: the thread sends the last reply and reads
the next request while the handler runs. It costs two thread wake-ups a request when
work comes one request at a time, and it delays every reply while the handler holds the
GIL (the thread's wake-ups come late, ``Wire.late``), so the socket is lent only for the
first and taken back in the other two cases. Back to back means that the next request was
already in the worker (held ahead) as the last handler call ended, not merely that the
loop found it without waiting: a loop kept from running for a moment (by the host, or by
another thread holding the GIL) finds one without waiting even when none is held ahead.
"""

from __future__ import annotations

KEEP_LENT = 0.005
"""Seconds a worker out of work leaves its socket lent: taking it back and lending it again
costs two thread wake-ups each way, so a pause between bursts of work keeps it. Only one
pause: a second wait before any request comes back to back takes it back at once."""
RELEND_AFTER = 1.0
"""Seconds a socket taken back from a handler that held the GIL stays with the main thread
before it is lent again, to look once more: a handler may change."""
SHORT_LEND = 16
"""Requests: a lending that ran out of work before this many started is taken for a handler
holding the GIL too. Its wake-ups may not come late (the main thread lets go of the GIL as
it waits), but the thread it lends to could not read the next request while the handler
ran, so the main thread ran out of work and waited for that thread instead."""


class Lending:
    """The main thread's decisions; it calls ``starting`` as each request starts and
    ``waiting`` each time it waits for work."""

    __slots__ = ("_keep", "_lend_after", "_lent_starts", "_relend_after", "_waits")

    def __init__(self, keep_lent: float = KEEP_LENT, relend_after: float = RELEND_AFTER) -> None:
        self._keep = keep_lent
        self._relend_after = relend_after
        self._waits = 0  # waits for work since a request last started back to back
        self._lent_starts = 0  # requests started since the socket was last lent
        self._lend_after = 0.0  # not lent before this (clock), after the GIL was held

    def starting(self, ahead: bool, lent: bool, late: bool, now: float) -> bool | None:
        """A request starts: True to lend the socket, False to take it back, None to leave
        it as it is. ``ahead``: it was in the worker as the last handler call ended;
        ``late``: the wire thread's wake-ups waited for the GIL."""
        if ahead:
            self._waits = 0
        if lent:
            self._lent_starts += 1
            if late:
                self._lend_after = now + self._relend_after
                return False
            return None
        if ahead and now >= self._lend_after:
            self._lent_starts = 0
            return True
        return None

    def waiting(self, lent: bool, now: float) -> float:
        """Out of work: seconds a lent socket may stay lent while the loop waits; 0 to take
        it back now."""
        self._waits += 1
        if self._waits == 1:
            return self._keep
        if lent and self._lent_starts < SHORT_LEND:
            self._lend_after = now + self._relend_after
        return 0.0
