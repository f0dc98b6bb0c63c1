"""What one load generator observed: HDR histograms, counters and a timeline.

::

    completion (intended, sent, done, method, outcome, detail, worker)
        --> Recording.add() --> latency / error_latency / send_lag histograms (µs)
                            --> errors, unanswered, workers counters
                            --> timeline bucket: sent, ok, errors, latency histogram
    Recording.to_dict() --(JSON, between processes)--> Recording.from_dict() --> merge()

Latencies are recorded in microseconds in HDR histograms (HdrHistogram, 3 significant
digits: a reported value is at most 0.1% above the true one), from 1 µs to 1 hour.
Timeline buckets use 2 digits (1%), enough for a plot and 7x smaller.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour: anything slower is recorded as one hour
DIGITS = 3
BUCKET_DIGITS = 2
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class Outcome(enum.Enum):
    """How a request ended."""

    OK = "ok"  # a RESULT or END from the router
    ERROR = "error"  # an ERROR reply (typed: WorkerCrashedError, BackpressureError, ...)
    UNANSWERED = "unanswered"  # no reply: local deadline, router restart, still outstanding


def new_histogram(digits: int = DIGITS) -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, digits)


def to_us(seconds: float) -> int:
    return min(HIGHEST_US, max(0, round(seconds * 1e6)))


def record_many(hist: HdrHistogram, values: np.ndarray) -> None:
    """``hist.record_value(v)`` for every v of ``values`` (µs, int64, within the range),
    vectorized: the same counts index arithmetic as hdrh's ``_counts_index_for``, applied
    to the whole array, added into the counts array in place. Record by record, pure
    Python costs microseconds per value, which a busy generator cannot spare."""
    if not len(values):
        return
    # bit_length(v | mask) is frexp's exponent: exact for integers below 2**53.
    bits = np.frexp((values | hist.sub_bucket_mask).astype(np.float64))[1].astype(np.int64)
    bucket = bits - hist.unit_magnitude - (hist.sub_bucket_half_count_magnitude + 1)
    sub = values >> (bucket + hist.unit_magnitude)
    index = ((bucket + 1) << hist.sub_bucket_half_count_magnitude) + sub - hist.sub_bucket_half_count
    np.add.at(np.ctypeslib.as_array(hist.counts), index, 1)
    hist.total_count += len(values)
    hist.min_value = min(hist.min_value, int(values.min()))
    hist.max_value = max(hist.max_value, int(values.max()))


def summarize(hist: HdrHistogram) -> dict[str, Any] | None:
    """count, min, mean, stddev, p50, p90, p99, p99.9 and max in milliseconds (None when
    empty), with hdrh's own definitions (a percentile is the highest value equivalent to
    the one recorded: at most 0.1% above it), computed with numpy over the counts array;
    hdrh's pure-Python iterators take a good fraction of a second per histogram."""
    n = hist.get_total_count()
    if not n:
        return None
    counts = np.ctypeslib.as_array(hist.counts)[:hist.counts_len]
    index = np.flatnonzero(counts)
    c = counts[index].astype(np.float64)
    half_mag, half = hist.sub_bucket_half_count_magnitude, hist.sub_bucket_half_count
    bucket = (index >> half_mag) - 1
    sub = (index & (half - 1)) + half
    sub = np.where(bucket < 0, sub - half, sub)
    bucket = np.maximum(bucket, 0)
    lowest = sub << (bucket + hist.unit_magnitude)
    size = np.int64(1) << (bucket + hist.unit_magnitude)
    median = (lowest + (size >> 1)).astype(np.float64)
    mean = float((c * median).sum() / n)
    std = float(np.sqrt((c * (median - mean) ** 2).sum() / n))
    cum = np.cumsum(counts[index])
    out: dict[str, Any] = {"count": n, "min": _ms(hist.get_min_value())}
    out["mean"] = round(mean / 1e3, 3)
    out["stddev"] = round(std / 1e3, 3)
    for p in PERCENTILES:
        target = max(int(p * n / 100 + 0.5), 1)
        at = int(np.searchsorted(cum, target))
        out[f"p{p:g}"] = _ms(int(lowest[at] + size[at] - 1))
    out["max"] = _ms(hist.get_max_value())
    return out


def _ms(us: float) -> float:
    return round(us / 1e3, 3)


