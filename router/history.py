"""The dashboard's recent past (``GET /api/history``): a bounded ring of compact samples and a
bounded list of worker deaths, built from the snapshots the listener gets.

::

    listener thread (router.listener), between requests, every SAMPLE_INTERVAL s:
        Snapshots.get() --> History.record(snap, wall time of snap)
                              | rates, latency quantiles:  previous snapshots' counters
                              | deaths: restart counters that rose since the last sample
                              v
                            ring of samples (SAMPLES), deaths (MAX_DEATHS)
    listener thread, GET /api/history: History.export(now) --> JSON

Nothing here runs on the poll loop, which only publishes a snapshot when asked, as for a
scrape; the ring is written and read by the listener thread alone. Every decision (what a
sample holds, which snapshots count, when a death is new, what is dropped) is a plain
function of snapshots and of times given by the caller, so the tests drive it with plain
values and no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from router.metrics import CANCELLED, DROPPED, OK, ServiceFigures, Snapshot

SAMPLE_INTERVAL = 1.0
"""Seconds between two samples: the resolution of every chart."""
SAMPLES = 600
"""Samples kept: 10 minutes at SAMPLE_INTERVAL. A sample with one service is about 150
bytes of JSON."""
MIN_GAP = 0.5 * SAMPLE_INTERVAL
"""A snapshot taken less than this long after the last sample's is not recorded: samples
stay about SAMPLE_INTERVAL apart whoever hands them in."""
LATENCY_WINDOW = 5
"""Latency quantiles are over the requests that ended in the last this many samples: one
second holds too few requests at a low rate to say anything."""
MAX_DEATHS = 500
"""Deaths kept (each at most SAMPLES long); a crash loop cannot grow the list further."""
ERROR_CHARS = 300
"""A death's ``last_error`` is cut to its last this many characters (a traceback's end)."""

DeathKey = tuple[str, str, str]  # (service, worker, cause)


def rate(before: int, after: int, seconds: float) -> float:
    """Events per second between two readings of a counter ``seconds`` apart; 0 when the
    counter went back (a slot removed, then added again)."""
    return round(max(0, after - before) / seconds, 3) if seconds > 0 else 0.0


def outcome_counts(fig: ServiceFigures) -> tuple[int, int]:
    """(ok, errors) of a service's requests so far: final replies that were results, and
    those that were errors (admission refusals included). Cancelled and dropped requests
    got no reply and are neither."""
    ok = errors = 0
    for _method, outcome, n in fig.requests:
        if outcome == OK:
            ok += n
        elif outcome not in (CANCELLED, DROPPED):
            errors += n
    return ok, errors


def duration_counts(fig: ServiceFigures) -> tuple[int, ...]:
    """A service's request duration bucket counts, summed over its methods (they share
    their bounds, ``router.metrics.SECONDS_BUCKETS``)."""
    total: list[int] = []
    for _method, h in fig.durations:
        if not total:
            total = [0] * len(h.counts)
        for i, n in enumerate(h.counts):
            total[i] += n
    return tuple(total)


def quantile(bounds: tuple[float, ...], counts: Iterable[int], q: float) -> float | None:
    """The ``q`` quantile of values counted per bucket (``counts``: per bucket, not
    cumulative, the last one above every bound), interpolated within its bucket as
    Prometheus' ``histogram_quantile`` does; the highest bound for one above them all; None
    for no values."""
    counts = list(counts)
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n > 0 and seen + n >= rank:
            if i >= len(bounds):
                return bounds[-1] if bounds else None
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / n
        seen += n
    return bounds[-1] if bounds else None


def counts_between(older: tuple[int, ...], newer: tuple[int, ...]) -> tuple[int, ...]:
    """What each bucket counted from ``older`` to ``newer`` (empty tuples: nothing yet)."""
    if not older:
        return newer
    if len(older) != len(newer):
        return ()
    return tuple(max(0, b - a) for a, b in zip(older, newer, strict=True))


def new_deaths(before: Mapping[DeathKey, int], after: Mapping[DeathKey, int]
               ) -> list[tuple[DeathKey, int]]:
    """The deaths counted in ``after`` and not in ``before`` (restart counters by service,
    worker and cause), as (key, how many), in ``after``'s order."""
    return [(key, n - before.get(key, 0)) for key, n in after.items() if n > before.get(key, 0)]


