"""The body every request of a run carries: the ``--payload`` JSON value, or
``--payload-size`` random bytes (or a numpy ``uint8`` array of them).

The value is built once per process and sent as is with every request, so building it
costs nothing during the run. The bytes come from the run's seed: every process, and a
rerun with the same ``--seed``, sends the same bytes.
"""

from __future__ import annotations

import random
from typing import Any

from ipc import codec
from workerpool.loadtest.spec import LoadSpec


class LoadTestError(RuntimeError):
    """The load test cannot run (no router, a payload that cannot be sent, a generator
    process that failed); the message says what to change."""


def make_payload(spec: LoadSpec, seed: int) -> Any:
    """The payload for every request of ``spec``; raises LoadTestError if it cannot be sent."""
    kind = spec.body_kind
    if kind == "json":
        value = spec.payload
    else:
        data = random.Random(f"{seed}/payload").randbytes(spec.payload_size or 0)
        if kind == "bytes":
            value = data
        else:
            try:
                import numpy as np
            except ImportError:
                raise LoadTestError("--payload-kind numpy needs numpy installed") from None
            value = np.frombuffer(data, dtype=np.uint8)
    try:
        codec.dumps(value)
    except codec.PayloadError as exc:
        raise LoadTestError(f"the {kind} payload cannot be sent by workerpool's codec: {exc}") from None
    return value
