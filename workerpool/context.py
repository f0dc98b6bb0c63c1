"""What a handler learns about the worker it runs in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class WorkerStats:
    """The worker's own count of its work, updated by the runtime as it goes.

    ``max_outstanding`` is the most requests this process ever held at once (received and
    not yet answered): with ``max_inflight=N`` the router must keep it <= N. ``batches`` and
    ``batched_requests`` count the calls of ``@batched`` methods and the requests they
    carried (their ratio is the mean batch size).
    """

    received: int = 0
    running: int = 0
    cancelled: int = 0
    max_outstanding: int = 0
    batches: int = 0
    batched_requests: int = 0


@dataclass(frozen=True)
class WorkerContext:
    """Passed to ``Handler.setup``.

    ``device`` is what to hand a framework: ``"cpu"`` or ``"cuda:0"`` (the worker sees only
    its own GPU, so it is always index 0 inside the worker). ``physical_device`` is the
    host's id for it (``"cpu"``, ``"1"``, a UUID).
    """

    slot: str
    service: str
    incarnation: int
    device: str
    physical_device: str
    options: dict[str, Any] = field(default_factory=dict)
    stats: WorkerStats = field(default_factory=WorkerStats)
