"""Fixtures that own every process they start.

Each pool runs in its own process group (``start_new_session``); teardown sends SIGTERM,
waits, then SIGKILLs the whole group and checks that nothing of it is left, even when
the test failed.
"""

from __future__ import annotations

import itertools
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from workerpool import Client
from workerpool._proc import process_alive

ROOT = Path(__file__).resolve().parent.parent

# pytest-xdist's workers run with COLUMNS=80 and LINES=24, which every program the tests
# start would take over its real terminal (a 160-column tmux pane shows an 80-column
# table). The tests' programs size themselves, as they do for a user.
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Workers import test handlers (tests.handlers) from the repository root.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Proc:
    """A process group started by a test: a pool (`up`), a router, or a remote supervisor."""

    popen: subprocess.Popen
    address: str
    log: Path
    lines: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    client: dict = field(default_factory=dict)  # Client keywords for status: keys=DIR

    @property
    def pgid(self) -> int:
        return self.popen.pid

    def wait_line(self, prefix: str, timeout: float = 60.0) -> str:
        """Read stdout until a line starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        out = self.popen.stdout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None and not select.select([out], [], [], 0)[0]:
                break
            ready, _, _ = select.select([out], [], [], 0.1)
            if ready:
                line = out.readline()
                if not line:
                    continue
                self.lines.append(line)
                if line.startswith(prefix):
                    return line
        raise AssertionError(
            f"no line starting {prefix!r} within {timeout}s; stdout={self.lines!r}\n"
            f"log:\n{self.log.read_text()[-4000:]}")

    def status(self, timeout: float = 5.0) -> dict:
        with Client(self.address, **self.client) as c:
            return c.status(timeout=timeout)

    def workers(self) -> dict[str, dict]:
        return {w["id"]: w for w in self.status()["workers"]}

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "condition") -> dict:
        """Poll status until ``predicate(status)`` holds; returns that status."""
        deadline = time.monotonic() + timeout
        st: dict = {}
        while time.monotonic() < deadline:
            st = self.status()
            if predicate(st):
                return st
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last status: {st}")

    def busiest_worker(self, more_than: int = 0, timeout: float = 20.0) -> dict:
        """Once over ``more_than`` requests are in flight in all, the status of the worker
        running the most of them (the one to kill)."""
        st = self.wait_for(lambda s: sum(w["in_flight"] for w in s["workers"]) > more_than,
                           timeout, f"over {more_than} requests in flight")
        return max(st["workers"], key=lambda w: w["in_flight"])

    def wait_ready(self, n: int, timeout: float = 30.0) -> dict:
        return self.wait_for(
            lambda st: sum(w["state"] == "ready" for w in st["workers"]) == n,
            timeout, f"{n} ready workers")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the leader (or the group for SIGINT, as a terminal would) and wait."""
        if sig == signal.SIGINT:
            os.killpg(self.pgid, sig)
        else:
            self.popen.send_signal(sig)
        return self.popen.wait(timeout)


