"""The mosec side of bench/peers.py: a no-op echo behind mosec's HTTP/1.1 front.

::

    client --POST /inference, body b--> mosec's Rust front (127.0.0.1:PORT)
           --b over a unix socket--> one of --workers Python processes: forward(b) -> b
    client <--200, body b--

The worker echoes the request body's bytes untouched (``serialize`` and ``deserialize``
are the identity, not mosec's default JSON), the least a mosec worker can do per request.
With ``--max-batch-size`` above 1, mosec's dynamic batching hands ``forward`` up to that
many bodies at once, waiting at most ``--max-wait-ms`` for a batch to fill.

Usage (bench/peers.py starts it in its own session and stops the whole group)::

    python bench/mosec_server.py --port 8000 --workers 2 [--max-batch-size 16 --max-wait-ms 2]

Every other argument (``--address``, ``--path``, ``--timeout``, ...) is mosec's own. Prints
``mosec ready`` on stdout once an echo has come back through the front.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import threading
import time

from mosec import Server, Worker

READY_TIMEOUT = 60.0  # seconds the server may take to answer its first echo
PROBE = b'{"i": -1}'


class Echo(Worker):
    """Returns the request body as the response body (a list of them when batching)."""

    def deserialize(self, data: bytes) -> bytes:
        return data

    def serialize(self, data: bytes) -> bytes:
        return data

    def forward(self, data: bytes | list[bytes]) -> bytes | list[bytes]:
        return data


def announce_when_ready(address: str, port: int) -> None:
    """Print ``mosec ready`` once one echo has come back (the front is up and a worker
    has connected to it)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(address, port, timeout=2)
        try:
            conn.request("POST", "/inference", body=PROBE)
            resp = conn.getresponse()
            if resp.status == 200 and resp.read() == PROBE:
                print(f"mosec ready at http://{address}:{port}/inference", flush=True)
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--max-batch-size", type=int, default=1,
                    help="bodies per forward call; above 1 turns dynamic batching on")
    ap.add_argument("--max-wait-ms", type=int, default=2,
                    help="longest a partial batch waits to fill (milliseconds, default 2)")
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args, _mosec_args = ap.parse_known_args()  # mosec's Server parses sys.argv itself
    if "--address" not in sys.argv:
        sys.argv += ["--address", args.address]  # loopback, not mosec's 0.0.0.0
    server = Server()
    server.append_worker(Echo, num=args.workers, max_batch_size=args.max_batch_size,
                         max_wait_time=args.max_wait_ms)
    threading.Thread(target=announce_when_ready, args=(args.address, args.port),
                     daemon=True).start()
    server.run()


if __name__ == "__main__":
    main()
