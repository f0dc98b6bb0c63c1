"""Configuration models: the one place where every default lives.

A pool is described by ``PoolConfig`` (router + supervisor + services), loadable from a
TOML file; CLI flags override individual fields. Models are validated at the edge, so
processes further in receive only values that already make sense.

Example TOML::

    [router]
    frontend = "tcp://127.0.0.1:5555"

    [[services]]
    name = "default"
    handler = "workerpool.handlers:Echo"
    workers = 4
    policy = "least-loaded"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workerpool.logs import LogFormat

Policy = Literal["round-robin", "least-loaded", "power-of-two"]
POLICIES: tuple[str, ...] = ("round-robin", "least-loaded", "power-of-two")
CapacityPolicy = Literal["queue", "reject"]
DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"  # `workerpool router`; `up` uses a private ipc socket
# Defaults the router's peers need before (or without) a RouterConfig: one definition each.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
DEFAULT_HEARTBEAT_INTERVAL = 1.0
DEFAULT_DRAIN_TIMEOUT = 30.0
MIN_PRIORITY, MAX_PRIORITY = 0, 1000  # request priorities: higher is served first
MAX_TIMEOUT = 86400.0  # seconds; a longer request deadline is almost surely a unit mistake

_ENDPOINT = re.compile(r"^(tcp://[^\s:]+:(\d+|\*)|tcp://\[[0-9a-fA-F:.]+\]:(\d+|\*)|ipc://\S+|inproc://\S+)$")
_HANDLER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT`` as ``(host, port)``; no host
    means 127.0.0.1. Raises ValueError saying what is wrong."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host or not set(host) <= set("0123456789abcdefABCDEF:."):
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address")
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 host in brackets, e.g. [::1]:9464")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT, :PORT or PORT with a port in 1..65535")
    if any(c.isspace() for c in host):
        raise ValueError(f"{text!r}: the host has spaces in it")
    return host or "127.0.0.1", int(port)


def format_http_address(host: str, port: int) -> str:
    """``(host, port)`` as ``parse_http_address`` reads it back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_endpoint(value: str) -> str:
    if not _ENDPOINT.match(value):
        raise ValueError(
            f"{value!r} is not a ZeroMQ endpoint (tcp://HOST:PORT, ipc://PATH or inproc://NAME)"
        )
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServiceConfig(_Model):
    """A named group of workers running one handler."""

    name: str = Field("default", description="Service name that requests address.")
    handler: str = Field(
        "workerpool.handlers:Echo", description="Handler class as 'module:Class'."
    )
    workers: int = Field(1, ge=0, le=1024, description="Worker processes for this service.")
    spares: int = Field(
        0, ge=0, le=1024, description="Extra workers kept started and set up but idle: when a "
        "worker dies a spare takes its place at once, and a new spare starts behind it.")
    devices: str = Field(
        "cpu", description="'cpu', 'auto' (all visible GPUs, else cpu) or indices like '0,1'."
    )
    workers_per_device: int | None = Field(
        None, ge=1, le=1024, description="Workers on each device of `devices` (instead of "
        "`workers`): 2 with devices '0,1' starts 4 workers, two on each GPU.")
    min_per_host: int = Field(
        0, ge=0, le=1024, description="`workerpool scale` keeps at least this many workers "
        "of the service on each supervisor (host) that runs that many: scaling down takes "
        "none below it, scaling up fills the supervisors below it first. 0: no minimum.")
    policy: Policy = Field("least-loaded", description="How the router picks a worker.")
    max_inflight: int | None = Field(
        None, ge=1, le=65536, description="Requests the router sends one worker at once. "
        "None (auto): 1, or for a handler with @batched methods twice their largest "
        "max_batch_size, so that the next batch gathers in the worker while one runs.")
    prefetch: int = Field(
        1, ge=0, le=64, description="Requests the router sends a worker beyond max_inflight, "
        "held unstarted so the next one is already there when one finishes (no idle gap "
        "between requests). One held ahead is taken back and run elsewhere when another "
        "worker would otherwise sit idle. 0: none.")
    queue_capacity: int = Field(
        10000, ge=0, le=10_000_000,
        description="Requests the router holds for this service while every worker is full; "
        "beyond it a request is refused with BackpressureError.",
    )
    capacity_policy: CapacityPolicy = Field(
        "queue", description="When every worker is at max_inflight: 'queue' (wait up to "
        "max_wait) or 'reject' (BackpressureError at once).")
    max_wait: float | None = Field(
        30.0, gt=0, le=86400, description="Longest a request waits in the queue before it is "
        "refused with BackpressureError (None: until its own timeout).")
    exec_timeout: float | None = Field(
        None, gt=0, le=86400, description="Longest one request may run on a worker; past it "
        "the request gets RequestTimeoutError and the worker is killed and respawned "
        "(None: no limit).")
    idempotent: bool = Field(
        False, description="Treat every request as idempotent unless it says otherwise: one "
        "whose worker dies while running it is run again on another worker.")
    max_attempts: int = Field(
        3, ge=1, le=100, description="Most times an idempotent request is started.")
    poison_threshold: int = Field(
        2, ge=1, le=100, description="Workers a request may kill before it is failed with "
        "PoisonedRequestError and never retried.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Passed to the handler's setup() as context.options."
    )

    @model_validator(mode="after")
    def _one_worker_count(self) -> ServiceConfig:
        if self.workers_per_device is not None and "workers" in self.model_fields_set:
            raise ValueError("set `workers` or `workers_per_device`, not both")
        if self.spares and self.workers == 0 and self.workers_per_device is None:
            raise ValueError("spares stand in for workers: a service with spares needs "
                             "at least one worker")
        return self

    def resolve_workers(self) -> None:
        """Turn ``workers_per_device`` into ``workers`` for the devices found now (``auto``
        is resolved here, without touching CUDA). Raises ValueError past 1024 workers."""
        if self.workers_per_device is None:
            return
        from workerpool.devices import parse_devices

        n = self.workers_per_device * len(parse_devices(self.devices))
        self.workers_per_device = None
        self.workers = n

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("service names are 1-64 of letters, digits, '_', '.', '-'")
        return v

    @field_validator("handler")
    @classmethod
    def _handler(cls, v: str) -> str:
        if not _HANDLER.match(v):
            raise ValueError(f"handler {v!r} must look like 'package.module:ClassName'")
        return v

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: str) -> str:
        from workerpool.devices import parse_devices

        parse_devices(v, discover=False)  # raises ValueError on bad syntax
        return v


