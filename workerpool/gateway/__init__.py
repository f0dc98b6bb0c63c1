"""The HTTP gateway: `workerpool gateway`, a process that answers HTTP (and KServe v2) and
talks to the router as one ordinary client.

::

    curl, browsers, tritonclient --HTTP--> gateway process --ZeroMQ (one DEALER)--> router

- ``app.py``: the ASGI application; routes and moving bytes.
- ``statuses.py``: error type (and code) to HTTP status and headers, a table.
- ``bodies.py``: JSON and msgpack bodies, the size limit.
- ``sse.py``: server-sent events for streaming methods.
- ``kserve.py``: the KServe v2 inference protocol in and out of plain values.
- ``health.py``: readiness from the router's STATUS, and its cache.
- ``tokens.py``: bearer tokens.
- ``metrics.py``: the gateway's own Prometheus metrics.
- ``openapi.py``: ``/openapi.json``.
- ``server.py``: binding, uvicorn, TLS; the only module that imports uvicorn.

docs/http.md is the reference.
"""
