"""The gateway's own Prometheus metrics (``GET /metrics``), through prometheus_client.

Labels come from a fixed set: the endpoint (``v1``, ``v1-stream``, ``v2-infer``, ...) and
the status code the gateway answered, never a service or method name from a URL, so no
request can add series. The pool's own figures are the router's (``--metrics`` of `up` or
`router`); these say what HTTP callers saw.

Every request is counted in plain Python (a dict entry and a ``workerpool.histogram``),
rendered at a scrape: prometheus_client's own Counter and Histogram, with their locks and
their loop over the buckets, cost more than a tenth of the gateway's CPU on a no-op call.
The gateway counts and renders on its one event loop, so nothing here needs a lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from workerpool.histogram import Histogram

CONTENT_TYPE = CONTENT_TYPE_LATEST
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0, 120.0)


class GatewayMetrics:
    """The counters of one gateway process, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status): answered
        self.durations: dict[str, Histogram] = {}  # endpoint: seconds to the last byte
        r.register(_Answered(self))
        self.in_flight = Gauge("workerpool_gateway_in_flight", "HTTP requests being "
                               "answered now.", registry=r)
        self.disconnects = Counter("workerpool_gateway_client_disconnects", "HTTP clients "
                                   "that left before their reply; the request was cancelled "
                                   "at the router.", registry=r)
        self.caller_limited = Counter("workerpool_gateway_caller_limited", "Requests "
                                      "refused (429) because their caller was at "
                                      "max-inflight-per-caller.", registry=r)
        r.register(_Overruns(self))
        self.overrun_count: Callable[[], int] = lambda: 0  # the clients' count, once they exist
        # Requests on each router connection now, by its index (a fixed set: 0..K-1).
        self.connection_in_flight: Callable[[], list[int]] = lambda: []

    def answered(self, endpoint: str, code: int, seconds: float) -> None:
        """One request of ``endpoint`` answered ``code`` after ``seconds``."""
        key = (endpoint, code)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        histogram = self.durations.get(endpoint)
        if histogram is None:
            histogram = self.durations[endpoint] = Histogram(SECONDS_BUCKETS)
        histogram.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Answered:
    """``answered``'s counts, as the two families a scrape shows."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily("workerpool_gateway_requests", "HTTP requests answered, "
                                       "by endpoint and status code.", labels=["endpoint", "code"])
        for (endpoint, code), n in sorted(self._metrics.requests.items()):
            requests.add_metric([endpoint, str(code)], n)
        yield requests
        duration = HistogramMetricFamily("workerpool_gateway_request_duration_seconds", "From "
                                         "the request's arrival to its reply's last byte.",
                                         labels=["endpoint"])
        for endpoint, histogram in sorted(self._metrics.durations.items()):
            values = histogram.freeze()
            duration.add_metric([endpoint], [(floatToGoString(le), n)
                                             for le, n in values.cumulative()], values.sum)
        yield duration


class _Overruns:
    """The clients count streams ended for overrun (they end them, whether or not the
    reader ever sees the error event), and the callers' table each connection's requests;
    a scrape reads those figures."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("workerpool_gateway_streams_overrun", "Event streams ended "
                                  "because their reader fell max_buffered items behind; each "
                                  "was cancelled at the router.",
                                  value=self._metrics.overrun_count())
        family = GaugeMetricFamily("workerpool_gateway_router_connection_in_flight",
                                   "Requests in flight on each of the gateway's router "
                                   "connections.", labels=["connection"])
        for i, n in enumerate(self._metrics.connection_in_flight()):
            family.add_metric([str(i)], n)
        yield family
