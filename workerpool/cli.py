"""``workerpool`` command line: one click group, a subcommand per role.

Each command builds the pydantic config (TOML file first, flags over it) and calls the
library; nothing here knows the wire protocol.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import tomllib
from typing import Any, get_args

import click
from pydantic import ValidationError

from workerpool.cells import NODE_HEADERS, cell, error_line, ms, node_cells, percent, router_line
from workerpool.config import (
    DEFAULT_BACKEND,
    DEFAULT_FRONTEND,
    GATEWAY_DEFAULT_CONNECTIONS,
    GATEWAY_MAX_CONNECTIONS,
    GATEWAY_MIN_CONNECTIONS,
    POLICIES,
    GatewayConfig,
    PoolConfig,
    SecurityConfig,
    ServiceConfig,
    format_http_address,
    parse_http_address,
)
from workerpool.loadtest.command import loadtest
from workerpool.logs import LOG_FORMAT_ENV, LOG_LEVEL_ENV, LogFormat, setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Logging threshold for this process and the ones it starts.")
def main(log_level: str) -> None:
    """workerpool: serve GPU work from isolated, supervised worker processes."""
    os.environ[LOG_LEVEL_ENV] = log_level.upper()  # inherited by the router and workers
    setup_logging(log_level)


# -- shared options --------------------------------------------------------------------------
def option_value(text: str) -> Any:
    """VALUE of ``--handler-option KEY=VALUE``: read as a TOML value, as in the config file's
    ``options`` table, when it is a number, ``true``/``false`` or a quoted string; anything
    else (a path, a name, a list, inf, nan, a date) is kept as the text itself."""
    if "\n" in text or "\r" in text:
        return text
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if isinstance(value, bool | int | str) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return text  # a JSON spec carries no inf/nan; lists and tables belong in the file


def _handler_options(ctx: click.Context, param: click.Parameter,
                     items: tuple[str, ...]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx, param)
        if not key:
            raise click.BadParameter(f"{item!r} has an empty KEY", ctx, param)
        options[key] = option_value(text)  # a key given twice: the last one wins
    return options


def _service_options(f):
    for opt in reversed([
        click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                     help="TOML file with [router], [supervisor] and [[services]]; flags override it."),
        click.option("--service", default=None,
                     help="Service the flags below apply to (default: the only one, 'default')."),
        click.option("--handler", default=None,
                     help="Handler class as module:Class, e.g. workerpool.handlers:Echo."),
        click.option("--workers", type=int, default=None, help="Worker processes (default 1)."),
        click.option("--spares", type=int, default=None,
                     help="Extra workers kept set up and idle; one replaces a dead worker at "
                          "once (default 0)."),
        click.option("--devices", default=None,
                     help="cpu | auto | GPU indices like 0,1 (workers are spread over them)."),
        click.option("--workers-per-device", type=int, default=None,
                     help="Workers on each device of --devices, instead of --workers."),
        click.option("--policy", type=click.Choice(POLICIES), default=None,
                     help="Dispatch policy (default least-loaded)."),
        click.option("--min-per-host", type=int, default=None,
                     help="`workerpool scale` keeps at least this many workers on each "
                          "supervisor (host) that has them (default 0: no minimum)."),
        click.option("--max-inflight", type=int, default=None,
                     help="Requests one worker may hold at once (default: 1, or twice the largest "
                     "max_batch_size of the handler's @batched methods)."),
        click.option("--prefetch", type=int, default=None,
                     help="Requests sent to a worker beyond --max-inflight and held ahead, so "
                          "the next is there when one finishes (default 1; 0: none)."),
        click.option("--queue-capacity", type=int, default=None,
                     help="Requests queued per service before BackpressureError (default 10000)."),
        click.option("--capacity-policy", type=click.Choice(["queue", "reject"]), default=None,
                     help="When every worker is full: queue (up to --max-wait) or reject at once "
                          "(default queue)."),
        click.option("--max-wait", type=float, default=None,
                     help="Seconds a request may wait in the queue before BackpressureError "
                          "(default 30)."),
        click.option("--handler-option", "handler_options", multiple=True, metavar="KEY=VALUE",
                     callback=_handler_options,
                     help="An entry of the handler's options (ctx.options in setup()); repeat "
                          "for more. Merged over the service's `options` in --config, key by "
                          "key. VALUE is a number, true/false or a \"quoted string\" when it "
                          "reads as one in TOML; anything else is kept as text: threads=4 is "
                          "the integer 4, half=true a boolean, path=/m/a.pt and rev='\"42\"' "
                          "strings."),
    ]):
        f = opt(f)
    return f


def _log_format_option(f):
    return click.option(
        "--log-format", type=click.Choice(get_args(LogFormat)), default=None,
        help="How this process and the ones it starts log to stderr: text, or one JSON "
             "object per line (default: the file's [logging] format, else text).")(f)


def _start_logging(flag: str | None, cfg: PoolConfig, role: str) -> None:
    """Log in the format the flag (else the file) names, as ``role``; the processes this
    one starts inherit it, as they do the level."""
    fmt = flag or cfg.logging.format
    os.environ[LOG_FORMAT_ENV] = fmt
    setup_logging(fmt=fmt, role=role)


def _keys_option(f):
    return click.option(
        "--keys", "keys_dir", type=click.Path(file_okay=False), default=None,
        help="Keys directory made by `workerpool keys init` (CURVE; docs/security.md).")(f)


def _insecure_option(f):
    return click.option(
        "--insecure", is_flag=True, default=None,
        help="Allow binding a non-loopback address without --keys: anyone who reaches it "
             "can use and reshape the pool.")(f)


def _peer_key_options(f):
    """--keys DIR, or --key FILE with --router-key FILE: a connecting peer's keys."""
    f = click.option("--router-key", type=click.Path(dir_okay=False), default=None,
                     help="The router's public key file (router.key), with --key.")(f)
    f = click.option("--key", type=click.Path(dir_okay=False), default=None,
                     help="This peer's own secret key file (NAME.key_secret).")(f)
    return _keys_option(f)


