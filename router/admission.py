"""Admission: whether a REQUEST becomes a record, and for which service.

Checks run in a fixed order, and the first that fails answers the request
(docs/protocol.md, section 9): the meta fields (``check_meta``), a request id already in
flight, a pool that is draining, the service (unknown, or with no live worker), the
method, the connection's own limits (``router.clients``: cut off for not reading, or
``max_client_inflight`` held), then capacity (``BackpressureError``, or a lower-priority
request displaced).

For ``registration_grace`` after the router starts, a request for a service nobody has
described yet waits in a queue instead of failing: after a router restart the
supervisors and workers all register again within about a heartbeat.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ipc import protocol
from ipc.errors import (
    NO_LIVE_WORKERS,
    SHUTTING_DOWN,
    UNKNOWN_SERVICE,
    BackpressureError,
    ProtocolError,
    ServiceUnavailableError,
    UnknownMethodError,
    WorkerPoolError,
)
from router.requests import Record
from router.service import Service
from workerpool.config import MAX_PRIORITY, MAX_TIMEOUT, MIN_PRIORITY, TIMINGS, ServiceConfig

if TYPE_CHECKING:
    from router.core import RouterCore

log = logging.getLogger("workerpool.router")
MAX_GRACE_SERVICES = 256  # services requests may name before any supervisor described them


def check_meta(meta: dict) -> ProtocolError | None:
    """The error for a REQUEST meta whose fields are malformed, or None."""
    method = meta.get("method")
    if not isinstance(method, str) or not method:
        return ProtocolError("request meta needs 'method' (a non-empty string)", code="bad-meta")
    timeout = meta.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= MAX_TIMEOUT):
        return ProtocolError(
            f"'timeout' must be a number of seconds in (0, {MAX_TIMEOUT}], got {timeout!r}",
            code="bad-meta")
    if not isinstance(meta.get("idempotent", False), bool):
        return ProtocolError(f"'idempotent' must be true or false, got {meta['idempotent']!r}",
                             code="bad-meta")
    priority = meta.get("priority", 0)
    if (isinstance(priority, bool) or not isinstance(priority, int)
            or not MIN_PRIORITY <= priority <= MAX_PRIORITY):
        return ProtocolError(f"'priority' must be an integer in [{MIN_PRIORITY}, {MAX_PRIORITY}], "
                             f"got {priority!r}", code="bad-meta")
    return None


class ShedLog:
    """When to log a service's refusals for capacity: one line per service at most every
    ``every`` seconds, with the refusals since its last line. Plain values in and out: the
    caller passes the time and the services' running totals."""

    def __init__(self, started: float, every: float = TIMINGS.shed_log_every) -> None:
        self.started = started
        self.every = every
        self._last: dict[str, tuple[int, float]] = {}  # service -> (total, when) at its last line

    def due(self, now: float, totals: Mapping[str, int]) -> list[tuple[str, int, float]]:
        """``(service, refused since its last line, seconds since then)`` for each service
        whose total grew and whose last line, if any, is ``every`` seconds old; the first
        line of a service counts from ``started``."""
        out = []
        for name, total in totals.items():
            last, when = self._last.get(name, (0, None))
            if total > last and (when is None or now - when >= self.every):
                out.append((name, total - last, now - (self.started if when is None else when)))
                self._last[name] = (total, now)
            elif total < last:  # the service was forgotten and made again: count anew
                self._last[name] = (total, now)
        return out