class Processes:
    """Starts pools/routers/supervisors for one test and always cleans them up."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wpt-"))  # short: ipc paths are <108 bytes
        self.procs: list[Proc] = []
        self._configs = itertools.count()

    def ipc(self, name: str) -> str:
        return f"ipc://{self.dir}/{name}"

    def tcp(self) -> str:
        """A loopback TCP endpoint on a port that is free now."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"

    def router(self) -> tuple[Proc, str]:
        """``workerpool router`` on two free loopback ports: the router (``address`` is its
        frontend) and its backend address, which ``node`` connects supervisors to."""
        front, back = self.tcp(), self.tcp()
        return self.spawn(["router", "--frontend", front, "--backend", back], front, None), back

    def node(self, router: Proc, back: str, name: str, *args: str) -> Proc:
        """``workerpool worker --node NAME`` with ``args`` against ``router``, once ready."""
        return self.spawn(["worker", "--router", back, "--node", name, *args], router.address,
                          "workerpool worker ready")

    def config(self, toml: str) -> str:
        """Path of a new config file in this test's directory holding ``toml``."""
        path = self.dir / f"config{next(self._configs)}.toml"
        path.write_text(toml)
        return str(path)

    def spawn(self, args: list[str], address: str, ready_prefix: str | None,
              wrap: list[str] = (), module: str = "workerpool.cli",
              env: dict[str, str] | None = None) -> Proc:
        """``python -m module args`` in a new process group, after the command prefix
        ``wrap`` (``ip netns exec NS``: on another test host), with ``env`` added to its
        environment; once ``ready_prefix`` is on its stdout, if given."""
        log = self.dir / f"proc{len(self.procs)}.log"
        popen = subprocess.Popen(
            [*wrap, sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,  # noqa: SIM115
            start_new_session=True, env={**_env(), **(env or {})}, cwd=ROOT)
        proc = Proc(popen, address, log)
        self.procs.append(proc)
        if ready_prefix:
            proc.wait_line(ready_prefix)
        return proc

    def pool(self, *args: str, workers: int | None = 4,
             handler: str = "workerpool.handlers:Faulty", wait: bool = True,
             env: dict[str, str] | None = None) -> Proc:
        """``workerpool up`` with ``args``; ``workers=None`` leaves --workers out."""
        address = self.ipc(f"front{len(self.procs)}")
        count = [] if workers is None else ["--workers", str(workers)]
        return self.spawn(["up", "--frontend", address, "--handler", handler, *count, *args],
                          address, "workerpool ready" if wait else None, env=env)

    def pool_from_config(self, toml: str, *args: str) -> Proc:
        """``workerpool up --config`` with ``toml`` as the file (services, or settings no flag
        has) and ``args``; waits until the pool is ready."""
        address = self.ipc(f"front{len(self.procs)}")
        return self.spawn(["up", "--config", self.config(toml), "--frontend", address, *args],
                          address, "workerpool ready")

    def cleanup(self) -> None:
        # The last started first, each waited for: a node (`workerpool worker`) drains
        # through its router, which must still be there to answer, as in a real shutdown.
        # Stopped together, the nodes waited out their drain for a router already gone.
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
                try:
                    p.popen.wait(15)
                except subprocess.TimeoutExpired:
                    pass
        for p in self.procs:
            if process_alive(p.pgid, group=True):
                os.killpg(p.pgid, signal.SIGKILL)
            try:
                p.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
            if p.popen.stdout:
                p.popen.stdout.close()
        deadline = time.monotonic() + 5
        leftover = [p.pgid for p in self.procs if process_alive(p.pgid, group=True)]
        while leftover and time.monotonic() < deadline:
            time.sleep(0.05)
            leftover = [p.pgid for p in self.procs if process_alive(p.pgid, group=True)]
        shutil.rmtree(self.dir, ignore_errors=True)
        assert not leftover, f"process groups left behind: {leftover}"


@pytest.fixture
def procs():
    p = Processes()
    try:
        yield p
    finally:
        p.cleanup()


@dataclass
class StandIn:
    """A bound ROUTER socket playing the router's backend, for a heartbeat thread or a
    supervisor under test, and its context (theirs may share it)."""

    ctx: object
    sock: object
    address: str


@pytest.fixture
def standin_router(tmp_path):
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/backend"
    sock.bind(address)
    try:
        yield StandIn(ctx, sock, address)
    finally:
        sock.close(0)
        ctx.term()


@pytest.fixture
def standin_supervisor(standin_router):
    """A Supervisor with no workers, connected to the stand-in router, its HELLO read:
    (supervisor, the stand-in's socket, the supervisor's routing id there)."""
    from ipc.protocol import Kind
    from workerpool.supervisor import Supervisor

    sup = Supervisor([], standin_router.address)
    try:
        sup._sock.connect(standin_router.address)
        sup._send(Kind.HELLO, {})
        ident = standin_router.sock.recv_multipart()[0]
        yield sup, standin_router.sock, ident
    finally:
        sup._sock.close(0)
        sup._ctx.term()
        sup._wakeup.close()


@pytest.fixture
def pool(procs):
    """A running pool of 4 Faulty workers (Echo's methods plus fault injection)."""
    return procs.pool()