@dataclass(frozen=True)
class Timings:
    """The fixed timings of every process, in seconds: each one a trade-off that was
    measured or reasoned about once, not something a deployment tunes. The tunable ones
    are fields of the models below (heartbeats, grace periods, backoffs, timeouts)."""

    # -- router -------------------------------------------------------------------------------
    liveness_tick: float = 0.1
    """Between two checks for hung workers and silent supervisors."""
    death_grace: float = 0.003
    """A death notice waits this long for the dead worker's last replies: the supervisor's
    socket can overtake the worker's."""
    unreachable_grace: float = 1.0
    """Once a worker is unroutable, how long its supervisor has to say how it died before
    its requests are answered anyway."""
    kill_grace: float = 5.0
    """A kill the router asked a supervisor for may take this long before the worker is
    declared dead without its death notice."""
    drain_linger: float = 0.2
    """After the last final reply of a drain, how long the router lets replies leave its
    sockets before it exits."""
    drain_poll: float = 0.02
    """Between two checks of a drain (the router's or a leaving supervisor's) for the
    requests it waits for."""
    unreachable_poll: float = 0.05
    """Between two checks while a worker is unreachable and its death notice awaited."""
    shed_log_every: float = 10.0
    """Requests a service refuses for capacity (BackpressureError) are summed in one log
    line at most this often, never one line per request: a flood must not become a log
    storm. The first refusals after a quiet spell are logged within ``shed_check``."""
    shed_check: float = 1.0
    """Between two looks at the services' refusal counters for that line."""
    vouch_wait: float = 5.0
    """How long a worker's READY waits for its supervisor to vouch for it (SLOT started, or
    a HELLO): the supervisor's socket may be behind the worker's, most of all when the
    router restarted. A real worker whose READY expired registers again on its next
    heartbeat."""
    forget_lost_node: float = 600.0
    """How long the router keeps a lost supervisor (STATUS ``nodes``) and its failed slots
    after it last heard from it. Long enough to see what happened and for a partition to
    heal; short enough that nodes gone for good (a scaled-down cluster) leave the tables.
    One that speaks after that is asked to describe itself again, as a new one."""

    # -- client -------------------------------------------------------------------------------
    ping_interval: float = 1.0
    """Between a client's pings of the router while requests are outstanding: how fast a
    client notices that the router restarted and lost its requests."""
    local_grace: float = 0.25
    """A client fails a request locally this long after its deadline when the router's
    RequestTimeoutError has not come (router gone, or stalled)."""

    # -- worker -------------------------------------------------------------------------------
    unsent_wait: float = 10.0
    """How long a stopping worker waits for ZeroMQ to finish reading a zero-copy reply."""

    # -- supervisor ---------------------------------------------------------------------------
    router_min_uptime: float = 2.0
    """A router that dies sooner than this after its start failed to start: the supervisor
    stops instead of respawning it in a loop."""
    shm_sweep_interval: float = 10.0
    """Between sweeps of shared-memory segments left by dead processes."""
    router_exit_wait: float = 2.0
    """When the pool stops, how long the router under ``up`` has to exit by itself after
    its drain before it is sent SIGTERM."""


