"""``workerpool loadtest``: the click command. It builds a ``LoadSpec`` from the flags
(bad values are usage errors, exit status 2), runs it, prints the summary or ``--json``,
draws ``--plot``, and exits 0 when every request got a reply (errors included), 3 when
some did not, 1 when the run could not start, 2 for bad flags or a missing part of the
``loadtest`` extra (one line naming it, before anything is sent).

Only click and pydantic are imported here: ``workerpool --help`` stays fast.
"""

from __future__ import annotations

import json
import sys

import click
from pydantic import ValidationError

from workerpool.config import DEFAULT_FRONTEND


class _Seconds(click.ParamType):
    name = "SECONDS"

    def convert(self, value, param, ctx):
        from workerpool.loadtest.spec import parse_seconds

        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_seconds(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SECONDS = _Seconds()


class _MissingExtra(click.ClickException):
    """One line, ``Error: ... pip install 'workerpool[loadtest]'``, exit status 2."""

    exit_code = 2


@click.command("loadtest")
@click.option("--router", "router_addr", default=DEFAULT_FRONTEND, show_default=True,
              help="The router's client (frontend) address.")
@click.option("--method", "methods", multiple=True, metavar="[SERVICE:]METHOD[=WEIGHT]",
              help="Method to call; repeat for a mix by weight, e.g. --method echo=9 "
                   "--method sleep=1 (default: echo).")
@click.option("--service", default=None,
              help="Service for methods that name none (default: the router's only one).")
@click.option("--rate", type=float, default=None,
              help="Open loop: requests per second, sent on schedule whatever the server does; "
                   "latency from each request's intended send time.")
@click.option("--arrival", type=click.Choice(["constant", "poisson"]), default="constant",
              show_default=True, help="Open loop: arrivals evenly spaced or a Poisson process.")
@click.option("--concurrency", type=int, default=None,
              help="Closed loop: requests kept outstanding (default 8 when --rate is not given).")
@click.option("--duration", type=SECONDS, default=None,
              help="How long to offer load after the warm-up, e.g. 30s, 2m (default 10s).")
@click.option("--requests", "n_requests", type=int, default=None,
              help="Offer this many requests instead of a --duration.")
@click.option("--warmup", type=SECONDS, default=0.0,
              help="Seconds of load first, left out of the figures.")
@click.option("--payload", default=None, help="The request body as JSON (default null).")
@click.option("--payload-size", type=int, default=None, metavar="BYTES",
              help="Send BYTES random bytes as the body instead of --payload.")
@click.option("--payload-kind", type=click.Choice(["bytes", "numpy"]), default=None,
              help="With --payload-size: raw bytes (default) or a numpy uint8 array.")
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True,
              help="Per-request deadline in seconds.")
@click.option("--priority", type=int, default=0, show_default=True,
              help="Priority of every request (0-1000, higher first).")
@click.option("--idempotent/--not-idempotent", default=None,
              help="Mark requests idempotent (run again if their worker dies) or not "
                   "(default: the service's setting).")
@click.option("--procs", type=int, default=1, show_default=True,
              help="Generator processes; each offers 1/N of --rate or --concurrency.")
@click.option("--inject", default=None, metavar="KIND:SECONDS,...",
              help="Faults against random workers at offsets into the run, e.g. "
                   "kill:5s,stop:10s. Kinds: kill (SIGKILL), stop (SIGSTOP), restart.")
@click.option("--interval", type=SECONDS, default=None,
              help="Timeline interval for --json and --plot (default: about 1/60 of the run, at least 0.2s).")
@click.option("--seed", type=int, default=None,
              help="Seed for Poisson arrivals, the method mix, the payload and fault victims.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON (schema: docs/operations.md, 'Load testing').")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True),
              default=None, help="Draw throughput, latency and faults over time to FILE.png.")
@click.option("--progress/--no-progress", default=None,
              help="Live progress bar on stderr (default: when stderr is a terminal).")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False), default=None,
              help="Keys directory (`workerpool keys init`): its client pair, and its admin "
                   "pair for --inject restart.")
@click.option("--key", type=click.Path(dir_okay=False), default=None,
              help="This client's secret key file (NAME.key_secret), with --router-key.")
@click.option("--router-key", type=click.Path(dir_okay=False), default=None,
              help="The router's public key file (router.key).")
def loadtest(router_addr, methods, service, rate, arrival, concurrency, duration, n_requests,
             warmup, payload, payload_size, payload_kind, timeout, priority, idempotent, procs,
             inject, interval, seed, as_json, plot_path, progress, keys_dir, key,
             router_key) -> None:
    """Offer load to a running pool and report throughput, latency percentiles, errors,
    requests without a reply and each worker's share.

    Closed loop (--concurrency N) keeps N requests outstanding. Open loop (--rate R)
    sends on a fixed schedule and measures latency from each request's intended send
    time, so a server stall shows in the tail (no coordinated omission).

    Needs the loadtest extra: pip install 'workerpool[loadtest]' (matplotlib only for
    --plot, rich only for the progress bar).

    Exit status: 0 when every request got a reply (errors are replies), 3 when some got
    none, 1 when the run could not start, 2 for bad flags or a missing part of the extra.
    """
    from ipc.curve import KeyFileError, peer_files
    from workerpool.loadtest.payload import LoadTestError
    from workerpool.loadtest.spec import LoadSpec, parse_inject, parse_method, parse_payload

    try:
        files = peer_files(keys=keys_dir, key=key, router_key=router_key)
        admin = peer_files(keys=keys_dir, role="admin") if keys_dir else None
    except KeyFileError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        spec = LoadSpec(
            key=str(files[0]) if files else None, router_key=str(files[1]) if files else None,
            admin_key=str(admin[0]) if admin else None,
            router=router_addr,
            methods=[parse_method(m, service) for m in methods] or [parse_method("echo", service)],
            rate=rate, arrival=arrival, concurrency=concurrency, duration=duration,
            requests=n_requests, warmup=warmup,
            payload=None if payload is None else parse_payload(payload),
            payload_size=payload_size, payload_kind=payload_kind, timeout=timeout,
            priority=priority, idempotent=idempotent, procs=procs,
            faults=parse_inject(inject) if inject else [], interval=interval, seed=seed)
    except ValidationError as exc:
        raise click.UsageError(_message(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    # Everything the run will need, before it starts: a missing --plot must not cost a run.
    from workerpool.loadtest.extra import MissingExtra, require

    show_bar = sys.stderr.isatty() if progress is None else progress
    try:
        require("hdrh.histogram", "hdrhistogram", "workerpool loadtest")
        if show_bar:
            require("rich.progress", "rich", "the progress bar", alternative="--no-progress")
        if plot_path:
            require("matplotlib", "matplotlib", "--plot")
    except MissingExtra as exc:
        raise _MissingExtra(str(exc)) from None

    from workerpool.loadtest.report import format_summary
    from workerpool.loadtest.runner import run

    try:
        report = run(spec, progress=show_bar)
    except LoadTestError as exc:
        raise click.ClickException(str(exc)) from None
    if plot_path:
        from workerpool.loadtest.plot import render

        render(report, plot_path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_summary(report))
        if plot_path:
            click.echo(f"plot        {plot_path}")
    sys.exit(report["exit_status"])


_FLAGS = {"faults": "--inject", "methods": "--method", "requests": "--requests"}


def _message(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc:
            loc[0] = _FLAGS.get(loc[0], "--" + loc[0].replace("_", "-"))
        where = ".".join(loc)
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "invalid load test:\n  " + "\n  ".join(lines)