def _security(keys_dir: str | None, key: str | None = None, router_key: str | None = None,
              insecure: bool | None = None,
              base: SecurityConfig | None = None) -> SecurityConfig:
    """[security] from the config file (``base``) with the flags over it."""
    fields = (base or SecurityConfig()).model_dump()
    if keys_dir is not None:
        fields["keys"] = keys_dir
    if key is not None or router_key is not None:
        fields["key"], fields["router_key"] = key, router_key
    if insecure:
        fields["insecure"] = True
    for name in ("keys", "key", "router_key"):  # children may run elsewhere in the tree
        if fields[name] is not None:
            fields[name] = os.path.abspath(os.path.expanduser(fields[name]))
    try:
        return SecurityConfig.model_validate(fields)
    except ValidationError as exc:
        raise click.UsageError(_pydantic_message(exc)) from None


def _peer_keys(sec: SecurityConfig, role: str) -> tuple[str, str] | None:
    """(own secret, router public) paths of ``role``'s pair, checked readable now."""
    from ipc.curve import KeyFileError, PeerKeys

    files = sec.peer_files(role)
    if files is None:
        return None
    try:
        PeerKeys.from_files(*files)
    except KeyFileError as exc:
        raise click.UsageError(str(exc)) from None
    return str(files[0]), str(files[1])


def _client(router_addr: str, keys_dir: str | None, key: str | None, router_key: str | None,
            role: str = "client"):
    """A Client with the peer key flags: --key/--router-key, else --keys DIR's ``role``."""
    return _connector(router_addr, keys_dir, key, router_key, role)()


def _connector(router_addr: str, keys_dir: str | None, key: str | None,
               router_key: str | None, role: str = "client"):
    """What makes such Clients, one per call; the key flags are checked now."""
    from ipc.transport import check_endpoint
    from workerpool.client import Client

    try:
        check_endpoint(router_addr)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--router'") from None
    files = _peer_keys(_security(keys_dir, key, router_key), role)
    if files is None:
        return lambda: Client(router_addr)
    return lambda: Client(router_addr, key=files[0], router_key=files[1])


def _metrics_option(f):
    return click.option(
        "--metrics", default=None, metavar="HOST:PORT",
        help="Serve GET /metrics (Prometheus), GET /api/status and the dashboard (GET /) over "
             "HTTP on HOST:PORT (:PORT or PORT: on 127.0.0.1); unauthenticated and read-only. "
             "Default: off.")(f)


def _check_metrics(address: str | None) -> None:
    """Exit 1 now, before anything starts, when the metrics listener could not bind."""
    if address is None:
        return
    from router.metrics import ListenerError, listener_module

    try:
        listener_module().probe(address)
    except ListenerError as exc:
        raise click.ClickException(str(exc)) from None


