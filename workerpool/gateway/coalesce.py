"""One write per response: the status line and headers go out with the body.

uvicorn writes an ASGI response's start (status line, headers) and its body to the
transport as two writes, and each write to an idle socket is a ``send`` at once: two
system calls and two TCP segments for every small reply, on both ends of the connection.
Measured under py-spy at 64 connections, those two writes were the gateway's largest
cost. Here a write is held until the next one, which the response's body normally is,
in the same turn of the event loop: the two go to the real transport as one write at
once. A write that no other follows in its turn is sent at the end of that turn, so
nothing waits longer than the turn it was written in and streams (SSE) still leave
event by event. (Holding every write to the end of the turn instead cost a lone
connection about 150 µs of latency a request.)
"""

from __future__ import annotations

import asyncio
from typing import Any

JOIN_LIMIT = 65536
"""Bytes joined into one write at most: joining copies, and past this a copy costs more
than the second write it saves (a large tensor reply goes as head, then body)."""


class CoalescingTransport:
    """Wraps a transport: a ``write`` is held until the next, and the two are sent as one;
    one with no successor is sent at the end of the loop's turn. Everything else is the
    wrapped transport's, except ``close`` and ``write_eof``, which send what is held
    first."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        if len(self._pending) > 1:
            self.flush()  # a response's head and its body: one write, now
        else:
            self._loop.call_soon(self.flush)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Hand what was written to the real transport now, as one write."""
        if not self._pending:
            return
        pending = self._pending
        self._pending = []
        if self._transport.is_closing():
            return
        if len(pending) == 1:
            self._transport.write(pending[0])
        elif sum(map(len, pending)) <= JOIN_LIMIT:
            self._transport.write(b"".join(pending))
        else:
            for data in pending:
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def coalescing(protocol: type) -> type:
    """``protocol`` (a uvicorn HTTP protocol class) with its transport wrapped."""

    class Coalescing(protocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescingTransport(transport, self.loop))

    Coalescing.__name__ = f"Coalescing{protocol.__name__}"
    return Coalescing
