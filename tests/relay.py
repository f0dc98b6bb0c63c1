"""A TCP relay that holds every byte for a fixed delay in each direction: the slow link of
the multi-host tests, where the kernel has no ``netem`` qdisc to delay packets.

    python -m tests.relay --listen 127.0.0.1:7000 --to 10.213.0.1:5556 --delay 0.05

Each connection accepted on ``--listen`` gets its own connection to ``--to``; whatever one
side sends is written to the other ``--delay`` seconds after it was read, in order, so a
round trip through the relay takes at least twice the delay, as a link with that one-way
latency would. Run on a worker host, with its programs pointed at ``--listen``, it slows
that host's path to the router and nothing else. It prints ``relay ready`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay: float) -> None:
    loop = asyncio.get_running_loop()
    held: asyncio.Queue = asyncio.Queue()

    async def release() -> None:
        while True:
            due, data = await held.get()
            if data is None:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    releasing = asyncio.create_task(release())
    try:
        while data := await reader.read(65536):
            held.put_nowait((loop.time() + delay, data))
        held.put_nowait((0.0, None))
        await releasing
    except (ConnectionError, OSError):
        releasing.cancel()
    finally:
        writer.close()


async def _serve(listen: tuple[str, int], to: tuple[str, int], delay: float) -> None:
    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*to)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer, delay), _pipe(up_reader, writer, delay),
                             return_exceptions=True)

    server = await asyncio.start_server(accepted, *listen)
    print("relay ready", flush=True)
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept on")
    ap.add_argument("--to", type=_address, required=True, help="HOST:PORT to relay to")
    ap.add_argument("--delay", type=float, default=0.05, help="seconds, each direction")
    args = ap.parse_args()
    try:
        asyncio.run(_serve(args.listen, args.to, args.delay))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
