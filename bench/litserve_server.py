"""The LitServe side of bench/peers.py and bench/http_gateway.py: a no-op echo behind
LitServe's HTTP/1.1 front.

::

    client --POST /predict, JSON body--> one of 2 uvicorn (FastAPI) processes (127.0.0.1:PORT)
           --the decoded JSON over a multiprocessing queue--> one of --workers Python
             processes: predict(x) -> x
    client <--200, the same JSON--

``predict`` returns its input, so LitServe's default ``decode_request`` and
``encode_response`` (the identity) and FastAPI's JSON response make the reply the request's
JSON, written compactly (``{"i":3}``). With ``--max-batch-size`` above 1, LitServe's
dynamic batching hands ``predict`` a list of up to that many inputs, waiting at most
``--max-wait-ms`` for a batch to fill, and ``predict`` returns the list.

What this sets, everything else being LitServe's default (0.2.19):

- ``accelerator="cpu"`` with ``workers_per_device=--workers``: LitServe's way to get N
  inference processes on the CPU (``devices`` is then the one CPU). The HTTP front gets
  LitServe's default number of API server processes, one per inference worker.
- ``max_batch_size`` and ``batch_timeout`` (seconds) on the ``LitAPI``, where 0.2.19 wants
  them (on ``LitServer`` they are deprecated).
- ``host="127.0.0.1"``: loopback, not LitServe's ``0.0.0.0``.
- ``log_level="warning"``, the level LitServe's docs give for production: at ``info``
  uvicorn writes an access-log line per request, work neither peer does.
- ``generate_client_file=False``: otherwise ``run`` writes a ``client.py`` into the current
  directory (the repository).

- ``fast_queue=True``: ZeroMQ between its HTTP front and its workers instead of
  multiprocessing queues, the faster of the two here (2026-12-06, 2 rounds of 3 s with
  ``bench/http_gateway.py --systems litserve``: 64 connections 1,778 against 1,553 req/s;
  one connection 910 against 919, the same).

LitServe 0.2.19 sends no telemetry (nothing to switch off). Left at their defaults:
``timeout`` (30 s), ``track_requests`` (off), and the GZip middleware LitServe adds
(bodies under 1000 bytes pass through).

Usage (the benchmarks start it in its own session and stop the whole group)::

    python bench/litserve_server.py --port 8000 --workers 2 [--max-batch-size 16 --max-wait-ms 2]

Prints ``litserve ready`` on stdout once every worker is set up (``GET /health`` is 200)
and an echo has come back through the front.
"""

from __future__ import annotations

import argparse
import http.client
import os
import threading
import time
from typing import Any

import litserve as ls

READY_TIMEOUT = 60.0  # seconds the server may take to answer its first echo
PROBE = b'{"i":-1}'


class Echo(ls.LitAPI):
    """Returns its input: one request's JSON, or the list of them when batching."""

    def setup(self, device: str) -> None:
        pass

    def predict(self, x: Any) -> Any:
        return x


def _answers(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None,
             expect: bytes | None) -> bool:
    """Whether ``method path`` comes back 200 (with ``expect`` as its body, if given)."""
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status == 200 and (expect is None or data == expect)


def announce_when_ready(address: str, port: int) -> None:
    """Write ``litserve ready`` on stdout once every worker is up and one echo has come back.

    It writes with ``os.write``, not ``print``: LitServe forks its HTTP processes while this
    thread runs, and a fork taken while this thread held stdout's lock would leave the
    child's stdout locked for good."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(address, port, timeout=2)
        try:
            if (_answers(conn, "GET", "/health", None, None)
                    and _answers(conn, "POST", "/predict", PROBE, PROBE)):
                os.write(1, f"litserve ready at http://{address}:{port}/predict\n".encode())
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--workers", type=int, default=2, help="inference processes (default 2)")
    ap.add_argument("--max-batch-size", type=int, default=1,
                    help="inputs per predict call; above 1 turns dynamic batching on")
    ap.add_argument("--max-wait-ms", type=float, default=2.0,
                    help="longest a partial batch waits to fill (milliseconds, default 2)")
    ap.add_argument("--address", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0", "::"),
                    help="where to listen (LitServe accepts only these three)")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    batched = args.max_batch_size > 1
    api = Echo(max_batch_size=args.max_batch_size,
               batch_timeout=args.max_wait_ms / 1000 if batched else 0.0)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers,
                          fast_queue=True)
    threading.Thread(target=announce_when_ready, args=(args.address, args.port),
                     daemon=True).start()
    server.run(host=args.address, port=args.port, log_level="warning",
               generate_client_file=False)


if __name__ == "__main__":
    main()