class Admission:
    def __init__(self, core: RouterCore) -> None:
        self.core = core
        self.grace_until: float | None = core.clock() + core.config.registration_grace
        self.shed = ShedLog(core.clock())
        self._shed_check = 0.0

    def on_request(self, client: bytes, msg: protocol.Message, meta_frame: bytes) -> None:
        core = self.core
        err = self._refusal(client, msg)
        if isinstance(err, WorkerPoolError):
            core.reply_error(client, msg.req_id, err)
            return
        svc = err
        meta = msg.meta
        priority = meta.get("priority", 0)
        conn = svc.pick()
        if conn is None and not svc.may_queue:
            victim = None
            if svc.settings.capacity_policy == "queue":
                victim = svc.queue.eviction_candidate(priority)
            svc.rejected_backpressure += 1
            if victim is None:
                core.reply_error(client, msg.req_id,
                                 self._refused(svc, meta["method"], self.backpressure(svc)))
                return
            # The queue is full of lower-priority work: the newest of it makes room.
            core.requests.fail(victim, self.backpressure(
                svc, "displaced from the full queue by higher-priority work"))
        now = core.clock()
        timeout = meta.get("timeout")
        idempotent = meta.get("idempotent")
        if idempotent is None:
            idempotent = svc.settings.idempotent
        rec = Record(core.requests.new_rid(), client, msg.req_id, svc.name, meta["method"],
                     meta_frame, msg.body, msg.buffers,
                     now + timeout if timeout is not None else None, now, priority,
                     bool(idempotent))
        core.requests.admit(rec, svc, conn)

    def _refusal(self, client: bytes, msg: protocol.Message) -> WorkerPoolError | Service:
        """The error that refuses the request, or the service that takes it."""
        err = check_meta(msg.meta)
        if err is not None:
            return err
        core = self.core
        if (client, msg.req_id) in core.requests.by_client:
            return ProtocolError(f"request id {msg.req_id} is already in flight on this "
                                 "connection", code="duplicate-id")
        if core.draining:
            return ServiceUnavailableError("the pool is shutting down and admits no new requests",
                                           code=SHUTTING_DOWN)
        name = msg.meta.get("service")
        method = msg.meta["method"]
        svc, why, code = self.resolve(name)
        if svc is None:
            # Counted under the service if it is a described one without live workers.
            known = core.services.get(name) if isinstance(name, str) else None
            return self._refused(known, method, ServiceUnavailableError(why, code=code))
        if svc.methods and method not in svc.methods:
            return self._refused(svc, method, UnknownMethodError(
                f"service {svc.name!r} has no method {method!r}; "
                f"it has: {', '.join(sorted(svc.methods))}"))
        refusal = core.clients.refusal(client, svc)
        return svc if refusal is None else self._refused(svc, method, refusal)

    def _refused(self, svc: Service | None, method: str, err: WorkerPoolError) -> WorkerPoolError:
        """``err``, counted as the outcome of a request for ``svc`` refused at admission."""
        meters = self.core.meters
        if meters is not None:
            meters.request_ended(svc, method, err.type, None)
        return err

    def backpressure(self, svc: Service, why: str = "") -> BackpressureError:
        s = svc.settings
        if not why:
            why = (f"{svc.queued} requests queued (queue_capacity {s.queue_capacity})"
                   if s.capacity_policy == "queue" else
                   "every worker is at max_inflight (capacity_policy 'reject')")
        return BackpressureError(f"service {svc.name!r} is overloaded: {why}",
                                 code="service-full",
                                 retry_after=svc.retry_after(self.core.clock()))

    def resolve(self, name: object) -> tuple[Service | None, str, str]:
        """The service a request names (None: the only one, or 'default'), or why none and
        the ``code`` of that ServiceUnavailableError (``unknown-service``, ``no-live-workers``)."""
        core = self.core
        services = core.services
        registry = core.registry
        if self.grace_until is not None and (
                (name is None and not services)
                or (isinstance(name, str) and name not in services)):
            # Just started (or restarted): its supervisors and workers have not all described
            # themselves yet. The request waits for them; end_grace answers it otherwise.
            name = "default" if name is None else name
            if len(services) >= MAX_GRACE_SERVICES:
                return None, f"unknown service {name!r} (too many undescribed services)", \
                    UNKNOWN_SERVICE
            try:
                ServiceConfig(name=name)
            except ValueError:
                return None, f"unknown service {name!r}; it is not a valid service name", \
                    UNKNOWN_SERVICE
            return core.service(name), "", ""
        if name is None:
            if len(services) == 1:
                svc = next(iter(services.values()))
            elif "default" in services:
                svc = services["default"]
            elif not services:
                return None, "no workers are registered with this router", UNKNOWN_SERVICE
            else:
                return None, ("request names no service and there is no 'default'; services: "
                              + ", ".join(sorted(services))), UNKNOWN_SERVICE
        elif not isinstance(name, str):
            return None, f"'service' must be a string, got {type(name).__name__}", UNKNOWN_SERVICE
        else:
            svc = services.get(name)
            if svc is None:
                known = ", ".join(sorted(services)) or "none"
                return None, f"unknown service {name!r}; services: {known}", UNKNOWN_SERVICE
        if not svc.conns and not registry.has_live_slots(svc.name):
            if self.grace_until is not None and not registry.described(svc.name):
                return svc, "", ""  # named by an earlier request in the grace: wait as it does
            return None, f"service {svc.name!r} has no live workers (all failed or stopped)", \
                NO_LIVE_WORKERS
        return svc, "", ""

    def log_shedding(self, now: float) -> None:
        """Every ``TIMINGS.shed_check``: the services that refused requests for capacity
        (BackpressureError ``service-full``: a full queue, ``reject``, ``max_wait``) get
        their summary line, as ``ShedLog`` decides."""
        if now < self._shed_check:
            return
        self._shed_check = now + TIMINGS.shed_check
        services = self.core.services
        totals = {name: svc.rejected_backpressure for name, svc in services.items()}
        for name, refused, seconds in self.shed.due(now, totals):
            svc = services[name]
            log.warning("service %s refused %d requests for capacity in %.1fs (queue %d/%d, "
                        "%d workers serving)", name, refused, seconds, svc.queued,
                        svc.settings.queue_capacity, len(svc.conns),
                        extra={"event": "backpressure-shed", "service": name,
                               "refused": refused, "seconds": round(seconds, 3),
                               "refused_total": svc.rejected_backpressure,
                               "queued": svc.queued,
                               "queue_capacity": svc.settings.queue_capacity,
                               "capacity_policy": svc.settings.capacity_policy,
                               "workers": len(svc.conns)})

    def check_grace(self, now: float) -> None:
        """Registration grace is over: what still waits for an undescribed service fails."""
        if self.grace_until is None or now < self.grace_until:
            return
        self.grace_until = None
        core = self.core
        for svc in list(core.services.values()):
            core.fail_if_unservable(svc)
            if not svc.queued and not svc.configured and not core.registry.described(svc.name):
                # Only a request named it: forget it again. A service a supervisor described
                # with no worker (scaled to 0) stays: it is known, and may be scaled up.
                del core.services[svc.name]