def _check_http(listen: str, gw: GatewayConfig) -> None:
    """``up --http``: the gateway's address is checked (and free) before anything starts."""
    from workerpool.gateway import GatewayError, check_installed

    _check_http_exposure(listen, gw.tokens, gw.insecure)
    try:
        check_installed()
        from workerpool.gateway.server import probe

        probe(listen)
    except GatewayError as exc:
        raise click.ClickException(str(exc)) from None


def _check_binds(frontend: str, backend: str | None, sec: SecurityConfig) -> None:
    from ipc.curve import KeyFileError, check_exposure

    try:
        check_exposure([frontend, backend or ""], bool(sec.keys), sec.insecure)
    except KeyFileError as exc:
        raise click.UsageError(str(exc)) from None


def _build_config(config_path: str | None, service: str | None, router: dict[str, Any],
                  svc: dict[str, Any], options: dict[str, Any] | None = None) -> PoolConfig:
    """TOML first, then flags (``options``: merged over the service's, key by key); exits
    with a readable message on invalid values."""
    try:
        cfg = PoolConfig.load(config_path)
        if config_path is None and service is not None:
            # No file: --service names the pool's one service rather than adding a second.
            cfg.services = [ServiceConfig(name=service)]
        for key, value in router.items():
            if value is not None:
                setattr(cfg.router, key, value)
        if any(v is not None for v in svc.values()) or service is not None or options:
            target = cfg.service(service)
            for key, value in svc.items():
                if value is not None:
                    setattr(target, key, value)
            if options:
                target.options = {**target.options, **options}
        for s in cfg.services:
            s.resolve_workers()
        return cfg  # validate_assignment checked each flag as it was applied
    except ValidationError as exc:
        raise click.UsageError(_pydantic_message(exc)) from None
    except (ValueError, OSError) as exc:
        raise click.UsageError(str(exc)) from None


