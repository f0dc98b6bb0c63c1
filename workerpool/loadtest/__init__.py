"""``workerpool loadtest``: offer load to a running pool and measure what it does.

::

    spec.py      LoadSpec and the flags' small languages (durations, --method, --inject)
    schedule.py  intended send times (constant, Poisson) and the method mix
    payload.py   the request body (JSON, random bytes, numpy)
    driver.py    one generator: sends through workerpool.Client, stamps every reply
    sources.py   this process, or --procs generator processes (JSON lines)
    recorder.py  HDR histograms, counters and the timeline; merged across processes
    inject.py    status polls and faults (kill, stop, restart) with recovery times
    report.py    the report dict (--json) and the human summary
    progress.py  the live bar (rich)
    plot.py      --plot (matplotlib)
    runner.py    one run from probe to report
    command.py   the click command
    extra.py     what the loadtest extra provides, and the one-line error without it

``run(LoadSpec(...))`` is the library entry point; it returns the report dict.
"""

from typing import Any

from workerpool.loadtest.payload import LoadTestError
from workerpool.loadtest.spec import Fault, LoadSpec, MethodMix

__all__ = ["Fault", "LoadSpec", "LoadTestError", "MethodMix", "run"]


def __getattr__(name: str) -> Any:
    # `run` pulls in the client, hdrhistogram and rich: only when a run is asked for,
    # so `workerpool --help` (which imports command.py from here) stays light. Without
    # the loadtest extra, the ImportError says which extra to install.
    if name == "run":
        from workerpool.loadtest.extra import require

        require("hdrh.histogram", "hdrhistogram", "workerpool.loadtest.run")
        from workerpool.loadtest.runner import run

        return run
    raise AttributeError(name)
