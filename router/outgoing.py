"""The core's sends, collected per peer while the loop handles one batch, and sent at the
end of it as few messages as ``protocol.pack`` allows (BUNDLEs, docs/protocol.md 2.6).

::

    core.to_client / to_backend / dispatch --frames, tag--> Outgoing
        batch open, one frame:        pending[peer] += (head, tag)
        several frames, ``now``, or no batch open:
                                      pending[peer] sent first, then the frames at once
    end of the batch (the loop's batch of messages, a tick) --> flush: each peer's heads
        packed and sent, in order --a send that failed--> failed(to_client, peer, tags, why)

Why: a message costs each peer a ZeroMQ call, a wake-up of ZeroMQ's I/O thread and, with
CURVE, an encryption, whatever its size; when queues are deep, the replies and dispatches
that one batch produces for one peer cost about what one of them did. When: only what one
batch (at most ``router.BATCH`` messages, about ``router.BATCH_SECONDS``) or one tick
produced, so a lone message goes alone and nothing waits beyond the end of the loop's
pass. Only sending happens here; what a failed send means is the core's to decide
(``failed``, with each message's ``tag``: a dispatched request, or None).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ipc import protocol
from ipc.protocol import Kind
from router.clients import Delivery

if TYPE_CHECKING:
    from router.requests import Record

Failed = Callable[[bool, bytes, list, Delivery], None]
"""``failed(to_client, peer, tags, why)``: the messages with ``tags`` (one each, in order)
could not be sent to ``peer``; ``why`` is GONE or FULL."""


class Outbox(Protocol):
    """Where messages go. A send to a client says what became of it (``Delivery``: sent,
    the client is gone, or its send queue is full); a send to the backend is False when
    the peer is unreachable."""

    def to_client(self, client: bytes, frames: list) -> Delivery: ...

    def to_backend(self, ident: bytes, frames: list) -> bool: ...


class Outgoing:
    """Sends through ``out``, holding one-frame messages per peer while a ``batch`` is
    open. Counts the BUNDLEs it sends in ``stats["bundles_sent"]``."""

    def __init__(self, out: Outbox, stats: Counter[str], failed: Failed) -> None:
        self.out = out
        self._stats = stats
        self._failed = failed
        self._open = 0  # batches open (nested: only the outermost flushes)
        # peer -> [(head, tag)] in the order sent; client routing ids and backend
        # identities are apart (two sockets).
        self._clients: dict[bytes, list[tuple[bytes, Record | None]]] = {}
        self._backend: dict[bytes, list[tuple[bytes, Record | None]]] = {}

    def batch(self) -> Outgoing:
        """``with outgoing.batch():`` collects one-frame messages while the block runs and
        sends them at its end. (A plain context manager, not a generator: the loop opens
        one per pass and per socket, and a generator's costs about 2 µs each time.)"""
        return self

    def __enter__(self) -> None:
        self._open += 1

    def __exit__(self, *exc: object) -> None:
        self._open -= 1
        if not self._open:
            self.flush()

    def to_client(self, client: bytes, frames: list, now: bool = False) -> Delivery | None:
        """Send (or collect) one message for ``client``. Returns what became of it when it
        went at once (``now``, several frames, or no batch open), else None: a failure
        found at flush goes to ``failed``. A message that goes at once goes after what is
        pending for the same client, and its result is the caller's to handle."""
        return self._send(True, self._clients, client, frames, None, now)

    def to_backend(self, ident: bytes, frames: list, tag: Record | None = None,
                   now: bool = False) -> Delivery | None:
        """``to_client`` for a backend peer; ``tag`` goes with the message to ``failed``."""
        return self._send(False, self._backend, ident, frames, tag, now)

    def pending(self) -> int:
        """Messages collected and not yet sent."""
        return sum(map(len, self._clients.values())) + sum(map(len, self._backend.values()))

    def flush(self) -> None:
        """Send everything collected. What handling a failure sends (a request dispatched
        elsewhere, a CANCEL) is collected and sent in the same flush."""
        self._open += 1  # so sends made by ``failed`` keep their order behind the pending
        try:
            while self._backend or self._clients:
                to_client = not self._backend
                pending = self._clients if to_client else self._backend
                peer = next(iter(pending))
                self._send_pending(to_client, peer, pending.pop(peer))
        finally:
            self._open -= 1

    def _send(self, to_client: bool, pending: dict, peer: bytes, frames: list,
              tag: Record | None, now: bool) -> Delivery | None:
        if self._open and not now and len(frames) == 1:
            held = pending.get(peer)
            if held is None:
                pending[peer] = [(frames[0], tag)]
            else:
                held.append((frames[0], tag))
            return None
        held = pending.pop(peer, None)
        if held is not None:  # the order of messages to one peer never changes
            self._send_pending(to_client, peer, held)
        return self._deliver(to_client, peer, frames)

    def _send_pending(self, to_client: bool, peer: bytes,
                      held: list[tuple[bytes, Record | None]]) -> None:
        """Send ``held`` to ``peer`` packed; from the first message that fails, every one
        after it is failed too (without trying: a peer gone or full stays so)."""
        if len(held) == 1:  # the common case when lightly loaded: no packing to do
            result = self._deliver(to_client, peer, [held[0][0]])
            if result is not Delivery.SENT:
                self._failed(to_client, peer, [held[0][1]], result)
            return
        done = 0
        for frame in protocol.pack([head for head, _ in held]):
            kind, count = protocol.unpack_header(frame)
            result = self._deliver(to_client, peer, [frame])
            if result is not Delivery.SENT:
                self._failed(to_client, peer, [tag for _, tag in held[done:]], result)
                return
            if kind is Kind.BUNDLE:
                self._stats["bundles_sent"] += 1
                done += count
            else:
                done += 1

    def _deliver(self, to_client: bool, peer: bytes, frames: list) -> Delivery:
        if to_client:
            result = self.out.to_client(peer, frames)
            if isinstance(result, Delivery):
                return result
        else:
            result = self.out.to_backend(peer, frames)
        return Delivery.SENT if result else Delivery.GONE  # an outbox may answer a bool