def _pydantic_message(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def _router_connections_option(f):
    return click.option(
        "--router-connections",
        type=click.IntRange(GATEWAY_MIN_CONNECTIONS, GATEWAY_MAX_CONNECTIONS), default=None,
        help="The HTTP gateway's connections to the router; its callers are spread over "
             "them, so the router's fairness between connections holds between callers "
             f"[default: [gateway] router_connections, {GATEWAY_DEFAULT_CONNECTIONS}].")(f)


def _gateway_config(config: PoolConfig, flags: dict[str, Any]) -> GatewayConfig:
    """[gateway] from the config file with the flags that were given over it, its files as
    absolute paths (the gateway may run elsewhere in the tree); its token file read once
    now, so that a bad one stops the command before anything starts."""
    from workerpool.gateway.tokens import TokenFileError, Tokens

    fields = config.gateway.model_dump()
    fields.update({k: v for k, v in flags.items() if v is not None and v is not False})
    for name in ("tokens", "tls_cert", "tls_key"):
        if fields[name] is not None:
            fields[name] = os.path.abspath(os.path.expanduser(fields[name]))
    try:
        gw = GatewayConfig.model_validate(fields)
    except ValidationError as exc:
        raise click.UsageError(_pydantic_message(exc)) from None
    if gw.tokens is not None:
        try:
            Tokens(gw.tokens)
        except TokenFileError as exc:
            raise click.UsageError(str(exc)) from None
    return gw


# -- up ----------------------------------------------------------------------------------------
@main.command()
@click.option("--frontend", default=None,
              help=f"Address clients connect to [default: {DEFAULT_FRONTEND}].")
@click.option("--backend", default=None,
              help="Address workers connect to (default: a private ipc:// socket).")
@click.option("--drain-timeout", type=float, default=None,
              help="On Ctrl-C/SIGTERM, seconds in-flight requests may still run (default 30).")
@_metrics_option
@click.option("--http", "http_listen", default=None, metavar="HOST:PORT",
              help="Also run the HTTP gateway (`workerpool gateway`) there, supervised with "
                   "the pool (:PORT or PORT: on 127.0.0.1); the config's [gateway] section "
                   "sets the rest. Default: [gateway] listen, else off.")
@_router_connections_option
@_keys_option
@_insecure_option
@_log_format_option
@_service_options
def up(frontend, backend, drain_timeout, metrics, http_listen, router_connections, keys_dir,
       insecure, log_format, config_path, service, handler, workers, spares, devices,
       workers_per_device, policy, min_per_host, max_inflight, prefetch, queue_capacity,
       capacity_policy, max_wait, handler_options) -> None:
    """Run a whole pool: a router and a supervised set of workers, in the foreground.

    Ctrl-C or SIGTERM drains: no new requests are admitted, in-flight ones finish, every
    process stops, and the exit status is 0.
    """
    from workerpool import rundir
    from workerpool.children import gateway_argv, router_argv
    from workerpool.supervisor import Supervisor
    cfg = _build_config(
        config_path, service,
        {"frontend": frontend, "backend": backend, "drain_timeout": drain_timeout,
         "metrics": metrics},
        {"handler": handler, "workers": workers, "spares": spares, "devices": devices,
         "workers_per_device": workers_per_device, "policy": policy,
         "min_per_host": min_per_host, "max_inflight": max_inflight, "prefetch": prefetch,
         "queue_capacity": queue_capacity, "capacity_policy": capacity_policy,
         "max_wait": max_wait}, handler_options)
    _start_logging(log_format, cfg, "supervisor")
    sec = _security(keys_dir, insecure=insecure, base=cfg.security)
    _check_binds(cfg.router.frontend, cfg.router.backend, sec)
    # The router child binds it; a taken port is said here, before any process starts.
    _check_metrics(cfg.router.metrics)
    http_listen = http_listen or cfg.gateway.listen
    if http_listen is not None:
        _check_http(http_listen, _gateway_config(
            cfg, {"router_connections": router_connections, "insecure": insecure}))
    # The router reads the directory; the supervisor and its workers use the worker pair.
    worker_keys = None
    if sec.keys:
        from ipc.curve import KeyFileError, KeyStore

        try:
            KeyStore(sec.keys)  # the router's own pair: refused here, not in the child
        except KeyFileError as exc:
            raise click.UsageError(str(exc)) from None
        worker_keys = _peer_keys(sec, "worker")
    gateway = None if http_listen is None else gateway_argv(
        cfg.router.frontend, http_listen, _peer_keys(sec, "client") if sec.keys else None,
        router_connections, os.path.abspath(config_path) if config_path else None,
        insecure=bool(insecure))
    router_sec = SecurityConfig(keys=sec.keys, insecure=sec.insecure)
    tmpdir = None
    if cfg.router.backend is None:
        # A private ipc socket: pools side by side on one host never collide.
        tmpdir = rundir.make()
        cfg.router.backend = f"ipc://{tmpdir}/backend"
    total = sum(s.workers for s in cfg.services)
    sup = Supervisor(cfg.services, cfg.router.backend, cfg.supervisor,
                     router_argv=router_argv(cfg.router.model_dump_json(), None,
                                             router_sec.model_dump_json()),
                     gateway_argv=gateway,
                     drain_timeout=cfg.router.drain_timeout,
                     max_message_bytes=cfg.router.max_message_bytes,
                     heartbeat_interval=cfg.router.heartbeat_interval, keys=worker_keys)

    def announce() -> None:
        names = ", ".join(f"{s.name}={s.handler} x{s.workers}" for s in cfg.services)
        click.echo(f"workerpool ready: {total} workers ({names}) at {cfg.router.frontend}")
        sys.stdout.flush()

    sup.on_ready = announce
    sup.install_signal_handlers()
    try:
        code = sup.run()
    finally:
        if tmpdir:
            rundir.remove(tmpdir)
    sys.exit(code)


# -- router -------------------------------------------------------------------------------------
@main.command("router")
@click.option("--frontend", default=None,
              help=f"Address clients connect to [default: {DEFAULT_FRONTEND}].")
@click.option("--backend", default=None,
              help="Address workers and supervisors connect to "
                   "[default: the config file's, else tcp://127.0.0.1:5556].")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="TOML file; its [router] table is used, flags override it.")
@click.option("--policy", type=click.Choice(POLICIES), default=None,
              help="Policy for services whose supervisor does not name one.")
@click.option("--drain-timeout", type=float, default=None,
              help="On SIGTERM, seconds in-flight requests may still run (default 30).")
