"""The supervisor: starts worker processes, notices each death at once, respawns.

::

    supervisor ──spawn (fresh exec, CUDA_VISIBLE_DEVICES set)──> worker processes
        │  pidfd per child in the same poll as its socket: a death wakes the loop at once
        └──[DEALER]── HELLO / SLOT(started|died|failed|stopped|removed) / DRAIN ──> router
                  <── READY(slot) / ADMIN(restart|drain|scale|kill) / DRAINED ──

``workerpool up`` runs a supervisor that also owns the router process; ``workerpool
worker --router ADDR`` runs the same supervisor against a router elsewhere. Death is an
event, not a timeout: the kernel makes a child's pidfd readable when it exits, the loop
reaps it and tells the router which incarnation died and how, and the router answers
that incarnation's requests. What happens next (respawn now, after a backoff, mark the
slot failed, remove it, leave it stopped) is decided by the slot's ``SlotLife``
(workerpool/respawn.py), which holds its state; this module carries it out, and
workerpool/children.py starts, signals and waits for the processes.
"""

from __future__ import annotations

import heapq
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

import zmq

from ipc import curve, protocol, shm, transport
from ipc.errors import IllegalTransition
from ipc.lifecycle import AdminOp, SlotEvent, WorkerState
from ipc.protocol import FrameError, Kind
from workerpool._proc import SignalWakeup, exit_cause, exit_status
from workerpool.children import (
    HelperProcess,
    describe_exit,
    is_stopped,
    reap_orphans,
    send_signal,
    start_worker,
    wait_all,
)
from workerpool.config import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_MESSAGE_BYTES,
    ROUTED_FIELDS,
    TIMINGS,
    ServiceConfig,
    SupervisorConfig,
)
from workerpool.devices import device_label, parse_devices
from workerpool.inbox import messages
from workerpool.link import Register, RouterLink
from workerpool.respawn import Action, Next, SlotLife
from workerpool.worker import WorkerSpec

log = logging.getLogger("workerpool.supervisor")


@dataclass
class WorkerProc:
    """One slot as the supervisor sees it: its config, its life (state, incarnation,
    deaths), and its current process while ``life.running``."""

    slot: str
    service: ServiceConfig
    device: str
    life: SlotLife
    proc: subprocess.Popen | None = None  # the last process started; None before the first
    pidfd: int | None = None  # open while life.running: readable when the process exits
    kill_reason: str | None = None  # why this incarnation is being killed (SIGKILL), for its SLOT
    stopped_since: float | None = None  # first seen in state T (SIGSTOP), monotonic