@dataclass
class Bucket:
    """One timeline interval: requests sent in it, replies in it (by completion time),
    and the latency and failures of the requests meant to be sent in it (by intended
    time)."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    unanswered: int = 0  # by send time
    failed: int = 0  # errors and requests without a reply, by intended send time
    latency: HdrHistogram = field(default_factory=lambda: new_histogram(BUCKET_DIGITS))

    def merge(self, other: Bucket) -> None:
        self.sent += other.sent
        self.ok += other.ok
        self.errors += other.errors
        self.unanswered += other.unanswered
        self.failed += other.failed
        self.latency.add(other.latency)


class Recording:
    """Every completion of one run (or of several processes' runs, merged).

    Offsets are seconds since the run's start; a request counts in the figures when it
    was meant to be sent at or after ``warmup``.
    """

    def __init__(self, bucket: float, warmup: float, methods: list[str]) -> None:
        self.bucket = bucket
        self.warmup = warmup
        self.methods = list(methods)
        self.latency = new_histogram()  # measured requests answered with a result
        self.error_latency = new_histogram()  # measured requests answered with an error
        self.send_lag = new_histogram()  # open loop: actual send - intended send
        self.by_method = {m: new_histogram() for m in self.methods}
        self.method_errors: collections.Counter[str] = collections.Counter()
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.unanswered: collections.Counter[str] = collections.Counter()
        self.workers: collections.Counter[str] = collections.Counter()
        self.timeline: dict[int, Bucket] = {}
        self.first_send: float | None = None
        self.last_send: float | None = None
        self.last_done: float | None = None
        self._last_k = -1
        self._last_bucket = Bucket()

    # -- recording ----------------------------------------------------------------------------
    def add(self, intended: float, sent: float, done: float | None, method: int,
            outcome: Outcome, detail: str | None, worker: str | None) -> None:
        """One finished request: ``done`` is None when it was still outstanding at the end;
        ``detail`` is the error type or the reason there was no reply."""
        # The hot path of every run (a few µs per request): keep it lean.
        measured = intended >= self.warmup
        counts = self.counts
        counts["sent"] += 1
        if self.first_send is None or sent < self.first_send:
            self.first_send = sent
        if self.last_send is None or sent > self.last_send:
            self.last_send = sent
        self._bucket(sent).sent += 1
        if outcome is Outcome.UNANSWERED:
            # Warm-up or not: a request without a reply is a failure of the run.
            counts["unanswered"] += 1
            if not measured:
                counts["warmup"] += 1
                counts["unanswered_warmup"] += 1
            self.unanswered[detail or "unknown"] += 1
            self._bucket(sent).unanswered += 1
            self._bucket(intended).failed += 1
            return
        assert done is not None
        if self.last_done is None or done > self.last_done:
            self.last_done = done
        latency = to_us(done - intended)
        # The timeline shows the warm-up too (the plot shades it); the figures do not.
        if outcome is Outcome.OK:
            self._bucket(done).ok += 1
            self._bucket(intended).latency.record_value(latency)
        else:
            self._bucket(done).errors += 1
            self._bucket(intended).failed += 1
        if not measured:
            counts["warmup"] += 1
            return
        if sent != intended:  # open loop; closed loop sends at the intended time
            self.send_lag.record_value(to_us(sent - intended))
        if worker is not None:
            self.workers[worker] += 1
        if outcome is Outcome.OK:
            counts["ok"] += 1
            self.latency.record_value(latency)
            if len(self.methods) > 1:
                self.by_method[self.methods[method]].record_value(latency)
        else:
            counts["errors"] += 1
            self.errors[detail or "unknown"] += 1
            self.method_errors[self.methods[method]] += 1
            self.error_latency.record_value(latency)

    def add_many(self, items: list[tuple]) -> None:
        """``add(*item)`` for each item, with the results (nearly all of them) recorded in
        one vectorized pass: a few µs per request less than ``add``."""
        ok = [it for it in items if it[4] is Outcome.OK]
        if len(ok) < len(items):
            for it in items:
                if it[4] is not Outcome.OK:
                    self.add(*it)
        if not ok:
            return
        n = len(ok)
        a = np.array([it[:4] for it in ok], dtype=np.float64)
        intended, sent, done, method = a[:, 0], a[:, 1], a[:, 2], a[:, 3].astype(np.int64)
        lat = np.clip(np.rint((done - intended) * 1e6), 0, HIGHEST_US).astype(np.int64)
        counts = self.counts
        counts["sent"] += n
        lo, hi, last = float(sent.min()), float(sent.max()), float(done.max())
        self.first_send = lo if self.first_send is None else min(self.first_send, lo)
        self.last_send = hi if self.last_send is None else max(self.last_send, hi)
        self.last_done = last if self.last_done is None else max(self.last_done, last)
        # The timeline (warm-up included): sent by send time, ok by completion time,
        # latency by intended time.
        for when, attr in ((sent, "sent"), (done, "ok")):
            ks, cs = np.unique(self._bucket_index(when), return_counts=True)
            for k, c in zip(ks.tolist(), cs.tolist(), strict=True):
                b = self._bucket_at(k)
                setattr(b, attr, getattr(b, attr) + c)
        ki = self._bucket_index(intended)
        for k in np.unique(ki).tolist():
            record_many(self._bucket_at(k).latency, lat[ki == k])
        measured = intended >= self.warmup
        nm = int(measured.sum())
        counts["warmup"] += n - nm
        if not nm:
            return
        counts["ok"] += nm
        lat_m = lat[measured]
        record_many(self.latency, lat_m)
        lag = (sent - intended)[measured]
        lag = lag[lag != 0]  # closed loop sends at the intended time
        record_many(self.send_lag, np.clip(np.rint(lag * 1e6), 0, HIGHEST_US).astype(np.int64))
        self.workers.update(it[6] for it, m in zip(ok, measured.tolist(), strict=True)
                            if m and it[6] is not None)
        if len(self.methods) > 1:
            mm = method[measured]
            for i in np.unique(mm).tolist():
                record_many(self.by_method[self.methods[i]], lat_m[mm == i])

    def _bucket_index(self, offsets: np.ndarray) -> np.ndarray:
        return np.maximum(offsets / self.bucket, 0).astype(np.int64)

    def _bucket_at(self, k: int) -> Bucket:
        b = self.timeline.get(k)
        if b is None:
            b = self.timeline[k] = Bucket()
        return b

    def method_latency(self, method: str) -> HdrHistogram:
        """The latency histogram of one method of the mix."""
        return self.latency if len(self.methods) == 1 else self.by_method[method]

    def add_unsent(self, n: int) -> None:
        """Requests the schedule held that were never sent (the generator fell behind)."""
        self.counts["unsent"] += n

    def _bucket(self, offset: float) -> Bucket:
        k = int(offset / self.bucket) if offset > 0 else 0
        if k == self._last_k:
            return self._last_bucket
        b = self.timeline.get(k)
        if b is None:
            b = self.timeline[k] = Bucket()
        self._last_k, self._last_bucket = k, b
        return b

    # -- combining ----------------------------------------------------------------------------
    def merge(self, other: Recording) -> None:
        """Add ``other`` (another process's recording of the same run) into this one."""
        if other.bucket != self.bucket or other.methods != self.methods:
            raise ValueError("recordings of different runs cannot be merged")
        self.latency.add(other.latency)
        self.error_latency.add(other.error_latency)
        self.send_lag.add(other.send_lag)
        for m, h in other.by_method.items():
            self.by_method[m].add(h)
        for mine, theirs in ((self.method_errors, other.method_errors),
                             (self.counts, other.counts), (self.errors, other.errors),
                             (self.unanswered, other.unanswered), (self.workers, other.workers)):
            mine.update(theirs)
        for k, b in other.timeline.items():
            if k in self.timeline:
                self.timeline[k].merge(b)
            else:
                self.timeline[k] = b
        self.first_send = _min(self.first_send, other.first_send)
        self.last_send = _max(self.last_send, other.last_send)
        self.last_done = _max(self.last_done, other.last_done)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (histograms in HdrHistogram's compressed base64 form)."""
        return {
            "bucket": self.bucket, "warmup": self.warmup, "methods": self.methods,
            "latency": self.latency.encode().decode(),
            "error_latency": self.error_latency.encode().decode(),
            "send_lag": self.send_lag.encode().decode(),
            "by_method": {m: h.encode().decode() for m, h in self.by_method.items()},
            "method_errors": dict(self.method_errors), "counts": dict(self.counts),
            "errors": dict(self.errors), "unanswered": dict(self.unanswered),
            "workers": dict(self.workers),
            "timeline": [[k, b.sent, b.ok, b.errors, b.unanswered, b.failed,
                          b.latency.encode().decode()]
                         for k, b in sorted(self.timeline.items())],
            "first_send": self.first_send, "last_send": self.last_send,
            "last_done": self.last_done,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recording:
        rec = cls(float(d["bucket"]), float(d["warmup"]), list(d["methods"]))
        rec.latency = _decode(d["latency"], DIGITS)
        rec.error_latency = _decode(d["error_latency"], DIGITS)
        rec.send_lag = _decode(d["send_lag"], DIGITS)
        rec.by_method = {m: _decode(h, DIGITS) for m, h in d["by_method"].items()}
        rec.method_errors.update(d["method_errors"])
        rec.counts.update(d["counts"])
        rec.errors.update(d["errors"])
        rec.unanswered.update(d["unanswered"])
        rec.workers.update(d["workers"])
        for k, sent, ok, errors, unanswered, failed, hist in d["timeline"]:
            rec.timeline[int(k)] = Bucket(sent, ok, errors, unanswered, failed,
                                          _decode(hist, BUCKET_DIGITS))
        rec.first_send, rec.last_send = d["first_send"], d["last_send"]
        rec.last_done = d["last_done"]
        return rec


def _decode(encoded: str, digits: int) -> HdrHistogram:
    """An encoded histogram, copied into a fresh one of the usual shape (an empty
    histogram's encoding can come back with a shorter counts array)."""
    hist = new_histogram(digits)
    decoded = HdrHistogram.decode(encoded.encode())
    if decoded.get_total_count():
        hist.add(decoded)
    return hist


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)
