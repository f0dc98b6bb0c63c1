"""Limits on one client connection, and what becomes of one that is gone or not reading.

::

    admission ---refusal(client)---> ClientLimits ---> BackpressureError or None
    core.to_client ---GONE / FULL---> ClientLimits.undelivered ---> requests.drop_client
    requests.overrun ---an ended stream's ERROR---> ClientLimits.owe
    tick(now) ---> ClientLimits.expire, ClientLimits.pay_owed

A client connection may hold ``max_client_inflight`` requests (queued or running); one
more is refused with ``BackpressureError`` code ``client-limit``, so one connection
cannot take a service's whole queue and the others are not refused for its sake.

A reply the frontend cannot send tells why (``Delivery``, decided from the errno by the
socket owner):

- ``GONE``: the connection closed. What it still waits for is dropped at once, queued
  requests from their queue, running ones cancelled on their workers, so a client that
  flooded the queue and left blocks no one.
- ``FULL``: ``max_unread_replies`` replies wait in its send queue: it does not read.
  The same drop, and for ``slow_client_cutoff`` seconds every request from it is
  refused (code ``not-reading``), so it cannot keep workers busy producing replies it
  never takes. The replies already queued to it stay there until it reads or leaves;
  the router holds at most ``max_unread_replies`` of them for it.

A stream's item that meets a full queue ends only that stream (``requests.overrun``): its
reader reads, only slower than its worker produces. The final ERROR of such a stream is
owed to the client and sent once its queue has room (``pay_owed``, each tick); at most one
per request it had in flight, so at most ``max_client_inflight`` per connection.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from typing import TYPE_CHECKING

from ipc.errors import BackpressureError
from ipc.protocol import Kind, encode

if TYPE_CHECKING:
    from router.core import RouterCore
    from router.service import Service

log = logging.getLogger("workerpool.router")


class Delivery(enum.Enum):
    """What became of one message sent to a peer; only SENT is true."""

    SENT = "sent"
    GONE = "gone"  # no such peer: it disconnected (EHOSTUNREACH)
    FULL = "full"  # its send queue is at its limit: it does not read (EAGAIN)

    def __bool__(self) -> bool:
        return self is Delivery.SENT


class ClientLimits:
    def __init__(self, core: RouterCore) -> None:
        self.core = core
        self.cut_off_until: dict[bytes, float] = {}  # client -> when it may send again
        # (until, client) in cut-off order; with one cut-off length that is time order.
        self._expiry: deque[tuple[float, bytes]] = deque()
        # client -> final replies (client's request id, ERROR body) still to be sent to it
        self.owed: dict[bytes, deque[tuple[int, bytes]]] = {}

    def refusal(self, client: bytes, svc: Service) -> BackpressureError | None:
        """The error refusing a new request from ``client`` for ``svc``, or None."""
        core = self.core
        if self.cut_off_until:
            until = self.cut_off_until.get(client)
            if until is not None:
                left = until - core.clock()
                if left > 0:
                    core.stats["refused_not_reading"] += 1
                    return BackpressureError(
                        "this connection was cut off for not reading its replies "
                        f"(max_unread_replies={core.config.max_unread_replies}); it may send "
                        f"again in {left:.3f}s", code="not-reading", retry_after=round(left, 3))
        limit = core.config.max_client_inflight
        if core.requests.held_by(client) >= limit:
            core.stats["refused_client_limit"] += 1
            return BackpressureError(
                f"this connection already holds {limit} requests (max_client_inflight); "
                "send the next when one of them is answered", code="client-limit",
                retry_after=svc.retry_after(core.clock(), ahead=1))
        return None

    def undelivered(self, client: bytes, result: object) -> None:
        """A send to ``client`` failed: ``result`` is FULL (not reading) or anything else
        false (gone)."""
        if result is Delivery.FULL:
            self.cut_off(client)
        else:
            self.gone(client)

    def gone(self, client: bytes) -> None:
        """``client`` disconnected: nothing it waits for can reach it any more."""
        self.owed.pop(client, None)
        queued, running = self.core.requests.drop_client(client)
        if queued or running:
            stats = self.core.stats
            stats["clients_gone"] += 1
            stats["dropped_queued"] += queued
            stats["dropped_running"] += running

    def cut_off(self, client: bytes) -> None:
        """``client`` does not read its replies: drop what it waits for, refuse it a while."""
        core = self.core
        if client not in self.cut_off_until:
            until = core.clock() + core.config.slow_client_cutoff
            self.cut_off_until[client] = until
            self._expiry.append((until, client))
            core.stats["clients_cut_off"] += 1
            core.warn("cut-off", "client %r cut off for %gs: %d replies wait unread for it",
                      client, core.config.slow_client_cutoff, core.config.max_unread_replies)
        queued, running = core.requests.drop_client(client)
        if queued or running:
            core.stats["dropped_queued"] += queued
            core.stats["dropped_running"] += running
            core.release_memory = True  # the dropped requests' payloads were freed

    def owe(self, client: bytes, client_rid: int, error: bytes) -> None:
        """``client`` is owed the final ERROR ``error`` of its request ``client_rid``: sent
        now if its queue takes it, else by ``pay_owed`` in order."""
        owed = self.owed.get(client)
        if owed is None:
            owed = self.owed[client] = deque()
        owed.append((client_rid, error))
        self.pay_owed()

    def pay_owed(self) -> None:
        """Send what is owed, oldest first, to each client whose queue has room; a client
        that left is owed nothing more."""
        outgoing = self.core.outgoing
        for client in list(self.owed):
            owed = self.owed.get(client)
            while owed:
                rid, body = owed[0]
                # At once, to see FULL; after what waits for the client, which may find it
                # gone (then it is owed nothing more).
                result = outgoing.to_client(client, encode(Kind.ERROR, rid, b"", body), now=True)
                if result is Delivery.FULL:
                    break  # still full: next tick
                owed.popleft()
                if not result:  # gone: nothing can reach it
                    owed.clear()
            if not owed:
                self.owed.pop(client, None)

    def due(self, now: float) -> bool:
        """Whether ``pay_owed`` or ``expire`` has work: an error owed, a cut-off over."""
        return bool(self.owed) or bool(self._expiry and self._expiry[0][0] <= now)

    def expire(self, now: float) -> None:
        """Cut-offs that are over: those clients may send again."""
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            until, client = expiry.popleft()
            if self.cut_off_until.get(client) == until:
                del self.cut_off_until[client]
                # Its unread replies have likely been freed since (it read or left).
                self.core.release_memory = True
