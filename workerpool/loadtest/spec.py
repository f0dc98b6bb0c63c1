"""What one load test does: ``LoadSpec``, validated once at the edge (the CLI), and the
parsers for the flags' small languages (durations, ``--method``, ``--inject``).

Everything past this module receives a ``LoadSpec`` that already makes sense: a mode
(open loop at ``rate`` or closed loop at ``concurrency``), an end (``duration`` or
``requests``), the method mix, the payload and the faults to inject.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workerpool.config import DEFAULT_FRONTEND, MAX_PRIORITY, MAX_TIMEOUT, MIN_PRIORITY, _check_endpoint

FAULT_KINDS = ("kill", "stop", "restart")
"""``kill``: SIGKILL a worker's pid (as ``kill -9 PID`` from ``workerpool status``);
``stop``: SIGSTOP it (``kill -STOP PID``), leaving it to the pool's hang detection;
``restart``: ``workerpool restart WORKER`` (ADMIN through the router)."""

MAX_PROCS = 64
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)?\s*$")
_METHOD = re.compile(r"^(?:(?P<service>[A-Za-z0-9_.-]{1,64}):)?(?P<method>[A-Za-z_]\w*)"
                     r"(?:=(?P<weight>\d+(?:\.\d*)?|\.\d+))?$")
_UNIT = {None: 1.0, "s": 1.0, "ms": 1e-3, "m": 60.0}


def parse_seconds(text: str) -> float:
    """``"5"``, ``"5s"``, ``"250ms"``, ``"2m"`` -> seconds. Raises ValueError."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 5, 5s, 250ms, 2m)")
    return float(m.group(1)) * _UNIT[m.group(2)]


class MethodMix(BaseModel):
    """One entry of the method mix: requests go to ``method`` of ``service`` with
    probability ``weight / sum(weights)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    service: str | None = None
    weight: float = Field(1.0, gt=0)

    @property
    def label(self) -> str:
        return f"{self.service}:{self.method}" if self.service else self.method


def parse_method(text: str, default_service: str | None = None) -> MethodMix:
    """``[SERVICE:]METHOD[=WEIGHT]``, e.g. ``echo``, ``echo=3``, ``gpu:infer=0.5``."""
    m = _METHOD.match(text.strip())
    if not m:
        raise ValueError(f"--method {text!r}: expected [SERVICE:]METHOD[=WEIGHT], e.g. echo=3 "
                         f"or gpu:infer")
    weight = float(m.group("weight")) if m.group("weight") else 1.0
    if weight <= 0:
        raise ValueError(f"--method {text!r}: the weight must be > 0")
    return MethodMix(method=m.group("method"), service=m.group("service") or default_service,
                     weight=weight)


class Fault(BaseModel):
    """One injected fault: ``kind`` against a random worker ``at`` seconds into the run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["kill", "stop", "restart"]
    at: float = Field(ge=0)


def parse_inject(text: str) -> list[Fault]:
    """``"kill:5s,stop:10s"`` -> faults in time order. Raises ValueError naming the bad part."""
    faults = []
    for part in text.split(","):
        part = part.strip()
        kind, sep, when = part.partition(":")
        if not sep or not kind or not when:
            raise ValueError(f"--inject {part!r}: expected KIND:SECONDS, e.g. kill:5s "
                             f"(kinds: {', '.join(FAULT_KINDS)})")
        if kind not in FAULT_KINDS:
            raise ValueError(f"--inject {part!r}: unknown kind {kind!r}; kinds: "
                             f"{', '.join(FAULT_KINDS)}")
        try:
            at = parse_seconds(when)
        except ValueError as exc:
            raise ValueError(f"--inject {part!r}: {exc}") from None
        faults.append(Fault(kind=kind, at=at))
    return sorted(faults, key=lambda f: f.at)