TIMINGS = Timings()


#: Service fields the router applies (the rest only matter to the supervisor).
ROUTED_FIELDS = ("policy", "queue_capacity", "max_inflight", "prefetch", "capacity_policy",
                 "max_wait", "exec_timeout", "idempotent", "max_attempts", "poison_threshold",
                 "min_per_host")


def routed_defaults() -> dict[str, Any]:
    """ServiceConfig's defaults for the fields the router applies: one source of truth."""
    return {k: ServiceConfig.model_fields[k].default for k in ROUTED_FIELDS}


class RouterConfig(_Model):
    """The router process: where it listens and how it treats traffic."""

    frontend: str = Field(DEFAULT_FRONTEND, description="Address clients connect to.")
    backend: str | None = Field(
        None, description="Address workers and supervisors connect to (up picks a free one)."
    )
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES, ge=1024,
        description="Largest message accepted; bigger peers are dropped."
    )
    max_meta_bytes: int = Field(
        655360, ge=1024, le=2**24, description="Largest meta frame a client may send; a larger "
        "one is refused (ProtocolError meta-too-large) before it is decoded. The default holds "
        "the largest ping the Python clients send (65,536 request ids); decoding one costs at "
        "most about 20 times its size (13 MiB at the default), freed at once.")
    max_buffer_frames: int = Field(
        1024, ge=0, le=2**20, description="Buffer frames (frames after the body) a client's "
        "message may carry; the rest of a longer message is received and let go unread, and "
        "the message is refused (ProtocolError too-many-frames). The router receives each "
        "frame it accepts from Python, 1-2 µs apiece, so one message of this many holds its "
        "loop about 1.5 ms at the default.")
    max_client_inflight: int = Field(
        4096, ge=1, le=10_000_000, description="Requests one client connection may hold in "
        "the router at once (queued or running); one more is refused with BackpressureError "
        "code 'client-limit'. The default leaves room for what callers do with one Client: "
        "16x what the bundled drivers keep outstanding (bench/throughput.py, "
        "bench/cpu_per_request.py: 256), twice the 2,000 futures the dispatch tests submit "
        "at once. It is well under the default queue_capacity (10,000), so one connection "
        "cannot fill a service's queue; together with the queue's turns between "
        "connections (router.queue), that is the share rule: no extra rule applies when "
        "the queue is full.")
    max_unread_replies: int = Field(
        4096, ge=1, le=10_000_000, description="Replies the router queues to one client "
        "connection that does not read them (its frontend send high-water mark, in "
        "messages); one more and the client is cut off: what it waits for is dropped and "
        "its requests are refused for slow_client_cutoff. As many as max_client_inflight, "
        "so the final replies of everything a connection may hold fit even if they all "
        "come before ZeroMQ writes any. Worst case in bytes: this many times the largest "
        "reply a worker sends (up to max_message_bytes), per connection that stops "
        "reading: 4 MiB for 1 KiB replies, 4 GiB for 1 MiB ones, so lower it for services "
        "with large replies. The Python clients read into their own memory at once, so "
        "only a stopped or hostile process reaches it.")
    max_unread_messages: int = Field(
        1000, ge=1, le=10_000_000, description="Messages from one client connection that "
        "wait for the router to read them (its frontend receive high-water mark); past it "
        "ZeroMQ stops reading that connection and the client's sends wait in its own "
        "memory, so a client sending faster than the router reads does not grow the "
        "router's. A BUNDLE counts as one. Workers and supervisors are not limited: their "
        "replies must never wait behind a client's.")
    slow_client_cutoff: float = Field(
        10.0, ge=0, le=3600, description="Seconds a client that did not read its replies "
        "(max_unread_replies) has every request refused with BackpressureError code "
        "'not-reading', so it cannot keep workers busy for replies it never takes.")
    drain_timeout: float = Field(
        DEFAULT_DRAIN_TIMEOUT, ge=0, le=86400,
        description="On shutdown, how long in-flight requests may run before they are failed.",
    )
    heartbeat_interval: float = Field(
        DEFAULT_HEARTBEAT_INTERVAL, gt=0, le=60,
        description="Seconds between heartbeats from workers and supervisors."
    )
    heartbeat_liveness: int = Field(
        3, ge=1, le=100, description="Heartbeats missed before a worker is killed as hung "
        "(stopped, or stuck holding the GIL) or a supervisor's host counts as lost."
    )
    registration_grace: float = Field(
        3.0, ge=0, le=600, description="For this long after the router starts, a request for "
        "a service no supervisor or worker has described yet waits in its queue instead of "
        "failing: after a router restart they all register again within about a heartbeat.")

    metrics: str | None = Field(
        None, description="HOST:PORT (or :PORT, PORT: on 127.0.0.1) where the router serves "
        "GET /metrics (Prometheus), GET /api/status and the dashboard (GET /) over HTTP, "
        "unauthenticated and read-only. None: no listener.")

    @field_validator("frontend", "backend")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return None if v is None else _check_endpoint(v)

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: str | None) -> str | None:
        return None if v is None else format_http_address(*parse_http_address(v))


