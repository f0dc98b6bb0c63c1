"""Starting and stopping what the benchmarks measure: one place for every bench script.

::

    pool(workdir, name, handler=..., workers=..., flags=[...], config="...", frontend=...)
        -> `python -m workerpool.cli up ...` in its own session, "workerpool ready" awaited
        -> yields (Popen, frontend address, argv); always stops the whole process group
    process_group(argv, ready_prefix, workdir, name)   the same for any other program
    free_tcp_port()                a loopback port nothing listens on now
    measure(work, prefix)          a script's measuring part: SIGTERM as Ctrl-C, a workdir
    start_executor(n)              a ProcessPoolExecutor (the baseline) whose workers ignore Ctrl-C
    stop_executor(ex, finished)    a ProcessPoolExecutor stopped with nothing left behind
    nearest_rank(sorted, q)        the q-quantile of a sorted sample
    cpu_seconds(pid), group_pids(pgid)   CPU time so far of a process; a group's processes

Every process runs in its own session and is stopped with SIGTERM, a grace period, then
SIGKILL of the whole group, on success, errors and Ctrl-C alike.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from workerpool._proc import die_with_parent, process_alive

T = TypeVar("T")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY_TIMEOUT = 60.0  # seconds a pool may take to come up (a busy 2-core machine)


class BenchError(RuntimeError):
    """A system could not be started, or stopped answering."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def measure(work: Callable[[str], T], prefix: str) -> tuple[T | None, int]:
    """Run a bench script's measuring part in a fresh working directory, always removed.
    SIGTERM acts as Ctrl-C (every ``pool`` and ``process_group`` stops its processes on the
    way out). Returns ``(result, 0)``, or ``(None, exit status)`` after saying why on
    stderr: 130 when interrupted, 1 on a ``BenchError``."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    workdir = tempfile.mkdtemp(prefix=prefix)
    try:
        return work(workdir), 0
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", file=sys.stderr)
        return None, 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None, 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _executor_worker_init() -> None:
    """Leave Ctrl-C and SIGTERM to the parent, which stops the pool (no tracebacks)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_executor(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """The ProcessPoolExecutor baseline with ``workers`` processes; stop it with
    ``stop_executor``."""
    return concurrent.futures.ProcessPoolExecutor(workers, initializer=_executor_worker_init)


def stop_executor(ex: concurrent.futures.ProcessPoolExecutor, finished: bool,
                  procs: list | None = None) -> None:
    """Shut ``ex`` down and make sure none of its processes survives. Not ``finished``
    (interrupted, or a measurement failed): its processes are terminated first rather than
    waited for. ``procs``: its processes, if the caller took them before a crash."""
    procs = procs or list((getattr(ex, "_processes", None) or {}).values())
    if not finished:
        for p in procs:
            with contextlib.suppress(Exception):
                p.terminate()
    ex.shutdown(wait=True, cancel_futures=True)
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def nearest_rank(sorted_values: list[float], q: float) -> float:
    """The ``q``-quantile (0 <= q <= 1) of an ascending, non-empty sample, by nearest rank."""
    return sorted_values[max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))]


def child_env() -> dict[str, str]:
    """The environment for benchmark children: the repository importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def process_group(argv: list[str], ready_prefix: str, workdir: str, name: str,
                  env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Start ``argv`` in its own session, wait for a stdout line starting with
    ``ready_prefix``, yield, and always tear the whole process group down."""
    out_path = os.path.join(workdir, f"{name}.stdout")
    err_path = os.path.join(workdir, f"{name}.stderr")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        # Killed with the bench, which a test's timeout SIGKILLs: in a session of its own,
        # nothing else would end it (its router and workers end with it in turn).
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO,
                                env=env or child_env(), start_new_session=True,
                                preexec_fn=functools.partial(die_with_parent, os.getpid()))
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            with open(out_path, encoding="utf-8", errors="replace") as f:
                if any(line.startswith(ready_prefix) for line in f):
                    break
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with code {proc.returncode} before it was "
                                 f"ready; stderr:\n{tail(err_path)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{name} was not ready within {READY_TIMEOUT:.0f}s; "
                                 f"stderr:\n{tail(err_path)}")
            time.sleep(0.05)
        yield proc
    finally:
        stop_group(proc)


@contextlib.contextmanager
def pool(workdir: str, name: str, *, handler: str = "workerpool.handlers:Echo", workers: int = 2,
         flags: list[str] | tuple[str, ...] = (), config: str | None = None,
         frontend: str | None = None) -> Iterator[tuple[subprocess.Popen, str, list[str]]]:
    """``workerpool up`` on ``frontend`` (default: a private ipc address); yields
    (process, frontend, argv).

    ``config`` is TOML text for ``--config`` (e.g. ``[supervisor]`` settings no flag has).
    """
    sockdir = tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)
    frontend = frontend or f"ipc://{sockdir}/front"
    argv = [sys.executable, "-m", "workerpool.cli", "up", "--frontend", frontend,
            "--handler", handler, "--workers", str(workers), *flags]
    if config is not None:
        path = os.path.join(sockdir, "pool.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config)
        argv[4:4] = ["--config", path]
    with process_group(argv, "workerpool ready", workdir, name) as proc:
        yield proc, frontend, argv


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of ``pid`` so far (0 if it is gone)."""
    total = 0
    try:
        stats = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in stats:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def group_pids(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` now."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def free_tcp_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the kernel's pick), for a server
    that needs a TCP address; another program could still take it before the server does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group led by ``proc``, wait, then SIGKILL whatever is left."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    _killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    deadline = time.monotonic() + 2.0  # the leader may be gone while the group lingers
    while process_alive(pgid, group=True) and time.monotonic() < deadline:
        time.sleep(0.05)
    _killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def command_line(argv: list[str]) -> str:
    """``argv`` as it would be typed (``python`` for the interpreter's path)."""
    return " ".join(["python", *argv[1:]])


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def tail(path: str, n: int = 4000) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]
