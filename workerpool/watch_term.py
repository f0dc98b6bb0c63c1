"""The terminal side of ``workerpool status --watch``: polls the router, hands each
outcome to ``Watch`` (workerpool/watch.py, where every decision is) and draws its frame
with rich.

On a terminal the view takes the alternate screen, as ``top`` does, and gives it back on
Ctrl-C (exit status 0); elsewhere (a pipe, a file) each frame is printed after the last.

A poll that gets no reply closes its Client, and the next poll makes a new one: the old
socket may still hold requests queued for a router that is gone, and a restarted router
would answer them all at once.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from workerpool.cells import NODE_HEADERS
from workerpool.errors import WorkerPoolError
from workerpool.loadtest.extra import require
from workerpool.watch import SERVICE_HEADERS, WORKER_HEADERS, Frame, Watch, pause, poll_timeout

if TYPE_CHECKING:
    from workerpool.client import Client

INSTALL = "pip install 'workerpool[watch]'"

PRINT_WIDTH = 1000
"""Columns of a frame printed off a terminal (a pipe, a file): more than a table needs."""

STATE_STYLES = {"ready": "green", "busy": "cyan", "spare": "blue", "starting": "yellow",
                "restarting": "yellow", "draining": "yellow", "dead": "bold red",
                "failed": "bold red", "stopped": "dim"}


def check_rich() -> None:
    """Raise MissingExtra (one line naming what to install) when rich is not there."""
    require("rich.live", "rich", "status --watch", install=INSTALL)


def run(connect: Callable[[], Client], address: str, interval: float, timeout: float) -> None:
    """Poll ``address`` every ``interval`` seconds through Clients made by ``connect``
    and draw the view until Ctrl-C. ``timeout`` bounds one poll's wait (``--timeout``)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if not console.is_terminal:
        # Off a terminal no width applies: each table takes its natural width, uncut.
        console = Console(width=PRINT_WIDTH)
    watch = Watch(address, interval)
    wait = poll_timeout(interval, timeout)
    live = Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
                redirect_stderr=False) if console.is_terminal else None
    client: Client | None = None
    try:
        with live or nullcontext():
            while True:
                started = time.monotonic()
                client = client or connect()
                poll(client, watch, wait)
                if watch.unreachable:
                    client.close()
                    client = None
                view = render(watch.frame())
                if live is None:
                    console.print(view, end="\n\n")
                else:
                    live.update(view, refresh=True)
                time.sleep(pause(started, interval, time.monotonic()))
    except KeyboardInterrupt:
        pass  # the way out, exit status 0; the alternate screen is already given back
    finally:
        if client is not None:
            # A second Ctrl-C must not cut the close short.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                client.close()
            finally:
                signal.signal(signal.SIGINT, previous)


def poll(client: Client, watch: Watch, wait: float) -> None:
    """One STATUS, its outcome handed to ``watch``."""
    sent = time.time()
    try:
        status = client.status(timeout=wait)
    except WorkerPoolError as exc:
        watch.failed(f"{exc.type}: {exc.message}", sent)
    except concurrent.futures.TimeoutError:  # the client's I/O thread did not answer
        watch.failed(f"no reply within {wait:g}s", sent)
    else:
        watch.polled(status, time.time())


def render(frame: Frame) -> Any:
    """The rich renderable of ``frame``: a title line, a detail line, the worker table,
    the service table and, when the router lists nodes, the nodes table. Every cell is
    left-aligned under its header; a terminal too narrow for a table cuts its cells with
    ``…``."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text(frame.title, style="bold red" if frame.unreachable else "bold"),
                        Text(frame.detail, style="dim")]
    if frame.unreachable:
        return Group(*parts)
    workers = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in WORKER_HEADERS:
        workers.add_column(header, no_wrap=True, overflow="ellipsis")
    state = WORKER_HEADERS.index("STATE")
    for row in frame.workers:
        workers.add_row(*row[:state], Text(row[state], style=STATE_STYLES.get(row[state], "")),
                        *row[state + 1:])
    parts += [Text(""), workers]
    for headers, rows in ((SERVICE_HEADERS, frame.services), (NODE_HEADERS, frame.nodes)):
        if not rows and headers is NODE_HEADERS:
            continue
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for header in headers:
            table.add_column(header, no_wrap=True, overflow="ellipsis")
        for row in rows:
            table.add_row(*row)
        parts += [Text(""), table]
    return Group(*parts)