class SupervisorConfig(_Model):
    """How workers are started and restarted."""

    restart_backoff: float = Field(
        0.05, ge=0, le=60, description="Delay before the first respawn of a slot."
    )
    restart_backoff_max: float = Field(
        5.0, ge=0, le=600, description="Cap of the doubling respawn delay."
    )
    stable_after: float = Field(
        10.0, ge=0, description="Uptime after which a slot's respawn delay resets."
    )
    max_restarts: int = Field(
        3, ge=0, le=10000, description="Respawns allowed per slot within restart_window; "
        "one more death marks the slot failed (reset with `workerpool restart`).")
    restart_window: float = Field(
        60.0, gt=0, le=86400, description="Seconds over which max_restarts is counted.")
    startup_timeout: float = Field(
        120.0, gt=0, description="How long `up` waits for every worker's READY."
    )
    stop_timeout: float = Field(
        5.0, gt=0, description="After SHUTDOWN, how long a worker may take before SIGKILL."
    )


class SecurityConfig(_Model):
    """CurveZMQ keys (docs/security.md). The router reads ``keys``: its own pair and the
    public keys of each role's folder. A peer reads ``key`` (its own ``.key_secret``) and
    ``router_key`` (the router's ``.key``), or from ``keys`` the pair ``keys init`` made
    for its role."""

    keys: str | None = Field(
        None, description="Keys directory made by `workerpool keys init`.")
    key: str | None = Field(
        None, description="This peer's own secret key file (NAME.key_secret).")
    router_key: str | None = Field(
        None, description="The router's public key file (router.key).")
    insecure: bool = Field(
        False, description="Allow binding a non-loopback address without keys: anyone who "
        "reaches it may use or reshape the pool.")

    @model_validator(mode="after")
    def _one_source(self) -> SecurityConfig:
        if (self.key is None) != (self.router_key is None):
            raise ValueError("key and router_key go together")
        return self

    def peer_files(self, role: str) -> tuple[Path, Path] | None:
        """(own secret, router public) files for a peer of ``role``; None: no keys.
        ``key``/``router_key`` win over ``keys`` (a flag over the file's directory)."""
        from ipc.curve import peer_files

        if self.key is not None:
            return peer_files(key=self.key, router_key=self.router_key)
        return peer_files(keys=self.keys, role=role) if self.keys else None


