"""Which worker incarnations the supervisors vouched for, and READYs waiting for a vouch.

A READY names its slot and incarnation itself, so on its own it proves nothing: a peer
claiming ``default/0`` incarnation 2**62 would take the slot over and make every real
respawn look stale. Only the slot's supervisor, which started the process, may say which
incarnation (and pid) runs there: with SLOT ``started`` as it spawns one, or in a HELLO
for the processes it already runs (a restarted router learns them that way). A READY is
accepted when it matches what the owner said. One that comes first (the two sockets race)
waits here until the vouch arrives, for ``TIMINGS.vouch_wait`` at most; then it is
forgotten, and a real worker is asked to register again by its next heartbeat. A worker
whose ``setup()`` failed never registers: its GOODBYE, which carries the traceback, waits
here the same way.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from ipc.protocol import Kind

if TYPE_CHECKING:
    from router.health import Slot

MAX_WAITING = 256  # READYs held for their vouch: each names a slot, so a few per slot at most


class Verdict(Enum):
    ACCEPT = "accept"  # the owner vouched for exactly this incarnation (and pid)
    STALE = "stale"  # older than the slot's current incarnation: told to stop
    WAIT = "wait"  # not vouched for (yet)


def verdict(slot: Slot | None, incarnation: int, pid: int) -> Verdict:
    """What to do with a READY for ``slot`` (None: no supervisor described it yet)."""
    if slot is None or slot.owner is None:
        return Verdict.WAIT
    if incarnation < slot.incarnation:
        return Verdict.STALE
    if incarnation == slot.incarnation and slot.pid in (None, pid):
        return Verdict.ACCEPT
    return Verdict.WAIT


class Waiting:
    """READYs (and setup-failed GOODBYEs) waiting for their supervisor's vouch, bounded in
    number and time."""

    def __init__(self) -> None:
        # ident -> (expires at, kind, meta)
        self._by_ident: dict[bytes, tuple[float, Kind, dict]] = {}

    def __len__(self) -> int:
        return len(self._by_ident)

    def park(self, ident: bytes, kind: Kind, meta: dict, until: float) -> bool:
        """Hold ``ident``'s message; False when full (it is dropped)."""
        if ident not in self._by_ident and len(self._by_ident) >= MAX_WAITING:
            return False
        self._by_ident[ident] = (until, kind, meta)
        return True

    def take(self, slot_id: str) -> list[tuple[bytes, Kind, dict]]:
        """The messages waiting for ``slot_id``: a vouch for it came."""
        out = [(ident, kind, meta) for ident, (_, kind, meta) in self._by_ident.items()
               if meta.get("slot") == slot_id]
        for ident, _, _ in out:
            del self._by_ident[ident]
        return out

    def expire(self, now: float) -> list[tuple[bytes, Kind, dict]]:
        """The messages whose vouch never came, forgotten."""
        out = [(ident, kind, meta) for ident, (until, kind, meta) in self._by_ident.items()
               if until <= now]
        for ident, _, _ in out:
            del self._by_ident[ident]
        return out
