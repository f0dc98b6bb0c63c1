"""What happens to the requests a worker held when it is lost: the retry and poison rule.

Pure functions of plain values, so the rule is tested without a router. A worker runs
what it holds in dispatch order, so when it dies only the oldest request had started,
plus the batch it said it started (STARTED); the rest never ran and go back to the queue
whatever their idempotency. A request that was running is run again only if it is
idempotent, streamed nothing yet and has attempts left; once it has killed
``poison_threshold`` workers it is refused as poisoned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ipc.errors import PoisonedRequestError, WorkerCrashedError, WorkerPoolError
from router.requests import Record
from router.service import ServiceSettings


def running_when_lost(held: Sequence[Record], started: Iterable[int], crashed: bool,
                      running: bool) -> set[int]:
    """Ids of the requests in ``held`` (sorted by dispatch time) that were running when
    their worker was lost. ``crashed``: it died rather than left; ``running``: it was
    still running its oldest request (False when it left after answering that itself)."""
    if not (crashed and running and held):
        return set()
    return {held[0].rid, *started}


def crash_outcome(rec: Record, settings: ServiceSettings | None,
                  where: str, worker: str) -> WorkerPoolError | None:
    """The final error for ``rec``, whose worker died running it (``rec.starts`` already
    counts this death), or None to run it again. ``where`` says what happened."""
    s = settings
    if s is not None and rec.starts >= s.poison_threshold:
        return PoisonedRequestError(
            f"{where}; it has now killed {rec.starts} workers "
            f"(poison_threshold={s.poison_threshold}) and will not be retried",
            worker=worker, retryable=False)
    if s is not None and rec.idempotent and not rec.streamed and rec.starts < s.max_attempts:
        return None
    why = ("" if not rec.idempotent else
           "; partial replies were already sent" if rec.streamed else
           f"; it was started {rec.starts} times (max_attempts)")
    return WorkerCrashedError(where + why, worker=worker)
