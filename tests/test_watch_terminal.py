"""``workerpool status --watch`` against live pools. In a real terminal: tmux runs it in a
detached session of a fixed size on its own server (``tmux -L``), and the test reads the
screen with ``capture-pane`` while it kills a worker, stops the pool, starts it again at
the same address and sends Ctrl-C. Off a terminal, with keys: frames on stdout."""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from ipc import curve
from tests.conftest import ROOT, _env
from workerpool.watch import WORKER_HEADERS

TMUX = shutil.which("tmux")

needs_tmux = pytest.mark.skipif(
    TMUX is None, reason="tmux is not installed (bin/system-packages installs it as root)")

_servers = itertools.count()


# Runs the command, then says how it exited and stays: the pane stays alive to be read.
# Ctrl-C goes to the whole foreground process group; it is for the command, not for this.
WRAPPER = """
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, lambda *_: None)
code = subprocess.call(sys.argv[1:])
print(f"watch exited with status {code}", flush=True)
time.sleep(120)
"""


class Terminal:
    """One tmux server of its own (``start`` runs a program in a 160x40 pane of it)."""

    def __init__(self) -> None:
        self.socket = f"wpt-watch-{os.getpid()}-{next(_servers)}"
        self.path: str | None = None

    def start(self, argv: list[str]) -> None:
        """Run ``argv`` (wrapped: it says how it exited, then stays) in session ``watch``."""
        # The server keeps the environment it starts with: PYTHONPATH for the repository.
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", "watch", "-x", "160", "-y", "40",
                  "-c", str(ROOT), shlex.join([sys.executable, "-c", WRAPPER, *argv]))
        self.path = self.pane("#{socket_path}")

    def tmux(self, *args: str) -> str:
        return subprocess.run([TMUX, "-L", self.socket, *args], env=_env(), check=True,
                              capture_output=True, text=True, timeout=10).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "watch")

    def pane(self, fmt: str) -> str:
        return self.tmux("display-message", "-p", "-t", "watch", fmt).strip()

    def wait(self, predicate: Callable[[str], bool], what: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"the screen never showed {what}:\n{screen}")

    def kill(self) -> None:
        """Stop the server and remove its socket (tmux leaves the file behind)."""
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=10)
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


@pytest.fixture
def terminal():
    """A Terminal whose server is always killed, before ``procs`` stops the pools."""
    term = Terminal()
    try:
        yield term
    finally:
        term.kill()


def cells(screen: str, worker_id: str) -> dict[str, str] | None:
    """The worker table's cells of ``worker_id`` on ``screen`` by header (every cell
    starts under its header), or None when the table or the row is not there."""
    lines = screen.splitlines()
    header = next((line for line in lines if line.startswith("ID ")), None)
    row = next((line for line in lines if line.startswith(worker_id + " ")), None)
    if header is None or row is None:
        return None
    starts = [header.index(h) for h in WORKER_HEADERS]
    ends = [*starts[1:], None]
    return {h: row[a:b].strip() for h, a, b in zip(WORKER_HEADERS, starts, ends, strict=True)}


def shows(worker_id: str, **expected: str) -> Callable[[str], bool]:
    """Whether a screen shows ``worker_id``'s row with these cells (STATE="ready", ...)."""
    def check(screen: str) -> bool:
        row = cells(screen, worker_id)
        return row is not None and all(row[k.upper()] == v for k, v in expected.items())
    return check


@needs_tmux
def test_watch_follows_a_crash_and_a_pool_restart_then_quits_on_ctrl_c(procs, terminal):
    pool = procs.pool(workers=2)
    terminal.start([sys.executable, "-m", "workerpool.cli", "status", "--watch",
                    "--interval", "0.5", "--router", pool.address])
    terminal.wait(lambda s: shows("default/0", state="ready")(s)
                  and shows("default/1", state="ready")(s), "two ready workers")
    assert terminal.pane("#{alternate_on}") == "1"

    victim = pool.workers()["default/0"]
    os.kill(victim["pid"], signal.SIGKILL)
    screen = terminal.wait(shows("default/0", restarts="1"), "default/0 restarted once")
    assert "SIGKILL" in cells(screen, "default/0")["LAST ERROR"]

    assert pool.stop() == 0
    screen = terminal.wait(lambda s: "router unreachable (since " in s, "router unreachable")
    assert "retrying)" in screen and "ID " not in screen

    # A new pool at the same address: the view comes back by itself.
    again = procs.spawn(["up", "--frontend", pool.address, "--workers", "2",
                         "--handler", "workerpool.handlers:Faulty"],
                        pool.address, "workerpool ready")
    router_pid = again.status()["router"]["pid"]
    terminal.wait(lambda s: f"router pid {router_pid} " in s
                  and shows("default/0", state="ready", restarts="0")(s), "the new pool's table")

    terminal.tmux("send-keys", "-t", "watch", "C-c")
    screen = terminal.wait(lambda s: "watch exited with status" in s, "the command's exit")
    assert "watch exited with status 0" in screen
    # The terminal is given back: the normal screen, the cursor shown.
    assert terminal.pane("#{alternate_on} #{cursor_flag}") == "0 1"


def test_watch_with_keys_prints_frames_off_a_terminal_and_stops_on_sigint(procs):
    keys = procs.dir / "keys"
    curve.init_keys(keys)
    curve.init_keys(procs.dir / "other")
    front = procs.ipc("front")
    procs.spawn(["up", "--frontend", front, "--backend", procs.ipc("back"), "--workers", "1",
                 "--keys", str(keys)], front, "workerpool ready")
    watch = ["status", "--watch", "--interval", "0.2", "--router", front, "--keys"]
    seen = procs.spawn([*watch, str(keys)], front, "default/0")
    assert "ready" in seen.lines[-1]
    assert seen.stop(signal.SIGINT, timeout=10) == 0
    # A key the router does not know: refused, shown, retried; not a crash.
    refused = procs.spawn([*watch, str(procs.dir / "other")], front, "router unreachable")
    detail = refused.wait_line(front)
    assert "PermissionDeniedError" in detail, detail
    assert refused.stop(signal.SIGINT, timeout=10) == 0
