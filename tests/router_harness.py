"""Drive the router's core with plain frames, a recording outbox and a fake clock: no
sockets, no sleeps, no threads."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

from ipc import protocol
from ipc.errors import from_wire
from ipc.protocol import Kind
from router.core import Delivery, RouterCore
from workerpool.config import RouterConfig


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Sent:
    side: str  # "client" or "backend"
    peer: bytes
    kind: Kind
    req_id: int
    meta: dict
    body: object


@dataclass
class RecordingOutbox:
    """Every message the core sends, decoded, a BUNDLE's one by one; ``wire`` has one
    ``(side, peer, messages)`` per message that went on the wire. Peers in
    ``unreachable`` are gone; clients in ``not_reading`` have a full send queue."""

    sent: list[Sent] = field(default_factory=list)
    wire: list[tuple[str, bytes, int]] = field(default_factory=list)
    unreachable: set[bytes] = field(default_factory=set)
    not_reading: set[bytes] = field(default_factory=set)

    def _record(self, side: str, peer: bytes, frames: list) -> Delivery:
        if peer in self.unreachable:
            return Delivery.GONE
        if peer in self.not_reading:
            return Delivery.FULL
        if protocol.unpack_header(frames[0])[0] is Kind.BUNDLE:
            assert len(frames) == 1
            messages = [[head] for head in protocol.unbundle(frames[0])]
        else:
            messages = [frames]
        self.wire.append((side, peer, len(messages)))
        for message in messages:
            self._decode(side, peer, message)
        return Delivery.SENT

    def _decode(self, side: str, peer: bytes, frames: list) -> None:
        kind, req_id, meta_frame, body_frame, _ = protocol.split(frames)
        meta = protocol.unpack_meta(meta_frame)
        body = msgpack.unpackb(body_frame) if body_frame else None
        self.sent.append(Sent(side, peer, kind, req_id, meta, body))

    def to_client(self, client: bytes, frames: list) -> Delivery:
        return self._record("client", client, frames)

    def to_backend(self, ident: bytes, frames: list) -> bool:
        return bool(self._record("backend", ident, frames))

    def take(self) -> list[Sent]:
        out, self.sent = self.sent, []
        return out

    def to(self, peer: bytes) -> list[Sent]:
        return [s for s in self.sent if s.peer == peer]

    def errors_to(self, client: bytes) -> list:
        return [from_wire(s.body) for s in self.to(client) if s.kind is Kind.ERROR]


class Harness:
    """A router core with one supervisor ``sup`` and helpers that speak its protocol."""

    def __init__(self, outbox: RecordingOutbox | None = None, **config: object) -> None:
        self.clock = FakeClock()
        self.out = RecordingOutbox() if outbox is None else outbox
        cfg = {"frontend": "tcp://127.0.0.1:1", "backend": "tcp://127.0.0.1:2",
               "registration_grace": 0.0, **config}
        self.core = RouterCore(RouterConfig(**cfg), None, self.out, self.clock)
        self.incarnations: dict[str, int] = {}

    # -- the backend ---------------------------------------------------------------------------
    def backend(self, ident: bytes, kind: Kind, meta: dict | None = None, req_id: int = 0,
                body: bytes = b"") -> None:
        self.core.on_backend([ident, *protocol.encode(kind, req_id, meta, body)])

    def hello(self, service: str = "default", workers: int = 2, spares: int = 0,
              sup: bytes = b"sup", node: str | None = None, host: str | None = None,
              **settings: object) -> None:
        """The supervisor's HELLO. Without ``prefetch`` among ``settings``, 0: a worker is
        sent only what it runs, so most tests count dispatches without the one held ahead.
        With ``node``, its slots are ``service/node/i``, as under `workerpool worker`."""
        settings.setdefault("prefetch", 0)
        prefix = f"{service}/" if node is None else f"{service}/{node}/"
        slots = [{"slot": f"{prefix}{i}", "service": service} for i in range(workers + spares)]
        described = {k: v for k, v in (("node", node), ("host", host)) if v is not None}
        self.backend(sup, Kind.HELLO, {**described,
                                       "services": [{"name": service, "workers": workers,
                                                     "spares": spares, **settings}],
                                       "slots": slots})

    def ready(self, slot: str, capacity: int = 1, incarnation: int = 1,
              methods: tuple = ("echo",), vouch: bool = True) -> bytes:
        """Register a worker; first, as its supervisor does, vouch for it (SLOT started)."""
        ident = f"{slot}#{incarnation}".encode()
        known = self.core.registry.slots.get(slot)
        if vouch and known is not None and known.owner is not None \
                and known.incarnation < incarnation:
            self.backend(known.owner, Kind.SLOT, {"slot": slot, "service": known.service,
                                                  "incarnation": incarnation, "event": "started",
                                                  "pid": 1000 + incarnation})
        self.incarnations[slot] = incarnation
        self.backend(ident, Kind.READY, {"slot": slot, "incarnation": incarnation,
                                         "service": slot.partition("/")[0],
                                         "capacity": capacity, "pid": 1000 + incarnation,
                                         "methods": list(methods)})
        return ident

    def slot_event(self, slot: str, event: str, incarnation: int | None = None,
                   sup: bytes = b"sup", **extra: object) -> None:
        inc = self.incarnations.get(slot, 1) if incarnation is None else incarnation
        self.backend(sup, Kind.SLOT, {"slot": slot, "service": slot.partition("/")[0],
                                      "incarnation": inc, "event": event, **extra})

    def reply(self, ident: bytes, rid: int, value: object = None, kind: Kind = Kind.RESULT) -> None:
        self.backend(ident, kind, req_id=rid, body=msgpack.packb(value))

    # -- the frontend --------------------------------------------------------------------------
    def request(self, client: bytes, req_id: int, method: str = "echo", payload: object = None,
                **meta: object) -> None:
        self.core.on_frontend([client, *protocol.encode(
            Kind.REQUEST, req_id, {"method": method, **meta}, msgpack.packb(payload))])

    def client_msg(self, client: bytes, kind: Kind, req_id: int, meta: dict | None = None) -> None:
        self.core.on_frontend([client, *protocol.encode(kind, req_id, meta)])

    # -- time ------------------------------------------------------------------------------------
    def tick(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.core.tick()

    def dispatched_to(self, ident: bytes) -> list[int]:
        """Router request ids sent to worker ``ident`` so far."""
        return [s.req_id for s in self.out.to(ident) if s.kind is Kind.REQUEST]