class History:
    """The ring of samples and the list of deaths, kept by one thread."""

    def __init__(self, samples: int = SAMPLES, max_deaths: int = MAX_DEATHS) -> None:
        self._samples: deque[dict] = deque(maxlen=samples)
        self._deaths: deque[dict] = deque(maxlen=max_deaths)
        self._last_taken: float | None = None  # monotonic time of the last recorded snapshot
        self._last_outcomes: dict[str, tuple[int, int]] = {}
        # Each service's duration bucket counts at the last LATENCY_WINDOW samples.
        self._durations: deque[dict[str, tuple[int, ...]]] = deque(maxlen=LATENCY_WINDOW)
        self._restarts: dict[DeathKey, int] = {}

    def record(self, snap: Snapshot, wall: float) -> bool:
        """Add a sample of ``snap``, whose ``taken_at`` is the wall-clock time ``wall``;
        False (nothing recorded) when it is the last sample's snapshot again or less than
        MIN_GAP newer."""
        if self._last_taken is not None and snap.taken_at - self._last_taken < MIN_GAP:
            return False
        seconds = None if self._last_taken is None else snap.taken_at - self._last_taken
        figures = {fig.name: fig for fig in snap.services}
        durations = {name: duration_counts(fig) for name, fig in figures.items()}
        oldest = self._durations[0] if self._durations else None
        services = {}
        for row in snap.status.get("services", ()):
            name = row["name"]
            point = {"queued": row.get("queued"), "in_flight": row.get("in_flight"),
                     "requests_per_s": None, "errors_per_s": None, "p50_s": None, "p99_s": None}
            fig = figures.get(name)
            if fig is not None:
                ok, errors = outcome_counts(fig)
                before = self._last_outcomes.get(name)
                if seconds is not None and before is not None:
                    point["requests_per_s"] = rate(before[0], ok, seconds)
                    point["errors_per_s"] = rate(before[1], errors, seconds)
                self._last_outcomes[name] = (ok, errors)
                if oldest is not None:
                    window = counts_between(oldest.get(name, ()), durations[name])
                    bounds = fig.durations[0][1].bounds if fig.durations else ()
                    point["p50_s"] = _rounded(quantile(bounds, window, 0.50))
                    point["p99_s"] = _rounded(quantile(bounds, window, 0.99))
            services[name] = point
        restarts = {(svc, worker, cause): n for svc, worker, cause, n in snap.restarts}
        sample = {"t": round(wall, 3), "restarts": sum(restarts.values()), "services": services}
        errors_by_worker = {row["id"]: row.get("last_error")
                            for row in snap.status.get("workers", ())}
        deaths = [{"t": sample["t"], "service": svc, "worker": worker, "cause": cause,
                   "count": n, "last_error": _tail(errors_by_worker.get(worker))}
                  for (svc, worker, cause), n in new_deaths(self._restarts, restarts)]
        self._samples.append(sample)
        self._deaths.extend(deaths)
        first = self._samples[0]["t"]
        while self._deaths and self._deaths[0]["t"] < first:
            self._deaths.popleft()  # older than every sample: off every chart
        self._last_taken = snap.taken_at
        self._durations.append(durations)
        self._restarts = restarts
        return True

    def export(self, now: float) -> dict:
        """The ``/api/history`` object as of wall-clock time ``now`` (docs/operations.md,
        "Dashboard")."""
        return {"interval": SAMPLE_INTERVAL, "span": self._samples.maxlen * SAMPLE_INTERVAL,
                "now": round(now, 3), "samples": list(self._samples),
                "deaths": list(self._deaths)}


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)  # a microsecond


def _tail(text: object) -> str | None:
    if not isinstance(text, str):
        return None
    text = text.strip()
    return text if len(text) <= ERROR_CHARS else "…" + text[-ERROR_CHARS:]