@_metrics_option
@_keys_option
@_insecure_option
@_log_format_option
def router_cmd(frontend, backend, config_path, policy, drain_timeout, metrics, keys_dir,
               insecure, log_format) -> None:
    """Run only the router; start workers elsewhere with `workerpool worker --router`.

    With --keys, SIGHUP reads the key folders again at once (they are also checked every
    few seconds)."""
    from ipc.curve import KeyFileError
    from router.metrics import ListenerError
    from router.router import Router

    cfg = _build_config(config_path, None,
                        {"frontend": frontend, "backend": backend,
                         "drain_timeout": drain_timeout, "metrics": metrics}, {})
    _start_logging(log_format, cfg, "router")
    if cfg.router.backend is None:
        cfg.router.backend = DEFAULT_BACKEND
    sec = _security(keys_dir, insecure=insecure, base=cfg.security)
    _check_binds(cfg.router.frontend, cfg.router.backend, sec)
    defaults = {"policy": policy} if policy else {}
    try:
        r = Router(cfg.router, defaults, sec)
    except KeyFileError as exc:
        raise click.UsageError(str(exc)) from None
    except ListenerError as exc:
        raise click.ClickException(str(exc)) from None
    r.install_signal_handlers()
    r.run()


# -- gateway ------------------------------------------------------------------------------------
@main.command()
@click.option("--router", "router_addr", default=None,
              help=f"The router's client (frontend) address [default: [router] frontend, "
                   f"{DEFAULT_FRONTEND}].")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Where to serve HTTP (:PORT or PORT: on 127.0.0.1) [default: [gateway] "
                   "listen, 127.0.0.1:8000].")
@click.option("--tokens", "tokens", type=click.Path(dir_okay=False), default=None,
              help="File of allowed bearer tokens, one per line; without one, 401. Read "
                   "again when it changes.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
              help="PEM certificate (chain): serve HTTPS. Needs --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None,
              help="PEM private key of --tls-cert.")
@click.option("--timeout", type=click.FloatRange(0, 86400, min_open=True), default=None,
              help="Seconds a request may take when it gives no ?timeout= [default: 300].")
@click.option("--max-body-bytes", type=click.IntRange(1), default=None,
              help="Larger request bodies are refused with 413 [default: 64 MiB].")
@click.option("--max-buffered", type=click.IntRange(1), default=None,
              help="Stream items a slow HTTP reader may fall behind before its stream ends "
                   "(stream-overrun) and is cancelled [default: 64].")
@_router_connections_option
@click.option("--max-inflight-per-caller", type=click.IntRange(0), default=None,
              help="Requests one caller may have in flight; one more is 429 with "
              "Retry-After. 0: no cap but the router's per connection [default: 0].")
@click.option("--trust-forwarded", is_flag=True, default=False,
              help="Without --tokens, a caller is the last X-Forwarded-For address (set "
                   "by a proxy in front) rather than the peer's.")
@click.option("--insecure", is_flag=True, default=False,
              help="Allow listening on a non-loopback address without --tokens.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="TOML config: its [gateway] section, its [router] frontend "
              "and its [security] keys; the flags win over it.")
@_peer_key_options
@_log_format_option
def gateway(router_addr, listen, config_path, keys_dir, key, router_key, log_format,
            **flags) -> None:
    """Serve HTTP (and the KServe v2 protocol) in front of a router, as one of its clients.

    POST /v1/SERVICE/METHOD calls a method; see docs/http.md. With --keys DIR it uses the
    client pair DIR/clients/client."""
    from ipc.transport import check_endpoint
    from workerpool import __version__
    from workerpool.gateway import GatewayError, check_installed

    try:
        check_installed()
    except GatewayError as exc:
        raise click.ClickException(str(exc)) from None
    from workerpool.gateway.app import Settings
    from workerpool.gateway.server import ServeOptions, serve

    cfg = _build_config(config_path, None, {}, {})
    _start_logging(log_format, cfg, "gateway")
    router_addr = router_addr or cfg.router.frontend
    try:
        check_endpoint(router_addr)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--router'") from None
    gw = _gateway_config(cfg, flags)
    listen = listen or gw.listen or "127.0.0.1:8000"
    _check_http_exposure(listen, gw.tokens, gw.insecure)
    files = _peer_keys(_security(keys_dir, key, router_key, base=cfg.security), "client")
    settings = Settings(max_body_bytes=gw.max_body_bytes, max_buffered=gw.max_buffered,
                        tokens=gw.tokens, version=__version__,
                        router_connections=gw.router_connections,
                        max_inflight_per_caller=gw.max_inflight_per_caller,
                        trust_forwarded=gw.trust_forwarded)
    opts = ServeOptions(router=router_addr, listen=listen, keys=files, timeout=gw.timeout,
                        tls_cert=gw.tls_cert, tls_key=gw.tls_key, settings=settings)

    def ready(url: str) -> None:
        click.echo(f"workerpool gateway ready: {url} -> {router_addr}")
        sys.stdout.flush()

    try:
        sys.exit(serve(opts, on_ready=ready))
    except GatewayError as exc:
        raise click.ClickException(str(exc)) from None