GATEWAY_MIN_CONNECTIONS = 1
GATEWAY_MAX_CONNECTIONS = 64  # each is an AsyncClient, with its ZeroMQ context and I/O thread
GATEWAY_DEFAULT_CONNECTIONS = 8


class GatewayConfig(_Model):
    """The HTTP gateway (docs/http.md): `workerpool gateway --config`, and the one `up`
    runs with ``--http`` or ``listen``. The gateway's flags win over these."""

    listen: str | None = Field(
        None, description="HOST:PORT to serve HTTP on. For `up`: also run the gateway "
        "there (as --http does); unset, no gateway. For `workerpool gateway`: unset, "
        "127.0.0.1:8000.")
    tokens: str | None = Field(
        None, description="File of allowed bearer tokens, one per line; without one, 401.")
    tls_cert: str | None = Field(None, description="PEM certificate (chain): serve HTTPS.")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert.")
    timeout: float = Field(300.0, gt=0, le=86400,
                           description="Seconds a request may take when it gives no ?timeout=.")
    max_body_bytes: int = Field(64 * 2**20, ge=1,
                                description="Larger request bodies are refused with 413.")
    max_buffered: int = Field(
        64, ge=1, description="Stream items a slow HTTP reader may fall behind before its "
        "stream ends (stream-overrun).")
    router_connections: int = Field(
        GATEWAY_DEFAULT_CONNECTIONS, ge=GATEWAY_MIN_CONNECTIONS, le=GATEWAY_MAX_CONNECTIONS,
        description="Connections to the router; callers are spread over them.")
    max_inflight_per_caller: int = Field(
        0, ge=0, description="Requests one caller may have in flight (then 429); 0: no cap "
        "but the router's per connection.")
    trust_forwarded: bool = Field(
        False, description="Without tokens, a caller is the last X-Forwarded-For address.")
    insecure: bool = Field(
        False, description="Allow a non-loopback listen address without tokens.")

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewayConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self


class LoggingConfig(_Model):
    """How every process of the command logs to stderr (workerpool/logs.py)."""

    format: LogFormat = Field(
        "text", description="'text': one human-readable line per record (tracebacks on the "
        "lines after it); 'json': one JSON object per line, with the record's fields.")


class PoolConfig(_Model):
    """Everything `workerpool up` runs: one router, one supervisor, its services."""

    router: RouterConfig = Field(default_factory=RouterConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    services: list[ServiceConfig] = Field(default_factory=lambda: [ServiceConfig()])
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _unique_services(self) -> PoolConfig:
        names = [s.name for s in self.services]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"service names must be unique; repeated: {', '.join(dupes)}")
        return self

    @classmethod
    def load(cls, path: str | Path | None = None) -> PoolConfig:
        """Read a TOML file (or return defaults when ``path`` is None)."""
        if path is None:
            return cls()
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return cls.model_validate(data)

    def service(self, name: str | None) -> ServiceConfig:
        """The service ``name`` (created if missing), or the only one when ``name`` is None."""
        if name is None:
            if len(self.services) != 1:
                raise ValueError("several services are configured: name one with --service")
            return self.services[0]
        for s in self.services:
            if s.name == name:
                return s
        svc = ServiceConfig(name=name)
        self.services = [*self.services, svc]
        return svc
