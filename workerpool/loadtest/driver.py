"""One load generator: offers its share of the load through one ``workerpool.Client`` and
records how every request ended.

::

    [sender thread]  schedule / permits --> Client.submit() --> Future
    [client I/O]     reply --> Future done --> _on_done(): stamp, classify --> completions
    [caller]         poll(): completions --> Recording + live window --> Progress

Open loop: the sender waits for each request's intended send time and sends it whatever
the server does; latency is reply time minus *intended* time, so the sender's own lag
and a server stall both show. Closed loop: ``concurrency`` permits; each reply frees one,
latency is measured from the actual send. The done-callback runs on the client's I/O
thread, so it only stamps the time and appends to a deque; the caller's thread does the
histogram work.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from workerpool.client import Client, reply_meta
from workerpool.errors import (
    ClientClosedError,
    RequestTimeoutError,
    RouterRestartedError,
    WorkerPoolError,
)
from workerpool.loadtest.payload import LoadTestError, make_payload
from workerpool.loadtest.recorder import Outcome, Recording
from workerpool.loadtest.schedule import MethodPicker, Share, arrivals
from workerpool.loadtest.spec import LoadSpec

LIVE_WINDOW = 1.0  # seconds of completions behind the live rate and p99
DRAIN_GRACE = 2.0  # seconds past the per-request timeout to wait for the last replies
_SPIN = 0.0002  # a send due sooner than this goes now: sleep() cannot wait that little

# Why a request got no reply, by the exception its Future ended with.
NO_REPLY = {
    RequestTimeoutError: "local_timeout",  # no reply by the deadline + grace: router silent
    RouterRestartedError: "router_restarted",  # lost with a router that died
    ClientClosedError: "client_closed",
}


@dataclass
class Progress:
    """A live snapshot: totals so far and the last ``LIVE_WINDOW`` seconds."""

    elapsed: float = 0.0
    sent: int = 0
    ok: int = 0
    errors: int = 0
    unanswered: int = 0
    outstanding: int = 0
    window_replies: int = 0
    window_p99_ms: float | None = None
    done: bool = False

    @property
    def rate(self) -> float:
        return self.window_replies / LIVE_WINDOW

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def combine(parts: list[Progress]) -> Progress:
        """Several processes' snapshots as one; the live p99 is the highest of theirs."""
        out = Progress(elapsed=max((p.elapsed for p in parts), default=0.0),
                       done=all(p.done for p in parts))
        for p in parts:
            out.sent += p.sent
            out.ok += p.ok
            out.errors += p.errors
            out.unanswered += p.unanswered
            out.outstanding += p.outstanding
            out.window_replies += p.window_replies
            if p.window_p99_ms is not None:
                out.window_p99_ms = max(out.window_p99_ms or 0.0, p.window_p99_ms)
        return out


