"""A supervisor's child processes: started by fresh exec, watched through a pidfd,
signalled, waited for, and described when they end.

::

    Supervisor --start_worker(spec)--> python -m workerpool.worker   (CUDA_VISIBLE_DEVICES set)
               --HelperProcess.start--> python -m router '<config>' '<defaults>'   (`up` only)
               --HelperProcess.start--> workerpool gateway --router ... --listen ... (`up --http`)
               <-- pidfd readable: the child exited; reap it, describe_exit(rc) says how

Nothing here decides anything: what a worker's exit means is workerpool/respawn.py's, what
the supervisor does about it is workerpool/supervisor.py's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection

from workerpool._proc import EXIT_POISONED, signal_name
from workerpool.config import TIMINGS
from workerpool.devices import worker_env
from workerpool.worker import SPEC_ENV, WorkerSpec


def describe_exit(returncode: int) -> str:
    """How a child ended, in words: ``was killed by SIGKILL``, ``exited with code 1``."""
    if returncode < 0:
        return f"was killed by {signal_name(-returncode)}"
    if returncode == EXIT_POISONED:
        return f"exited with code {returncode} (its CUDA context was poisoned)"
    return f"exited with code {returncode}"


def start_worker(spec: WorkerSpec) -> tuple[subprocess.Popen, int]:
    """Start the worker process ``spec`` describes; returns it and its pidfd."""
    env = worker_env(spec.device)
    env[SPEC_ENV] = spec.model_dump_json()
    # A fresh interpreter, never a fork: nothing (least of all CUDA state) is inherited.
    proc = subprocess.Popen([sys.executable, "-m", "workerpool.worker"], env=env)
    return proc, os.pidfd_open(proc.pid)


def reap_orphans(ours: Collection[int]) -> int:
    """Reap the exited children that are not ``ours``; return how many.

    Only a PID 1 needs this (``workerpool`` as a container's first process): the kernel
    makes it the parent of every orphan in its PID namespace, a handler's subprocesses'
    children included, and an orphan it does not reap stays a zombie. Our own children are
    left to their ``Popen``, which needs their exit status: each exited child is looked at
    first without being reaped (``WNOWAIT``), and the search stops at one of ours (it is
    reaped by the loop soon, and the search gets past it next time).
    """
    reaped = 0
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # no children at all
            return reaped
        if info is None or info.si_pid in ours:
            return reaped
        try:
            os.waitid(os.P_PID, info.si_pid, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            pass
        reaped += 1


def is_stopped(pid: int) -> bool:
    """The process is stopped (state T: SIGSTOP, or a tracer)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def send_signal(p: subprocess.Popen, sig: int) -> None:
    """``sig`` to ``p`` unless it has already exited."""
    if p.poll() is None:
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass


def wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait until every process in ``procs`` has exited, or ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def router_argv(router_config_json: str, service_defaults: dict | None = None,
                security_json: str | None = None) -> list[str]:
    """Command line that starts a router process by fresh exec. ``security_json`` (a
    ``SecurityConfig``) names the keys directory, never a key itself."""
    argv = [sys.executable, "-m", "router", router_config_json,
            json.dumps(service_defaults or {})]
    return argv if security_json is None else [*argv, security_json]


def gateway_argv(router: str, listen: str, keys: tuple[str, str] | None = None,
                 connections: int | None = None, config: str | None = None,
                 insecure: bool = False) -> list[str]:
    """Command line that starts an HTTP gateway for the router at ``router`` (its frontend),
    with a client key pair's files when the router requires keys, ``connections`` to the
    router when given, and the rest from ``config``'s [gateway] section (else the
    gateway's defaults)."""
    argv = [sys.executable, "-m", "workerpool.cli", "gateway", "--router", router,
            "--listen", listen]
    if connections is not None:
        argv += ["--router-connections", str(connections)]
    if config is not None:
        argv += ["--config", config]
    if insecure:
        argv.append("--insecure")
    return argv if keys is None else [*argv, "--key", keys[0], "--router-key", keys[1]]


class HelperProcess:
    """A process ``workerpool up`` runs beside its workers (the router; the HTTP gateway
    with ``--http``), started again when it dies; ``pidfd`` is readable once it exits."""

    def __init__(self, argv: list[str], name: str = "router") -> None:
        self.argv = argv
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.pidfd: int | None = None
        self._started = 0.0

    def start(self) -> None:
        env = dict(os.environ, WORKERPOOL_PARENT_PID=str(os.getpid()))
        self.proc = subprocess.Popen(self.argv, env=env)
        self._started = time.monotonic()
        self.pidfd = os.pidfd_open(self.proc.pid)

    def reap(self) -> int:
        """The exit status of a router whose pidfd became readable."""
        rc = self.proc.wait()
        os.close(self.pidfd)
        self.pidfd = None
        return rc

    def could_not_start(self, rc: int) -> bool:
        """It exited with an error right away (address in use, bad config): starting it
        again would loop. Killed by a signal, or after running a while: start another."""
        return rc > 0 and time.monotonic() - self._started < TIMINGS.router_min_uptime

    def gone(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            send_signal(self.proc, sig)

    def stop(self, timeout: float) -> None:
        """Let it exit by itself (it drained), then SIGTERM, then after ``timeout`` SIGKILL."""
        if self.proc is None:
            return
        wait_all([self.proc], TIMINGS.router_exit_wait)
        send_signal(self.proc, signal.SIGTERM)
        wait_all([self.proc], timeout)
        send_signal(self.proc, signal.SIGKILL)
        self.proc.wait()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