def _check_http_exposure(listen: str, tokens: str | None, insecure: bool) -> None:
    """Refuse a non-loopback HTTP address without tokens unless --insecure."""
    from ipc.transport import is_loopback

    try:
        host, _ = parse_http_address(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--listen'") from None
    if tokens is None and not insecure and not is_loopback(f"tcp://{format_http_address(host, 1)}"):
        raise click.UsageError(
            f"refusing to serve HTTP on {listen} without --tokens: anyone who reaches it could "
            "call every service. Give --tokens FILE, listen on a loopback address, or pass "
            "--insecure to accept that.")


# -- worker -------------------------------------------------------------------------------------
MAX_NODE_NAME = 255  # what the router takes in a HELLO (protocol.md 8.4)


def _node_name(value: str | None) -> str | None:
    if value is not None and not 0 < len(value) <= MAX_NODE_NAME:
        raise click.BadParameter(f"must be 1 to {MAX_NODE_NAME} characters, not {len(value)}")
    return value


@main.command()
@click.option("--router", "router_addr", required=True,
              help="The router's backend address, e.g. tcp://10.0.0.5:5556.")
@click.option("--node", default=None, callback=lambda ctx, param, value: _node_name(value),
              help="Name for this supervisor in worker ids (SERVICE/NODE/N) "
                   "[default: HOSTNAME-PID-XXXX, XXXX random]; must be unique per router.")
@_peer_key_options
@_log_format_option
@_service_options
def worker(router_addr, node, keys_dir, key, router_key, log_format, config_path, service,
           handler, workers, spares, devices, workers_per_device, policy, min_per_host,
           max_inflight, prefetch, queue_capacity, capacity_policy, max_wait,
           handler_options) -> None:
    """Run a supervisor and its workers for a router elsewhere (same code as `up`)."""
    from workerpool.supervisor import Supervisor

    cfg = _build_config(
        config_path, service, {},
        {"handler": handler, "workers": workers, "spares": spares, "devices": devices,
         "workers_per_device": workers_per_device, "policy": policy,
         "min_per_host": min_per_host, "max_inflight": max_inflight, "prefetch": prefetch,
         "queue_capacity": queue_capacity, "capacity_policy": capacity_policy,
         "max_wait": max_wait}, handler_options)
    _start_logging(log_format, cfg, "supervisor")
    worker_keys = _peer_keys(_security(keys_dir, key, router_key, base=cfg.security), "worker")
    # The random part: containers sharing the host's network share its name, and each may
    # run this as pid 1. Two supervisors of one name are one node: the second would take
    # the first's slots over.
    node = node or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"
    sup = Supervisor(cfg.services, router_addr, cfg.supervisor,
                     drain_timeout=cfg.router.drain_timeout, node=node,
                     max_message_bytes=cfg.router.max_message_bytes,
                     heartbeat_interval=cfg.router.heartbeat_interval, keys=worker_keys)
    sup.on_ready = lambda: click.echo(
        f"workerpool worker ready: {sum(s.workers for s in cfg.services)} workers -> {router_addr}")
    sup.install_signal_handlers()
    sys.exit(sup.run())


# -- status -------------------------------------------------------------------------------------
_COLUMNS = ("id", "pid", "host", "device", "memory", "state", "in_flight", "utilization",
            "batch", "completed", "errored", "restarts", "uptime")


@main.command()
@click.option("--router", "router_addr", default=DEFAULT_FRONTEND, show_default=True,
              help="The router's client (frontend) address.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status object as JSON.")
@click.option("--timeout", type=float, default=5.0, show_default=True,
              help="Seconds to wait for the router (with --watch: for one poll, at most).")
@click.option("--watch", is_flag=True,
              help="A live view redrawn every --interval until Ctrl-C; it waits out a router "
                   "that does not answer.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=None,
              help="Seconds between the polls of --watch  [default: 1].")
@_peer_key_options
def status(router_addr, as_json, timeout, watch, interval, keys_dir, key, router_key) -> None:
    """Show every worker's health and every service's load."""
    from workerpool.errors import WorkerPoolError

    if watch:
        _watch(router_addr, as_json, timeout, 1.0 if interval is None else interval,
               (keys_dir, key, router_key))
        return
    if interval is not None:
        raise click.UsageError("--interval needs --watch")
    with _client(router_addr, keys_dir, key, router_key) as c:
        try:
            st = c.status(timeout=timeout)
        except WorkerPoolError as exc:
            raise click.ClickException(
                f"no status from {router_addr}: {exc.type}: {exc.message}") from None
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    click.echo(format_status(st))


class _MissingRich(click.ClickException):
    """One line, ``Error: status --watch needs rich ...: pip install ...``, exit status 2."""

    exit_code = 2


def _watch(router_addr: str, as_json: bool, timeout: float, interval: float,
           keys: tuple) -> None:
    """``status --watch``: the live view (workerpool/watch_term.py) until Ctrl-C, exit 0."""
    from workerpool.loadtest.extra import MissingExtra
    from workerpool.watch_term import check_rich, run

    if as_json:
        raise click.UsageError("--json and --watch cannot be combined")
    try:
        check_rich()
    except MissingExtra as exc:
        raise _MissingRich(str(exc)) from None
    run(_connector(router_addr, *keys), router_addr, interval, timeout)


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Lines of a plain table: each column as wide as its widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
            for r in [headers, *rows]]


