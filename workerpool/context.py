"""What a handler learns about the worker it runs in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