class Supervisor:
    """Runs the worker processes of ``services`` against the router at ``backend``."""

    def __init__(
        self,
        services: list[ServiceConfig],
        backend: str,
        config: SupervisorConfig | None = None,
        router_argv: list[str] | None = None,
        gateway_argv: list[str] | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        node: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        keys: tuple[str, str] | None = None,
    ) -> None:
        self.config = config or SupervisorConfig()
        # (own .key_secret, router's .key) files of the worker role: this supervisor's
        # socket uses them, and each worker is given the paths (never the secret itself).
        self.keys = None if keys is None else (str(keys[0]), str(keys[1]))
        creds = curve.PeerKeys.from_files(*self.keys) if self.keys else None
        self.backend = backend
        self.services = services
        self.drain_timeout = drain_timeout
        # Owning the router (`up`): started, restarted and stopped with the pool.
        self._router = HelperProcess(router_argv) if router_argv is not None else None
        # `up --http`: the HTTP gateway, a client of that router, supervised alike.
        self._gateway = HelperProcess(gateway_argv, "gateway") if gateway_argv else None
        self.workers: dict[str, WorkerProc] = {}
        self.max_message_bytes = max_message_bytes
        self.heartbeat_interval = heartbeat_interval
        self._next_beat = 0.0
        self._next_sweep = 0.0
        self._link = RouterLink()  # pings, round trips, when to send HELLO again
        self.stopped_liveness = 3  # beats a child may stay stopped before it is killed
        self.router_restarts = 0
        self._unwatched: list[HelperProcess] = []  # helpers (re)started: the poller adds them
        # Slot ids must be unique on the router: a remote supervisor adds its node name.
        self.node = node
        self._prefix = "" if node is None else f"{node}/"
        self._next_index: dict[str, int] = {}
        for svc in services:
            svc.resolve_workers()
            # Spares are slots like the others; the router decides which ones serve.
            self._add_slots(svc, svc.workers + svc.spares)
        self._by_pidfd: dict[int, WorkerProc] = {}
        self._timers: list[tuple[float, str]] = []  # (when, slot) respawns
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._identity = routing_id()
        self._sock.setsockopt(zmq.IDENTITY, self._identity)
        self._sock.setsockopt(zmq.LINGER, 1000)
        curve.secure_client(self._sock, creds)
        self._stopping = False
        self._drained = False
        self._all_ready_reported = False
        self.exit_code = 0
        self._wakeup = SignalWakeup()
        self.on_ready = None  # callback(): every worker registered once (used by `up`)

    # -- lifecycle ----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        self._wakeup.install(lambda: self.stop("signal"))
        if self._router is not None:
            # `up`'s router reads its keys again on SIGHUP: the operator signals `up`.
            signal.signal(signal.SIGHUP, lambda *_: self._router.signal(signal.SIGHUP))

    def run(self) -> int:
        """Start everything, supervise until stopped, stop everything. Returns an exit code."""
        try:
            for helper in (self._router, self._gateway):
                if helper is not None:
                    helper.start()
                    self._unwatched.append(helper)
            self._sock.connect(self.backend)
            self._send_hello()
            for w in self.workers.values():
                self._spawn(w)
            self._check_all_ready()  # a pool of zero workers is ready at once
            self._loop()
        finally:
            self._stop_children()
            self._sock.close(linger=0)
            self._ctx.term()
            self._wakeup.close()
        return self.exit_code

    def stop(self, why: str = "") -> None:
        """Begin a graceful stop: the router drains, then workers and router exit."""
        if self._stopping:
            return
        log.info("stopping (%s): draining in-flight requests", why,
                 extra={"event": "drain-start", "reason": why})
        self._stopping = True
        self._stop_deadline = time.monotonic() + self.drain_timeout + self.config.stop_timeout
        if self._gateway is not None:
            # It stops taking HTTP requests now and finishes those in flight while the
            # router drains them.
            self._gateway.signal(signal.SIGTERM)
        # Owning the router (`up`), we stop the whole pool; otherwise only our workers leave.
        # Told DRAINED, there is nothing left to ask: the router is done with us.
        if not self._drained:
            self._send(Kind.DRAIN, {"scope": "router" if self._router else "supervisor"})

    def _send_hello(self) -> None:
        self._send(Kind.HELLO, self._hello())
        self._link.hello_sent()

    def _hello(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            **({"node": self.node} if self.node is not None else {}),
            # Only what was set explicitly (file or flag): the router's own defaults
            # (`workerpool router --policy`) apply to the rest.
            "services": [
                {"name": s.name, "workers": s.workers, "spares": s.spares,
                 **{k: getattr(s, k) for k in ROUTED_FIELDS if k in s.model_fields_set}}
                for s in self.services
            ],
            # With the process each runs now: the supervisor vouches for it (a restarted
            # router takes only the READYs a supervisor vouched for; router.vouching).
            "slots": [
                {"slot": w.slot, "service": w.service.name, "device": device_label(w.device),
                 **({"incarnation": w.life.incarnation, "pid": w.proc.pid}
                    if w.life.running and w.proc is not None else {})}
                for w in self.workers.values() if not w.life.retiring
            ],
        }

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wakeup, zmq.POLLIN)
        registered: set[int] = set()
        helpers: dict[int, HelperProcess] = {}
        startup_deadline = time.monotonic() + self.config.startup_timeout
        while True:
            while self._unwatched:
                helper = self._unwatched.pop()
                if helper.pidfd is not None:
                    poller.register(helper.pidfd, zmq.POLLIN)
                    helpers[helper.pidfd] = helper
            for fd in set(self._by_pidfd) - registered:
                poller.register(fd, zmq.POLLIN)
                registered.add(fd)
            events = dict(poller.poll(self._poll_timeout_ms()))
            for fd in events:
                if fd in self._by_pidfd:
                    poller.unregister(fd)
                    registered.discard(fd)
                    self._reap(self._by_pidfd.pop(fd))
                elif fd in helpers:
                    poller.unregister(fd)
                    self._on_helper_exit(helpers.pop(fd))
                elif fd == self._wakeup.fileno():
                    self._wakeup.drain()
            if self._sock in events:
                self._drain_socket()
            self._run_timers()
            now = time.monotonic()
            if now >= self._next_beat:
                self._beat(now)
            if now >= self._next_sweep:
                self._sweep_segments(now)
            if not self._all_ready_reported and not self._stopping and now > startup_deadline:
                self._startup_timed_out()
            if self._stopping and (self._drained or now > self._stop_deadline
                                   or self._router_gone()):
                return

    def _beat(self, now: float) -> None:
        """Ping the router (it counts a silent supervisor as lost; the ping carries the
        round trip measured so far); check for stopped children."""
        self._next_beat = now + self.heartbeat_interval
        self._send(Kind.HEARTBEAT, self._link.ping(now))
        self._kill_stopped_children(now)
        if os.getpid() == 1:
            reap_orphans(self._own_pids())

    def _own_pids(self) -> set[int]:
        """The processes this supervisor started and reaps itself (children.reap_orphans)."""
        procs = [w.proc for w in self.workers.values()]
        procs += [h.proc for h in (self._router, self._gateway) if h is not None]
        return {p.pid for p in procs if p is not None}

    def _sweep_segments(self, now: float) -> None:
        """Unlink segments of processes that died without unlinking them: clients killed
        with SIGKILL (our own workers' are unlinked when they are reaped)."""
        self._next_sweep = now + TIMINGS.shm_sweep_interval
        swept = shm.sweep_dead_owners()
        if swept:
            log.info("removed %d shared-memory segments of dead processes", swept)

    def _startup_timed_out(self) -> None:
        missing = sorted(w.slot for w in self.workers.values() if not _settled(w))
        log.error("workers %s did not become ready within supervisor.startup_timeout="
                  "%.0fs; stopping", ", ".join(missing), self.config.startup_timeout,
                  extra={"event": "startup-timeout", "workers": missing})
        self.exit_code = 1
        self.stop("startup timeout")

    def _poll_timeout_ms(self) -> int:
        t = min(500.0, self.heartbeat_interval * 1000)
        if self._timers:
            t = min(t, (self._timers[0][0] - time.monotonic()) * 1000)
        return max(0, int(t) + 1)

    def _drain_socket(self) -> None:
        while True:
            try:
                frames = transport.recv(self._sock, transport.NOBLOCK)
            except zmq.Again:
                return
            try:
                inner = messages(frames)
            except FrameError as exc:  # the router is trusted: a bad bundle is its bug
                log.warning("dropped malformed bundle from router (none of it acted on): "
                            "%s", exc)
                continue
            for one in inner:
                self._on_frames(one)

    def _on_frames(self, frames: list) -> None:
        """One message from the router, alone or out of a BUNDLE."""
        try:
            msg = protocol.decode(frames)
        except FrameError as exc:
            log.warning("dropped bad frame from router: %s", exc)
            return
        try:
            self._on_router_message(msg)
        except IllegalTransition as exc:  # a bug here, not the router's: keep supervising
            log.error("refused: %s", exc)
        except (KeyError, TypeError, ValueError) as exc:  # a field missing or malformed
            log.warning("dropped malformed %s from router: %r (%s)", msg.kind.name,
                        msg.meta, exc)

    def _on_router_message(self, msg: protocol.Message) -> None:
        if msg.kind is Kind.READY:
            self._on_worker_ready(str(msg.meta.get("slot")), msg.meta.get("incarnation"))
        elif msg.kind is Kind.ADMIN:
            self._on_admin(msg.meta)
        elif msg.kind is Kind.HEARTBEAT and "router" in msg.meta:
            before = self._link.instance
            register = self._link.pong(msg.meta, time.monotonic())
            if register is Register.LOST:
                log.warning("the router had given this supervisor up as lost (it was "
                            "silent too long): registering again")
                self._send_hello()
            elif register is Register.RESTARTED:
                log.warning("router restarted (%s -> %s): registering again", before,
                            self._link.instance)
                self._send_hello()
                # The new router never heard they were scaled away: stop them here.
                for w in self.workers.values():
                    if w.life.retiring and w.life.running:
                        send_signal(w.proc, signal.SIGTERM)
            if self._link.probe():  # the round trip known now, not two beats from now
                self._send(Kind.HEARTBEAT, self._link.ping(time.monotonic()))
        elif msg.kind is Kind.DRAINED:
            self._drained = True
            reason = msg.meta.get("reason")
            reason = reason[:300] if isinstance(reason, str) else None
            if msg.meta.get("refused") is True and not self._stopping:
                log.error("the router refused this supervisor: %s", reason,
                          extra={"event": "hello-refused", "reason": reason})
                self.exit_code = 1
            if not self._stopping:  # the router is shutting down, or replaced us: we stop
                self.stop(f"router drained: {reason}" if reason else "router drained")

    def _on_admin(self, meta: dict) -> None:
        try:
            op = AdminOp(meta.get("op"))
        except ValueError:
            log.warning("ignored ADMIN with unknown op %r", meta.get("op"))
            return
        if op is AdminOp.SCALE:
            if not self._stopping:
                self._scale(str(meta.get("service")), int(meta["workers"]),
                            [str(s) for s in meta.get("retire", ())])
            return
        w = self.workers.get(str(meta.get("slot")))
        if w is None:
            return
        if op is AdminOp.KILL:
            # The router saw it hang (no heartbeat, or exec_timeout): SIGKILL works even
            # on a stopped process. Only the incarnation the router meant.
            if (meta.get("incarnation") == w.life.incarnation and w.life.running
                    and w.proc.poll() is None):
                w.kill_reason = str(meta.get("reason", "hung"))
                _log_kill(w)
                send_signal(w.proc, signal.SIGKILL)
            return
        if self._stopping:
            return
        if op is AdminOp.DRAIN:
            fields = {"event": "operator-drain", "worker": w.slot}
            if w.life.drain():
                log.info("operator drain of %s: it will not be respawned", w.slot, extra=fields)
            else:
                log.info("operator drain of %s ignored: it is %s", w.slot, w.life.state,
                         extra=fields)
        elif op is AdminOp.RESTART:
            log.info("operator restart of %s", w.slot,
                     extra={"event": "operator-restart", "worker": w.slot})
            # Running: it finishes what it holds (SIGTERM), then is respawned at once.
            self._carry_out(w, w.life.restart())

    def _add_slots(self, svc: ServiceConfig, n: int) -> list[WorkerProc]:
        devices = parse_devices(svc.devices)
        added = []
        for _ in range(n):
            i = self._next_index.get(svc.name, 0)
            self._next_index[svc.name] = i + 1
            slot = f"{svc.name}/{self._prefix}{i}"
            added.append(WorkerProc(slot, svc, devices[i % len(devices)],
                                    SlotLife(slot, self.config)))
            self.workers[slot] = added[-1]
        return added

    def _scale(self, service: str, workers: int, retire: list[str]) -> None:
        """The router chose which slots retire (it knows what they hold); new slots take
        fresh ids. The router hears the new counts and slots in a HELLO."""
        svc = next((s for s in self.services if s.name == service), None)
        if svc is None:
            log.warning("scale of unknown service %r ignored", service)
            return
        log.info("scaling %s: %d -> %d workers", service, svc.workers, workers,
                 extra={"event": "scale", "service": service, "workers_before": svc.workers,
                        "workers": workers, "retire": retire})
        svc.workers = workers
        for slot in retire:
            w = self.workers.get(slot)
            if w is not None and w.service is svc:
                self._retire(w)
        mine = [w for w in self.workers.values() if w.service is svc and not w.life.retiring]
        # The router names slots from those it knows. Slots an earlier scale up started,
        # whose HELLO had not reached it yet, are ours to retire, newest first: they have
        # not registered, so nothing is lost (registered ones only the router can drain).
        surplus = len(mine) - svc.workers - svc.spares
        for w in [w for w in reversed(mine) if not w.life.registered][:max(0, surplus)]:
            self._retire(w)
            mine.remove(w)
        added = self._add_slots(svc, max(0, svc.workers + svc.spares - len(mine)))
        self._send_hello()
        for w in added:
            self._spawn(w)

    def _retire(self, w: WorkerProc) -> None:
        """Scale ``w`` away (SlotLife.retire says how)."""
        self._carry_out(w, w.life.retire())

    def _carry_out(self, w: WorkerProc, action: Action) -> None:
        if action is Action.SPAWN:
            self._spawn(w)
        elif action is Action.TERMINATE:
            send_signal(w.proc, signal.SIGTERM)
        elif action is Action.REMOVE:
            del self.workers[w.slot]
            self._report(w, SlotEvent.REMOVED, reason="scaled away (not running)",
                         exitcode=None)

    def _report(self, w: WorkerProc, event: SlotEvent, **fields: object) -> None:
        """Tell the router what happened to ``w``'s current incarnation (SLOT)."""
        self._send(Kind.SLOT, {"slot": w.slot, "service": w.service.name,
                               "incarnation": w.life.incarnation, "event": event, **fields})

    def _kill_stopped_children(self, now: float) -> None:
        """A stopped child (SIGSTOP) is hung whoever watches it; the router sees it only
        through heartbeats, and a router that restarted never knew it. Check locally."""
        limit = self.heartbeat_interval * self.stopped_liveness
        for w in self.workers.values():
            if not w.life.running or w.kill_reason:
                continue
            if is_stopped(w.proc.pid):
                if w.stopped_since is None:
                    w.stopped_since = now
                elif now - w.stopped_since > limit:
                    w.kill_reason = f"stopped (SIGSTOP) for {now - w.stopped_since:.1f}s"
                    _log_kill(w)
                    send_signal(w.proc, signal.SIGKILL)
            else:
                w.stopped_since = None

    def _on_worker_ready(self, slot: str, incarnation: object) -> None:
        w = self.workers.get(slot)
        # False for a repeat (the router confirming again after a HELLO), or a stale one.
        if w is None or not w.life.registered_now(incarnation):
            return
        if w.life.incarnation > 1:
            ms = (time.monotonic() - w.life.died_at) * 1000
            log.info("worker %s back: ready %.0f ms after its predecessor died", slot, ms,
                     extra={"event": "worker-back", "worker": slot, "worker_pid": w.proc.pid,
                            "incarnation": w.life.incarnation, "recovery_ms": round(ms)})
        self._check_all_ready()

    def _check_all_ready(self) -> None:
        """Announce once, when every worker has registered or failed for good."""
        if self._all_ready_reported or self._stopping:
            return
        workers = self.workers.values()
        if not all(_settled(w) for w in workers):
            return
        self._all_ready_reported = True
        if workers and all(w.life.state is WorkerState.FAILED for w in workers):
            self.exit_code = 1
            self.stop("every worker failed in setup")
        elif self.on_ready is not None:
            self.on_ready()

    # -- children ---------------------------------------------------------------------------------
    def _on_helper_exit(self, helper: HelperProcess) -> None:
        """The router or the gateway exited: start it again, or stop the pool if it could
        not start at all."""
        rc = helper.reap()
        if self._stopping:
            return
        name = helper.name
        if helper.could_not_start(rc):
            log.error("%s process %s within %.0fs of starting; stopping the pool", name,
                      describe_exit(rc), TIMINGS.router_min_uptime,
                      extra={"event": f"{name}-failed", **exit_status(rc)})
            self.exit_code = 1
            self.stop(f"{name} could not start")
            return
        # The pool outlives its router: start another at the same addresses. Workers and
        # this supervisor register with it again; clients see their old requests fail.
        # A gateway is a client: a new one serves at the same address.
        log.error("%s process %s; starting a new one", name, describe_exit(rc),
                  extra={"event": f"{name}-restart", "cause": exit_cause(rc), **exit_status(rc)})
        if helper is self._router:
            self.router_restarts += 1
        helper.start()
        self._unwatched.append(helper)

    def _router_gone(self) -> bool:
        return self._router is not None and self._router.gone()

    def _spawn(self, w: WorkerProc) -> None:
        incarnation = w.life.spawned(time.monotonic())
        w.stopped_since = None
        spec = WorkerSpec(
            slot=w.slot, service=w.service.name, incarnation=incarnation,
            handler=w.service.handler, device=w.device, backend=self.backend,
            capacity=w.service.max_inflight, options=w.service.options, parent_pid=os.getpid(),
            supervisor=self._identity.decode(),
            max_message_bytes=self.max_message_bytes,
            heartbeat_interval=self.heartbeat_interval,
            key=self.keys[0] if self.keys else None,
            router_key=self.keys[1] if self.keys else None,
        )
        w.proc, w.pidfd = start_worker(spec)
        self._by_pidfd[w.pidfd] = w
        self._report(w, SlotEvent.STARTED, device=device_label(w.device), pid=w.proc.pid)

    def _reap(self, w: WorkerProc) -> None:
        rc = w.proc.wait()
        os.close(w.pidfd)
        w.pidfd = None
        shm.unlink_owned_by(w.proc.pid)  # what a crashed worker lent is gone with it
        how = describe_exit(rc)
        hung = w.kill_reason is not None
        if hung:
            how = f"was killed (SIGKILL) as hung: {w.kill_reason}"
            w.kill_reason = None
        end = w.life.exited(rc, how, time.monotonic(), self._stopping)
        # One word for how it ended, for the router's death line and for these logs.
        cause = "restart" if end.next is Next.RESPAWN else exit_cause(rc, hung)
        if end.next is Next.REMOVE:
            del self.workers[w.slot]
        for event, reason in end.events:
            if event is SlotEvent.REMOVED:
                self._report(w, event, reason=reason, exitcode=rc)
            else:
                self._report(w, event, pid=w.proc.pid, exitcode=rc, reason=reason, cause=cause)
        fields = {"worker": w.slot, "worker_pid": w.proc.pid, "incarnation": w.life.incarnation,
                  "device": device_label(w.device), "cause": cause, **exit_status(rc)}
        if end.next is Next.FAIL:
            log.error("worker %s %s", w.slot, end.why,
                      extra={"event": "worker-failed", "reason": end.why, **fields})
            self._check_all_ready()
        elif end.next is Next.RESPAWN:
            log.info("worker %s (pid %d) %s; respawning it now (operator restart)", w.slot,
                     w.proc.pid, how, extra={"event": "worker-respawn", "delay": 0.0, **fields})
            self._spawn(w)
        elif end.next is Next.BACKOFF:
            log.warning("worker %s (pid %d) %s; respawning in %.2fs", w.slot, w.proc.pid, how,
                        end.delay, extra={"event": "worker-respawn",
                                          "delay": round(end.delay, 3), **fields})
            heapq.heappush(self._timers, (w.life.died_at + end.delay, w.slot))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, slot = heapq.heappop(self._timers)
            w = self.workers.get(slot)  # gone if it was scaled away meanwhile
            # Still dead: not restarted by an operator meanwhile.
            if w is not None and not self._stopping and w.life.state is WorkerState.DEAD:
                self._spawn(w)

    def _stop_children(self) -> None:
        """Workers got SHUTDOWN from a drained router; give them stop_timeout, then force."""
        procs = [w.proc for w in self.workers.values() if w.proc is not None]
        if not self._drained:
            for p in procs:
                send_signal(p, signal.SIGTERM)
        wait_all(procs, self.config.stop_timeout)
        for p in procs:
            send_signal(p, signal.SIGKILL)
        wait_all(procs, 5)
        for w in self.workers.values():
            if w.pidfd is not None:
                os.close(w.pidfd)
                w.pidfd = None
        for p in procs:
            if p.returncode is not None:
                shm.unlink_owned_by(p.pid)
        if self._gateway is not None:
            self._gateway.stop(self.config.stop_timeout)
        if self._router is not None:
            self._router.stop(self.config.stop_timeout)

    def _send(self, kind: Kind, meta: dict) -> None:
        try:
            transport.send(self._sock, protocol.encode(kind, 0, meta), transport.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("could not tell the router %s: %s", kind.name, exc)


def routing_id() -> bytes:
    """This supervisor's routing id on the backend, ``sup-<hostname>-<pid>-<nonce>``: the
    random nonce keeps it unique where processes share a host name and a pid (containers,
    each with its own PID namespace), and tells the router that a restarted supervisor is
    a new process even when it comes back with the same pid."""
    return f"sup-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}".encode()


def _log_kill(w: WorkerProc) -> None:
    log.warning("killing worker %s (pid %d): %s", w.slot, w.proc.pid, w.kill_reason,
                extra={"event": "worker-kill", "worker": w.slot, "worker_pid": w.proc.pid,
                       "reason": w.kill_reason})


def _settled(w: WorkerProc) -> bool:
    """Startup is over for ``w``: it registered, or will not be respawned."""
    return w.life.registered or w.life.state is WorkerState.FAILED
