"""The HTTP gateway: `workerpool gateway`, a process that answers HTTP (and KServe v2) and
talks to the router as an ordinary client, over K connections its callers are spread on.

::

    curl, browsers, tritonclient --HTTP--> gateway process --ZeroMQ (K DEALERs)--> router

- ``app.py``: the ASGI application, and quick /v1 calls answered whole from callbacks;
  routes and moving bytes.
- ``statuses.py``: error type (and code) to HTTP status and headers, a table.
- ``bodies.py``: JSON and msgpack bodies, the size limit.
- ``sse.py``: server-sent events for streaming methods.
- ``kserve.py``: the KServe v2 inference protocol in and out of plain values.
- ``health.py``: readiness from the router's STATUS, and its cache.
- ``tokens.py``: bearer tokens.
- ``callers.py``: which router connection serves a caller; the per-caller cap.
- ``metrics.py``: the gateway's own Prometheus metrics.
- ``openapi.py``: ``/openapi.json``.
- ``http11.py``: HTTP/1.1 connections (httptools) running the app, or handing a small
  request whole to a handler; one write per response.
- ``server.py``: binding, the event loop (uvloop), TLS, stopping on a signal.

docs/http.md is the reference.
"""


class GatewayError(RuntimeError):
    """The gateway cannot start: its address cannot be bound, a file is unreadable, or
    the ``http`` extra is not installed."""


def check_installed() -> None:
    """Raise GatewayError, saying what to install, without the ``http`` extra (httptools,
    prometheus-client); imports neither for good when they are there."""
    import importlib.util

    missing = [m for m in ("httptools", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise GatewayError(f"the HTTP gateway needs {' and '.join(missing)}: pip install "
                           "'workerpool[http]'")
