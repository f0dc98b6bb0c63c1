"""``/health/ready`` from the router's STATUS, and the cache that spares the router a
STATUS per probe.

::

    GET /health/ready -> StatusCache.get(fetch, now)
                           fresh (< max_age): the last status or error, no round trip
                           else: one fetch, shared by every probe that arrives meanwhile
                      -> readiness(status) -> (ready, body)   (plain values)

A service is ready while at least one worker serves it (STATUS ``workers``, spares and
draining ones not counted); the gateway is ready while every service the router knows is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

DEFAULT_MAX_AGE = 1.0
"""Seconds a STATUS (or the error fetching it) answers readiness probes before another
is asked for."""


def service_load(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each service's load, as the readiness body lists it: live workers, in flight,
    queued."""
    return {s["name"]: {"workers": s["workers"], "in_flight": s["in_flight"],
                        "queued": s["queued"]} for s in status.get("services", ())}


def readiness(status: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Whether the pool is ready (it has services, and each has a serving worker), and the
    body that says so service by service."""
    services = service_load(status)
    ready = bool(services) and all(s["workers"] > 0 for s in services.values())
    return ready, {"ready": ready, "services": services}


def model_ready(status: dict[str, Any], name: str) -> bool | None:
    """Whether service ``name`` serves now; None when the router does not know it."""
    for s in status.get("services", ()):
        if s["name"] == name:
            return s["workers"] > 0
    return None


def methods_of(status: dict[str, Any], name: str) -> list[str] | None:
    """The methods service ``name``'s workers announced; None for an unknown service."""
    for s in status.get("services", ()):
        if s["name"] == name:
            return list(s.get("methods", ()))
    return None


class StatusCache:
    """The router's latest STATUS, or the error asking for it, for ``max_age`` seconds;
    concurrent callers share one request. ``now`` comes from the caller (the loop's
    clock), so the rule is tested without waiting."""

    def __init__(self, max_age: float = DEFAULT_MAX_AGE) -> None:
        self.max_age = max_age
        self._at = float("-inf")
        self._value: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._pending: asyncio.Future | None = None

    async def get(self, fetch: Callable[[], Awaitable[dict[str, Any]]], now: float) -> dict[str, Any]:
        """The status; raises what fetching it raised. ``fetch`` runs only when the last
        answer is older than ``max_age`` and none is on its way."""
        if now - self._at < self.max_age:
            if self._error is not None:
                raise self._error
            return self._value
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._refresh(fetch, now))
        return await asyncio.shield(self._pending)

    async def _refresh(self, fetch: Callable[[], Awaitable[dict[str, Any]]],
                       now: float) -> dict[str, Any]:
        try:
            value = await fetch()
        except Exception as exc:
            self._value, self._error = None, exc
            raise
        else:
            self._value, self._error = value, None
            return value
        finally:
            self._at = now
            self._pending = None
