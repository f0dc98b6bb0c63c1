"""``workerpool status --watch``: what the live view shows, decided without I/O.

    every --interval:  Client.status(short timeout)
                         |                      |
                    a reply                 no reply (timeout, refusal)
                         v                      v
                 Watch.polled(reply, at)   Watch.failed(why, at)
                         \\                    /
                          Watch.frame() -> Frame (plain strings)
                                  |
                       workerpool/watch_term.py draws it with rich

The times come from the caller (``at``: wall-clock seconds, shown as HH:MM:SS), so the
whole of it is tested with plain values. A service's rates come from two replies of the
same router process: the growth of its ``completed`` and ``errored`` counters over the
growth of the router's ``uptime`` between them, which is exactly the span the counters
cover (neither the network's delay nor a late poll enters it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from workerpool.cells import cell, error_line, ms, node_cells, percent, router_line

WORKER_FIELDS = ("id", "state", "host", "device", "in_flight", "completed", "errored",
                 "restarts", "uptime", "memory", "utilization", "batch")
"""The worker fields of the view, in column order (protocol.md 6.3); LAST ERROR follows."""

WORKER_HEADERS = ("ID", "STATE", "HOST", "DEVICE", "IN_FLIGHT", "COMPLETED", "ERRORED",
                  "RESTARTS", "UPTIME", "MEMORY", "UTIL", "BATCH", "LAST ERROR")

SERVICE_HEADERS = ("SERVICE", "WORKERS", "QUEUED", "IN_FLIGHT", "REQ/S", "ERR/S",
                   "SERVICE TIME p50/p99 ms", "QUEUE WAIT p50/p99 ms", "UTIL")

LAST_ERROR_WIDTH = 48
"""Characters of a worker's last error line shown; ``status --json`` has it in full."""

MIN_POLL_TIMEOUT = 1.0
"""Seconds a poll waits at least, however short the interval: a router on a busy host
may take a moment, and a slow reply must not read as an unreachable router."""


@dataclass(frozen=True)
class Rates:
    """A service's final replies from workers per second (``completed`` and ``errored``
    together), and the errors among them per second."""

    requests: float
    errors: float


@dataclass(frozen=True)
class Frame:
    """One screen of the view. ``title`` is the router line, or ``router unreachable
    (since HH:MM:SS, retrying)``; ``detail`` says when it was updated, or why the last
    poll failed. The tables are empty while the router is unreachable."""

    title: str
    detail: str
    unreachable: bool
    workers: tuple[tuple[str, ...], ...] = ()
    services: tuple[tuple[str, ...], ...] = ()
    nodes: tuple[tuple[str, ...], ...] = ()  # cells.NODE_HEADERS; none from an older router


def same_router(before: dict, after: dict) -> bool:
    """Whether two ``router`` maps (6.1) come from one router process, whose counters
    have only grown between them: a restarted router starts them again from zero."""
    return (before["pid"] == after["pid"] and before["frontend"] == after["frontend"]
            and after["uptime"] >= before["uptime"])


def service_rates(prev: dict | None, cur: dict) -> dict[str, Rates]:
    """Each service's rates between the STATUS replies ``prev`` and ``cur``, by name.

    A service is left out (its rates show ``-``) when there is no earlier reply from the
    same router process (the first poll, a router restart), when it is new in ``cur``,
    when a counter went down, or when no time passed between the two replies."""
    if prev is None or not same_router(prev["router"], cur["router"]):
        return {}
    span = cur["router"]["uptime"] - prev["router"]["uptime"]
    if span <= 0:
        return {}
    before = {s["name"]: s for s in prev["services"]}
    rates: dict[str, Rates] = {}
    for svc in cur["services"]:
        old = before.get(svc["name"])
        if old is None:
            continue
        completed = svc["completed"] - old["completed"]
        errored = svc["errored"] - old["errored"]
        if completed >= 0 and errored >= 0:
            rates[svc["name"]] = Rates((completed + errored) / span, errored / span)
    return rates


def rate(value: float | None) -> str:
    """Per second: one decimal below 100, whole numbers with separators above."""
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def worker_row(w: dict) -> tuple[str, ...]:
    """The cells of one worker (6.3), as ``workerpool status`` prints them, and the last
    line of its ``last_error`` cut to LAST_ERROR_WIDTH."""
    return (*(cell(w.get(f), f, w) for f in WORKER_FIELDS),
            error_line(w.get("last_error"), LAST_ERROR_WIDTH))


def service_row(s: dict, rates: Rates | None) -> tuple[str, ...]:
    """The cells of one service (6.2) with its rates (None: not known yet)."""
    workers = str(s["workers"]) + (f" +{s['spares']} spare" if s.get("spares") else "")
    requests, errors = (None, None) if rates is None else (rates.requests, rates.errors)
    return (s["name"], workers, f"{s['queued']}/{s['queue_capacity']}", str(s["in_flight"]),
            rate(requests), rate(errors),
            f"{ms(s.get('service_time_p50_ms'))}/{ms(s.get('service_time_p99_ms'))}",
            f"{ms(s.get('queue_wait_p50_ms'))}/{ms(s.get('queue_wait_p99_ms'))}",
            percent(s.get("utilization")))


def clock(at: float) -> str:
    """Wall-clock seconds as local HH:MM:SS."""
    return time.strftime("%H:%M:%S", time.localtime(at))


def poll_timeout(interval: float, limit: float) -> float:
    """Seconds one poll waits for its reply: the interval, at least MIN_POLL_TIMEOUT, at
    most ``limit`` (``--timeout``)."""
    return min(limit, max(interval, MIN_POLL_TIMEOUT))


def pause(started: float, interval: float, now: float) -> float:
    """Seconds to wait before the next poll, for polls ``interval`` apart from the start
    of one to the start of the next; 0 when this one took longer."""
    return max(0.0, started + interval - now)


class Watch:
    """The view's state across polls: the last reply, the rates it gave, and since when
    the router has not answered. Changed only by ``polled`` and ``failed``."""

    def __init__(self, address: str, interval: float) -> None:
        self.address = address
        self.interval = interval
        self._last: dict | None = None  # the latest reply, the base of the next rates
        self._rates: dict[str, Rates] = {}
        self._updated: float | None = None
        self._down_since: float | None = None
        self._why = ""

    @property
    def unreachable(self) -> bool:
        """Whether the latest poll got no reply (and a new connection should be tried)."""
        return self._down_since is not None

    def polled(self, status: dict, at: float) -> None:
        """A STATUS reply arrived at ``at``."""
        self._rates = service_rates(self._last, status)
        self._last = status
        self._updated = at
        self._down_since = None
        self._why = ""

    def failed(self, why: str, at: float) -> None:
        """A poll sent at ``at`` got no reply: ``why`` says what happened instead. The
        router counts as unreachable since the first such poll in a row."""
        if self._down_since is None:
            self._down_since = at
        self._why = why

    def frame(self) -> Frame:
        """What to draw now."""
        if self._down_since is not None:
            return Frame(f"router unreachable (since {clock(self._down_since)}, retrying)",
                         f"{self.address}: {self._why}", True)
        if self._last is None or self._updated is None:
            return Frame(f"waiting for {self.address}", "", False)
        st = self._last
        return Frame(
            router_line(st["router"]),
            f"updated {clock(self._updated)}, every {self.interval:g}s; "
            "REQ/S and ERR/S since the previous poll; Ctrl-C quits",
            False,
            tuple(worker_row(w) for w in st["workers"]),
            tuple(service_row(s, self._rates.get(s["name"])) for s in st["services"]),
            tuple(node_cells(n) for n in st.get("nodes", ())))