def format_status(st: dict) -> str:
    out = _table(tuple(c.upper() for c in _COLUMNS),
                 [tuple(cell(w.get(c), c, w) for c in _COLUMNS) for w in st["workers"]])
    if st.get("nodes"):
        out += _table(NODE_HEADERS, [node_cells(n) for n in st["nodes"]])
    for s in st["services"]:
        out.append(
            f"service {s['name']}: policy={s['policy']} workers={s['workers']} "
            f"spares={s.get('spares', 0)} "
            f"queued={s['queued']}/{s['queue_capacity']} in_flight={s['in_flight']} "
            f"utilization={percent(s.get('utilization'))} "
            f"completed={s['completed']} errored={s['errored']} "
            f"rejected_backpressure={s['rejected_backpressure']} expired={s['expired']} "
            f"cancelled={s['cancelled']} service_time_ms p50={ms(s['service_time_p50_ms'])} "
            f"p99={ms(s['service_time_p99_ms'])}")
    out.append(router_line(st["router"]))
    for w in st["workers"]:
        if w.get("last_error") and w["state"] in ("dead", "failed", "restarting"):
            out.append(f"{w['id']} last error: {error_line(w['last_error'])}")
    return "\n".join(out)


# -- restart ----------------------------------------------------------------------------------
@main.command()
@click.argument("worker")
@click.option("--router", "router_addr", default=DEFAULT_FRONTEND, show_default=True,
              help="The router's client (frontend) address.")
@_peer_key_options
def restart(worker, router_addr, keys_dir, key, router_key) -> None:
    """Restart WORKER (an id from `workerpool status`, e.g. default/2).

    A failed worker (setup failure, or more than max_restarts deaths within
    restart_window) is reset and started again. A running one finishes the requests it
    holds, exits, and is replaced at once.
    """
    _admin(router_addr, (keys_dir, key, router_key), "restart_worker", worker)


# -- scale ------------------------------------------------------------------------------------
@main.command()
@click.argument("service")
@click.argument("workers", type=click.IntRange(0, 1024))
@click.option("--router", "router_addr", default=DEFAULT_FRONTEND, show_default=True,
              help="The router's client (frontend) address.")
@_peer_key_options
def scale(service, workers, router_addr, keys_dir, key, router_key) -> None:
    """Set how many workers serve SERVICE, at runtime.

    Up: spares (if any) start serving at once, and new workers are started. Down: the
    idlest workers get no new requests, finish the ones they hold, then stop and leave
    the table. Spares are kept on top of WORKERS. A service run by several supervisors
    (hosts) is split evenly between them.
    """
    _admin(router_addr, (keys_dir, key, router_key), "scale", service, workers)


# -- drain ------------------------------------------------------------------------------------
@main.command()
@click.argument("worker")
@click.option("--router", "router_addr", default=DEFAULT_FRONTEND, show_default=True,
              help="The router's client (frontend) address.")
