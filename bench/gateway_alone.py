"""The HTTP gateway's own cost: its server and app with a stand-in router connection that
answers every call at once, driven by wrk, so nothing but the gateway's work is timed.

Through a real pool the router and workers share the machine with the gateway and move
with its load; here the gateway process (this one, on uvloop) is the whole server. wrk
(one thread, a Lua script POSTing ``{"i": 1}`` to ``/v1/default/echo``, keep-alive)
runs ``--warmup`` seconds, then ``--duration`` measured seconds. Printed: req/s, wrk's
p50 and p99, and this process's CPU time (user, system) per request over the measured
run.

``--repo`` runs another checkout's gateway with this same driver (a tree whose server
takes no ``whole`` handler is run as it is), so two trees are compared side by side:
run both in turn, alternating, with nothing else running::

    .venv/bin/python bench/gateway_alone.py
    .venv/bin/python bench/gateway_alone.py --repo ../other-checkout
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import resource
import shutil
import socket
import sys
import tempfile


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=4, help="seconds measured (default 4)")
    ap.add_argument("--warmup", type=int, default=1, help="seconds before (default 1)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    ap.add_argument("--repo", default=None, help="the workerpool checkout to run (default: this)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    return ap.parse_args()


ARGS = _parse()
BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(ARGS.repo or os.path.dirname(BENCH))
sys.path.insert(0, REPO)
sys.path.insert(1, BENCH)

import uvloop  # noqa: E402

from workerpool.gateway.app import Gateway, Settings  # noqa: E402  (from --repo)
from workerpool.gateway.http11 import HttpServer  # noqa: E402


class StandIn:
    """A router connection whose every call succeeds with its payload, on the next loop
    turn (as a reply read from a socket would be handled)."""

    streams_overrun = 0

    def submit_nowait(self, method: str, payload: object, **fields: object) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_soon(fut.set_result, payload)
        return fut

    async def submit(self, method: str, payload: object, **fields: object) -> asyncio.Future:
        return self.submit_nowait(method, payload)  # the ASGI path of a tree before

    async def close(self) -> None:
        pass


def _cpu() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


async def _wrk(url: str, seconds: int, script: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{ARGS.connections}", f"-d{seconds}s", "--latency", "-s", script, url,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    if proc.returncode:
        raise SystemExit(f"wrk failed ({proc.returncode})")
    return out.decode()


async def main() -> dict:
    # bench/http_gateway.py puts this checkout first on the path: imported after --repo's.
    from http_gateway import WRK_SCRIPT, parse_wrk

    app = Gateway(StandIn, Settings())
    await app.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    takes_whole = "whole" in inspect.signature(HttpServer).parameters
    server = HttpServer(app, whole=app) if takes_whole else HttpServer(app)
    await server.start(sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/default/echo"
    workdir = tempfile.mkdtemp(prefix="wp-gateway-alone-")
    try:
        script = os.path.join(workdir, "post.lua")
        with open(script, "w") as f:
            f.write(WRK_SCRIPT)
        await _wrk(url, ARGS.warmup, script)
        user0, sys0 = _cpu()
        res = parse_wrk(await _wrk(url, ARGS.duration, script))
        user1, sys1 = _cpu()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        await server.stop(1.0)
        await app.close_clients()
        sock.close()
    n = max(1, res["completed"])
    return {"repo": REPO, "whole": takes_whole, "connections": ARGS.connections,
            "req_per_s": round(res["req_per_s"]), "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"],
            "errors": res["errors"], "user_us": round((user1 - user0) / n * 1e6, 1),
            "system_us": round((sys1 - sys0) / n * 1e6, 1)}


if __name__ == "__main__":
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (bin/system-packages installs it, as root)")
    out = uvloop.run(main())
    if ARGS.json:
        print(json.dumps(out))
    else:
        print(f"{out['req_per_s']:7d} req/s  p50 {out['p50_ms']:.3f} ms  p99 {out['p99_ms']:.3f} ms"
              f"  gateway CPU {out['user_us'] + out['system_us']:.1f} us a request (user "
              f"{out['user_us']:.1f}, system {out['system_us']:.1f})  errors {out['errors']}"
              f"  [{'whole' if out['whole'] else 'ASGI only'}: {REPO}]")