def parse_payload(text: str) -> Any:
    """``--payload`` JSON text -> the value sent as every request's payload."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--payload is not JSON: {exc}") from None


class LoadSpec(BaseModel):
    """One load test. Exactly one of ``rate`` (open loop) and ``concurrency`` (closed
    loop); at most one of ``duration`` and ``requests`` (default: 10 s)."""

    model_config = ConfigDict(extra="forbid")

    router: str = DEFAULT_FRONTEND
    methods: list[MethodMix] = Field(default_factory=lambda: [MethodMix(method="echo")],
                                     min_length=1)
    rate: float | None = Field(None, gt=0, le=10_000_000,
                               description="Open loop: requests per second offered.")
    arrival: Literal["constant", "poisson"] = "constant"
    concurrency: int | None = Field(None, ge=1, le=1_000_000,
                                    description="Closed loop: requests kept outstanding.")
    duration: float | None = Field(None, gt=0, le=7 * 86400)
    requests: int | None = Field(None, ge=1)
    warmup: float = Field(0.0, ge=0, description="Seconds run first and left out of the figures.")
    payload: Any = None
    payload_size: int | None = Field(None, ge=0, le=2**31)
    payload_kind: Literal["bytes", "numpy"] | None = Field(
        None, description="With payload_size: random bytes (default) or a numpy uint8 array.")
    timeout: float = Field(30.0, gt=0, le=MAX_TIMEOUT, description="Per-request deadline (s).")
    priority: int = Field(0, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    idempotent: bool | None = None
    procs: int = Field(1, ge=1, le=MAX_PROCS)
    faults: list[Fault] = Field(default_factory=list)
    interval: float | None = Field(None, gt=0, le=60,
                                   description="Timeline bucket in seconds (default: about 1/60 of the run).")
    seed: int | None = None
    key: str | None = Field(None, description="This client's .key_secret (CURVE), with router_key.")
    router_key: str | None = Field(None, description="The router's public .key (CURVE).")
    admin_key: str | None = Field(
        None, description="An admin .key_secret for the fault monitor's ADMIN restarts "
        "(default: key).")

    def client_keys(self, admin: bool = False) -> dict:
        """Keyword arguments of ``Client`` for this run's keys (none: plain)."""
        own = (self.admin_key or self.key) if admin else self.key
        return {} if own is None else {"key": own, "router_key": self.router_key}

    @field_validator("router")
    @classmethod
    def _router(cls, v: str) -> str:
        return _check_endpoint(v)

    @model_validator(mode="after")
    def _consistent(self) -> LoadSpec:
        if self.rate is not None and self.concurrency is not None:
            raise ValueError("--rate (open loop) and --concurrency (closed loop) exclude each other")
        if self.rate is None and self.concurrency is None:
            self.concurrency = 8
        if self.duration is not None and self.requests is not None:
            raise ValueError("--duration and --requests exclude each other")
        if self.duration is None and self.requests is None:
            self.duration = 10.0
        if self.arrival == "poisson" and self.rate is None:
            raise ValueError("--arrival poisson needs --rate (open loop)")
        if self.payload_kind is not None and self.payload_size is None:
            raise ValueError(f"--payload-kind {self.payload_kind} needs --payload-size")
        if self.payload_size is not None and self.payload is not None:
            raise ValueError("--payload (JSON) and --payload-size (random bytes) exclude each other")
        if self.concurrency is not None and self.concurrency < self.procs:
            raise ValueError(f"--concurrency {self.concurrency} is less than --procs {self.procs}: "
                             f"each process needs at least one outstanding request")
        if self.requests is not None and self.requests < self.procs:
            raise ValueError(f"--requests {self.requests} is less than --procs {self.procs}")
        if self.duration is not None:
            end = self.warmup + self.duration
            late = [f for f in self.faults if f.at >= end]
            if late:
                raise ValueError(f"--inject {late[0].kind}:{late[0].at:g}s is not before the end of "
                                 f"the run ({end:g}s)")
        return self

    @property
    def body_kind(self) -> Literal["json", "bytes", "numpy"]:
        """What every request carries: the JSON payload, or random bytes / a numpy array."""
        if self.payload_size is None:
            return "json"
        return self.payload_kind or "bytes"

    @property
    def mode(self) -> Literal["open", "closed"]:
        return "open" if self.rate is not None else "closed"

    def bucket(self) -> float:
        """The timeline bucket: ``interval``, or about 60 buckets over the run, at least
        0.2 s (fewer requests per bucket make its p99 its max) and at most 5 s."""
        if self.interval is not None:
            return self.interval
        total = self.warmup + (self.duration if self.duration is not None
                               else self.requests / (self.rate or 1000.0))
        return min(5.0, max(0.2, round(total / 60, 1)))