@_peer_key_options
def drain(worker, router_addr, keys_dir, key, router_key) -> None:
    """Drain WORKER: it gets no new requests, finishes the ones it holds, then stops and
    is not respawned. `workerpool restart WORKER` brings it back."""
    _admin(router_addr, (keys_dir, key, router_key), "drain_worker", worker)


def _admin(router_addr: str, keys: tuple, client_method: str, *args: Any) -> None:
    """Run one operator command through the Client; errors exit 1 as 'Type: message'.
    ``keys``: the peer key flags; --keys DIR means its admin pair."""
    from workerpool.errors import WorkerPoolError

    with _client(router_addr, *keys, role="admin") as c:
        try:
            out = getattr(c, client_method)(*args)
        except WorkerPoolError as exc:
            raise click.ClickException(f"{exc.type}: {exc.message}") from None
    click.echo(out["message"])


# -- call -------------------------------------------------------------------------------------
@main.command()
@click.argument("method")
@click.argument("payload", default="null")
@click.option("--router", "router_addr", default=DEFAULT_FRONTEND, show_default=True,
              help="The router's client (frontend) address.")
@click.option("--service", default=None, help="Service to call (default: the only one).")
@click.option("--timeout", type=click.FloatRange(0, 86400, min_open=True), default=30.0,
              show_default=True, help="Seconds before the request is abandoned.")
@_peer_key_options
def call(method, payload, router_addr, service, timeout, keys_dir, key, router_key) -> None:
    """Call METHOD with PAYLOAD (JSON; '-' reads stdin) and print the reply as JSON.

    A streaming method prints one JSON line per item as it arrives. Errors go to stderr
    as 'Type: message' and the exit status is 1.
    """
    from workerpool.errors import WorkerPoolError

    text = sys.stdin.read() if payload == "-" else payload
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.UsageError(f"PAYLOAD is not JSON: {exc}") from None
    with _client(router_addr, keys_dir, key, router_key) as c:
        try:
            for item in c.stream(method, value, service=service, timeout=timeout):
                click.echo(json.dumps(item, default=_json_default))
        except WorkerPoolError as exc:
            click.echo(f"{exc.type}: {exc.message}", err=True)
            sys.exit(1)


JSON_ARRAY_ITEMS = 1000  # arrays up to this many elements print as lists, larger as a summary


def _json_default(obj):
    """JSON for what a reply may hold beyond JSON: arrays and tensors as nested lists when
    small and real, else a summary map; anything else as its repr."""
    shape = getattr(obj, "shape", None)
    if shape is not None and hasattr(obj, "tolist") and hasattr(obj, "dtype"):
        dtype = str(obj.dtype).removeprefix("torch.")
        n = 1
        for d in shape:
            n *= int(d)
        if n <= JSON_ARRAY_ITEMS and "complex" not in dtype:
            return obj.tolist()
        kind = "torch.Tensor" if type(obj).__module__.startswith("torch") else "numpy.ndarray"
        return {"type": kind, "dtype": dtype, "shape": [int(d) for d in shape]}
    return repr(obj)


# -- keys -------------------------------------------------------------------------------------
@main.group()
def keys() -> None:
    """Make CurveZMQ key pairs for the router and its peers (docs/security.md)."""


@keys.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
def keys_init(directory) -> None:
    """Write the router's pair DIR/router.key(_secret) and one pair per role:
    DIR/clients/client, DIR/admins/admin, DIR/workers/worker. Secret files are 0600."""
    from ipc.curve import KeyFileError, init_keys

    try:
        written = init_keys(directory)
    except (KeyFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    for path in written:
        click.echo(str(path))


@keys.command("add")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("role", type=click.Choice(["client", "admin", "worker"]))
@click.argument("name")
def keys_add(directory, role, name) -> None:
    """Add the pair NAME.key(_secret) in ROLE's folder of DIR. The router accepts it
    within 10 s, or at once on SIGHUP; give the peer NAME.key_secret and router.key.
    Deleting NAME.key from the folder revokes it the same way."""
    from ipc.curve import KeyFileError, add_key

    try:
        written = add_key(directory, role, name)
    except (KeyFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    for path in written:
        click.echo(str(path))


# -- loadtest ---------------------------------------------------------------------------------
main.add_command(loadtest)  # workerpool/loadtest/command.py


if __name__ == "__main__":
    main()
