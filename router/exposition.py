"""A ``Snapshot`` (router.metrics) in Prometheus' text format, through prometheus_client's
custom-collector API. Imported only when the router runs with ``--metrics``.

Every metric is built here from the snapshot alone, so what a scrape shows is one instant
of the router. docs/operations.md ("Metrics") lists each with its meaning.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from ipc.lifecycle import WorkerState
from router.metrics import Snapshot
from workerpool.histogram import HistogramValues

CONTENT_TYPE = CONTENT_TYPE_LATEST
GPU_MEMORY_KEY = "gpu_reserved"  # of a heartbeat's memory map: what the allocator holds


def render(snap: Snapshot, age: float) -> bytes:
    """The exposition of ``snap``, taken ``age`` seconds ago."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snap, age))
    return generate_latest(registry)


class _Collector:
    def __init__(self, snap: Snapshot, age: float) -> None:
        self._snap = snap
        self._age = age

    def collect(self) -> Iterator:
        return families(self._snap, self._age)


def _buckets(h: HistogramValues) -> list[tuple[str, float]]:
    return [(floatToGoString(le), n) for le, n in h.cumulative()]


def families(snap: Snapshot, age: float) -> Iterator:
    """Each metric family of ``snap``, in a fixed order."""
    labelled = {s.name for s in snap.services}
    status = snap.status
    services = [row for row in status["services"] if row["name"] in labelled]
    workers = [row for row in status["workers"] if row["service"] in labelled]

    requests = CounterMetricFamily(
        "workerpool_requests", "Requests that ended, by outcome: ok, the error type answered "
        "(refusals at admission included), cancelled, dropped.",
        labels=["service", "method", "outcome"])
    duration = HistogramMetricFamily(
        "workerpool_request_duration_seconds", "Admission to final reply, admitted requests "
        "that got one.", labels=["service", "method"])
    batch = HistogramMetricFamily(
        "workerpool_batch_size", "Requests per batch as run, for @batched methods.",
        labels=["service", "method"])
    queue_wait = HistogramMetricFamily(
        "workerpool_queue_wait_seconds", "Admission to the last dispatch, for requests a "
        "worker answered.", labels=["service"])
    service_time = HistogramMetricFamily(
        "workerpool_service_time_seconds", "Dispatch to the worker's final reply.",
        labels=["service"])
    for s in snap.services:
        for method, outcome, n in s.requests:
            requests.add_metric([s.name, method, outcome], n)
        for method, h in s.durations:
            duration.add_metric([s.name, method], _buckets(h), h.sum)
        for method, h in s.batch_sizes:
            batch.add_metric([s.name, method], _buckets(h), h.sum)
        queue_wait.add_metric([s.name], _buckets(s.queue_wait), s.queue_wait.sum)
        service_time.add_metric([s.name], _buckets(s.service_time), s.service_time.sum)
    yield from (requests, duration, queue_wait, service_time, batch)

    depth = GaugeMetricFamily("workerpool_queue_depth", "Requests waiting in the service's "
                              "queue.", labels=["service"])
    rejected = CounterMetricFamily(
        "workerpool_backpressure_rejections", "Requests refused with BackpressureError because "
        "the service was full (at admission, displaced, or past max_wait).", labels=["service"])
    for row in services:
        depth.add_metric([row["name"]], row["queued"])
        rejected.add_metric([row["name"]], row["rejected_backpressure"])
    yield from (depth, rejected)

    # `node` follows from `worker` (one supervisor runs a slot): it adds no series.
    in_flight = GaugeMetricFamily("workerpool_in_flight", "Requests the worker holds, running "
                                  "or held ahead.", labels=["service", "worker", "node"])
    state = GaugeMetricFamily("workerpool_worker_state", "1 for the worker's current state, 0 "
                              "for the others.", labels=["service", "worker", "node", "state"])
    utilization = GaugeMetricFamily(
        "workerpool_worker_utilization", "Fraction of the last few heartbeats' time the "
        "handler ran.", labels=["service", "worker", "node"])
    gpu = GaugeMetricFamily("workerpool_gpu_memory_bytes", "GPU memory the worker's "
                            "allocator holds (reserved), where it reports it.",
                            labels=["worker", "node", "device"])
    node_of = {row["id"]: row.get("node") or "" for row in status["workers"]}
    for row in workers:
        svc, slot, node = row["service"], row["id"], node_of[row["id"]]
        in_flight.add_metric([svc, slot, node], row["in_flight"])
        for s in WorkerState:
            state.add_metric([svc, slot, node, s.value], 1 if row["state"] == s.value else 0)
        if row["utilization"] is not None:
            utilization.add_metric([svc, slot, node], row["utilization"])
        if GPU_MEMORY_KEY in row["memory"]:
            gpu.add_metric([slot, node, row["device"]], row["memory"][GPU_MEMORY_KEY])
    restarts = CounterMetricFamily(
        "workerpool_worker_restarts", "Worker deaths its supervisor reported (each followed by "
        "a respawn), by cause.", labels=["service", "worker", "node", "cause"])
    for svc, slot, cause, n in snap.restarts:
        if svc in labelled:
            restarts.add_metric([svc, slot, node_of.get(slot, ""), cause], n)
    rtt = GaugeMetricFamily(
        "workerpool_node_rtt_seconds", "Smoothed round trip of a connected supervisor's pings "
        "to the router, as it measured them.", labels=["node", "host"])
    for node in status.get("nodes", ()):
        if node["state"] != "lost" and node["rtt_smoothed_ms"] is not None:
            rtt.add_metric([node["node"], node["host"] or ""], node["rtt_smoothed_ms"] / 1000)
    yield from (in_flight, state, utilization, gpu, restarts, rtt)

    messages = CounterMetricFamily("workerpool_router_messages", "Messages the router loop "
                                   "handled, by socket.", labels=["socket"])
    messages.add_metric(["frontend"], snap.frontend_messages)
    messages.add_metric(["backend"], snap.backend_messages)
    lag = HistogramMetricFamily(
        "workerpool_router_loop_lag_seconds", "For each message: from the poll returning to the "
        "loop turning to that message.")
    lag.add_metric([], _buckets(snap.loop_lag), snap.loop_lag.sum)
    unknown = CounterMetricFamily(
        "workerpool_unknown_service_requests", "Requests naming a service no supervisor "
        "described (counted without labels).", value=snap.unknown_service)
    snapshot_age = GaugeMetricFamily(
        "workerpool_snapshot_age_seconds", "How old the figures of this scrape are.",
        value=round(age, 6))
    yield from (messages, lag, unknown, snapshot_age)
