"""Which router connection serves an HTTP caller, and how many requests each caller holds.

::

    request --caller_key(token, peer address, X-Forwarded-For, trust)--> key
    key --Callers.acquire--> connection index 0..K-1 (None: the caller is at its cap)
    reply written (or the caller gone) --Callers.release(key)

The router is fair between client connections: its queue takes connections in turn
within a priority, and ``max_client_inflight`` and the not-reading cut-off apply to one
connection (protocol.md 4.8). The gateway therefore holds K connections and gives each
caller one of them, so those rules apply between callers rather than to all of them at
once.

A caller with requests in flight keeps its connection: its requests stay in order, and
its limit is that connection's. A caller with none in flight gets the connection with
the fewest callers now (then the fewest requests, then the lowest index), so up to K
busy callers each have a connection of their own, and more share them evenly. A stable
hash would do no better for order, and would put two of three callers on one connection
about a third of the time with K = 8. A caller is forgotten when its last request ends:
the table holds only callers with requests in flight.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from workerpool.config import GATEWAY_MAX_CONNECTIONS as MAX_CONNECTIONS
from workerpool.config import GATEWAY_MIN_CONNECTIONS as MIN_CONNECTIONS

CALLER_RETRY_AFTER = 1.0
"""Seconds a caller over ``max_inflight_per_caller`` is told to wait (``Retry-After``)."""


def caller_key(token: str | None, peer: str | None, forwarded: str | None,
               trust_forwarded: bool) -> str:
    """Who a request is from: its bearer token (as a digest, so no secret is kept) when
    tokens are on, else its client address: the last ``X-Forwarded-For`` entry, the one
    the trusted proxy added, when ``trust_forwarded``, else the peer's address (its port
    left out: each of a caller's HTTP connections has another)."""
    if token is not None:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    if trust_forwarded and forwarded:
        last = forwarded.rsplit(",", 1)[-1].strip()
        if last:
            return "addr:" + last
    return "addr:" + (peer or "unknown")


@dataclass
class _Held:
    connection: int
    requests: int


class Callers:
    """The callers with requests in flight, each on its connection.

    Parameters
    ----------
    connections:
        K, the router connections to spread callers over.
    max_inflight:
        Requests one caller may hold at once; 0: no cap of the gateway's own.
    """

    def __init__(self, connections: int, max_inflight: int = 0) -> None:
        if not MIN_CONNECTIONS <= connections <= MAX_CONNECTIONS:
            raise ValueError(f"router connections must be {MIN_CONNECTIONS}.."
                             f"{MAX_CONNECTIONS}, not {connections}")
        if max_inflight < 0:
            raise ValueError(f"max in-flight per caller must be >= 0, not {max_inflight}")
        self.max_inflight = max_inflight
        self.in_flight = [0] * connections  # requests on each connection now
        self.callers = [0] * connections  # callers on each connection now
        self._held: dict[str, _Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def acquire(self, key: str) -> int | None:
        """The connection for one more request of ``key``, or None when ``key`` already
        holds ``max_inflight`` requests. Each index returned needs one ``release``."""
        held = self._held.get(key)
        if held is None:
            k = len(self.in_flight)
            conn = min(zip(self.callers, self.in_flight, range(k), strict=True))[2]
            held = self._held[key] = _Held(conn, 0)
            self.callers[conn] += 1
        elif self.max_inflight and held.requests >= self.max_inflight:
            return None
        held.requests += 1
        self.in_flight[held.connection] += 1
        return held.connection

    def release(self, key: str) -> None:
        """One request of ``key`` has ended; raises KeyError for a caller holding none."""
        held = self._held[key]
        held.requests -= 1
        self.in_flight[held.connection] -= 1
        if not held.requests:
            del self._held[key]
            self.callers[held.connection] -= 1

    def connection_of(self, key: str) -> int | None:
        """The connection ``key`` holds now, or None when it has nothing in flight."""
        held = self._held.get(key)
        return None if held is None else held.connection
