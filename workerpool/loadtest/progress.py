"""The live progress bar on stderr while a run goes (rich): how far, the current reply
rate, the live p99, errors, requests without a reply, outstanding requests and the
workers serving. Off when stderr is not a terminal (pipes, CI, tests).
"""

from __future__ import annotations

import sys
from typing import Any

from workerpool.loadtest.driver import Progress
from workerpool.loadtest.spec import LoadSpec


class ProgressDisplay:
    """Context manager; ``update()`` at every tick. Does nothing when disabled."""

    def __init__(self, spec: LoadSpec, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._by_requests = spec.duration is None
        self._total = float(spec.requests or 0) if self._by_requests else spec.warmup + spec.duration
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressDisplay:
        if not self.enabled:
            return self
        from workerpool.loadtest.extra import require

        require("rich.progress", "rich", "the progress bar", alternative="progress=False")
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("[bold]loadtest"), BarColumn(), TimeElapsedColumn(),
                             TextColumn("{task.fields[info]}"),
                             console=Console(stderr=True), transient=True)
        self._bar.start()
        self._task = self._bar.add_task("loadtest", total=self._total, info="starting")
        return self

    def update(self, p: Progress, serving: tuple[int, int] | None) -> None:
        if self._bar is None:
            return
        p99 = "-" if p.window_p99_ms is None else f"{p.window_p99_ms:,.1f} ms"
        info = (f"{p.rate:,.0f} req/s  p99 {p99}  errors {p.errors:,}  "
                f"no reply {p.unanswered:,}  outstanding {p.outstanding:,}")
        if serving is not None:
            info += f"  workers {serving[0]}/{serving[1]}"
        done = p.sent if self._by_requests else min(p.elapsed, self._total)
        self._bar.update(self._task, completed=done, info=info)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