class Generator:
    """Offers ``share`` of ``spec``'s load from this process."""

    def __init__(self, spec: LoadSpec, share: Share, seed: int) -> None:
        self.spec = spec
        self.share = share
        self.seed = seed
        self.payload = make_payload(spec, seed)
        self.recording = Recording(spec.bucket(), spec.warmup, [m.label for m in spec.methods])
        self.client = Client(spec.router, **spec.client_keys())
        self.t0 = 0.0
        self.error: BaseException | None = None
        self._pick = MethodPicker(spec.methods, seed, share)
        self._done: collections.deque = collections.deque()
        self._inflight: set[concurrent.futures.Future] = set()
        self._sent = 0
        self._stop = threading.Event()
        self._sender_done_at = 0.0
        self._permits: threading.Semaphore | None = None
        if spec.concurrency is not None:
            self._permits = threading.Semaphore(share.split(spec.concurrency))
        self._window: collections.deque = collections.deque()  # (done offset, latency s)
        self._sender = threading.Thread(target=self._send_loop, name="loadtest-sender",
                                        daemon=True)

    # -- control -------------------------------------------------------------------------------
    def start(self, t0: float) -> None:
        """Begin at ``t0`` (``time.monotonic()``; may be in the future to line processes up)."""
        self.t0 = t0
        self._sender.start()

    def stop(self) -> None:
        """Send nothing more (Ctrl-C); what is outstanding still gets its replies."""
        self._stop.set()

    @property
    def sending(self) -> bool:
        return self._sender.is_alive()

    def poll(self) -> Progress:
        """Move completions into the recording; the live snapshot."""
        now = time.monotonic() - self.t0
        rec = self.recording
        done, window = self._done, self._window
        batch = [done.popleft() for _ in range(len(done))]
        rec.add_many(batch)
        window.extend((it[2], it[2] - it[0]) for it in batch if it[4] is Outcome.OK)
        while window and window[0][0] < now - LIVE_WINDOW:
            window.popleft()
        p99 = None
        if window:
            lat = sorted(x[1] for x in window)
            p99 = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 3)
        return Progress(elapsed=max(0.0, now), sent=self._sent, ok=rec.counts["ok"],
                        errors=rec.counts["errors"], unanswered=rec.counts["unanswered"],
                        outstanding=len(self._inflight), window_replies=len(window),
                        window_p99_ms=p99, done=self._drained())

    def _drained(self) -> bool:
        """The sender is done and every request has ended, or the drain time is over."""
        if self.sending:
            return False
        return not self._inflight or time.monotonic() >= self._drain_deadline()

    def _drain_deadline(self) -> float:
        return self._sender_done_at + self.spec.timeout + DRAIN_GRACE

    def finish(self) -> Recording:
        """Wait for the sender and the outstanding replies (at most the per-request
        timeout + ``DRAIN_GRACE`` after the last send); what is still outstanding then is
        cancelled and counted unanswered. Closes the client."""
        self._sender.join()
        while self._inflight and time.monotonic() < self._drain_deadline():
            time.sleep(0.01)
        left = list(self._inflight)
        for fut in left:
            fut.cancel()  # its callback records it as unanswered
        self.poll()
        self.client.close()
        self.poll()
        if self.error is not None:
            raise LoadTestError(f"the load generator failed: {self.error}") from self.error
        return self.recording

    # -- sending -------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        try:
            if self.spec.rate is not None:
                self._open_loop()
            else:
                self._closed_loop()
        except BaseException as exc:  # handed to the caller by finish()
            self.error = exc
        finally:
            self._sender_done_at = time.monotonic()

    def _open_loop(self) -> None:
        spec = self.spec
        end = None if spec.duration is None else self.t0 + spec.warmup + spec.duration
        schedule = iter(arrivals(spec, self.share, self.seed))
        for offset in schedule:
            intended = self.t0 + offset
            now = time.monotonic()
            if intended - now > _SPIN:
                if self._stop.wait(intended - now):
                    self.recording.add_unsent(1 + sum(1 for _ in schedule))
                    return
            elif self._stop.is_set() or (end is not None and now >= end):
                # Behind schedule when the run ends: the rest was never offered.
                self.recording.add_unsent(1 + sum(1 for _ in schedule))
                return
            self._submit(intended)

    def _closed_loop(self) -> None:
        spec = self.spec
        end = None if spec.duration is None else self.t0 + spec.warmup + spec.duration
        total = None if spec.requests is None else self.share.split(spec.requests)
        assert self._permits is not None
        wait = self.t0 - time.monotonic()
        if wait > 0 and self._stop.wait(wait):
            return
        for _ in itertools.count() if total is None else range(total):
            while not self._permits.acquire(timeout=0.05):
                if self._stop.is_set() or (end is not None and time.monotonic() >= end):
                    return
            now = time.monotonic()
            if self._stop.is_set() or (end is not None and now >= end):
                self._permits.release()
                return
            self._submit(now)

    def _submit(self, intended: float) -> None:
        spec = self.spec
        m = self._pick()
        mix = spec.methods[m]
        sent = time.monotonic()
        fut = self.client.submit(mix.method, self.payload, service=mix.service,
                                 priority=spec.priority, timeout=spec.timeout,
                                 idempotent=spec.idempotent)
        self._sent += 1
        self._inflight.add(fut)
        fut.add_done_callback(functools.partial(self._on_done, intended, sent, m))

    def _on_done(self, intended: float, sent: float, m: int,
                 fut: concurrent.futures.Future) -> None:
        """On the client's I/O thread (or the sender's, for an instant reply): stamp and
        classify only."""
        done = time.monotonic()
        self._inflight.discard(fut)
        worker = detail = None
        if fut.cancelled():
            outcome, detail = Outcome.UNANSWERED, "outstanding_at_end"
        else:
            exc = fut.exception()
            meta = reply_meta(fut)
            if meta is None:
                outcome, detail = Outcome.UNANSWERED, NO_REPLY.get(type(exc), type(exc).__name__)
            else:
                worker = meta.get("worker")
                if exc is None:
                    outcome = Outcome.OK
                else:
                    outcome = Outcome.ERROR
                    detail = exc.type if isinstance(exc, WorkerPoolError) else type(exc).__name__
        t0 = self.t0
        self._done.append((intended - t0, sent - t0, done - t0, m, outcome, detail, worker))
        if self._permits is not None:
            self._permits.release()
