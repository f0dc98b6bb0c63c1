"""One write per response (workerpool/gateway/coalesce.py): the wrapper around uvicorn's
transport, with a recording transport and a real event loop. The whole gateway runs on
it in tests/test_gateway_live.py (curl, wrk, tritonclient, streams, slow readers)."""

from __future__ import annotations

import asyncio

from workerpool.gateway.coalesce import JOIN_LIMIT, CoalescingTransport, coalescing


class Recording:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.eof = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def write_eof(self) -> None:
        self.eof = True

    def get_write_buffer_size(self) -> int:
        return 7

    def get_extra_info(self, name: str, default=None):
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def _run(body) -> None:
    asyncio.run(body())


def _pair() -> tuple[Recording, CoalescingTransport]:
    """A recording transport and its wrapper, in the running loop."""
    t = Recording()
    return t, CoalescingTransport(t, asyncio.get_running_loop())


def test_a_head_and_its_body_leave_as_one_write_at_once():
    async def body():
        t, c = _pair()
        c.write(b"HTTP/1.1 200 OK\r\n\r\n")
        assert t.writes == []  # held: its body normally follows in the same turn
        c.write(b"{}")
        assert t.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]  # at once, not at the turn's end
        await asyncio.sleep(0)
        assert t.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]  # nothing left to send
    _run(body)


def test_a_write_nothing_follows_is_sent_at_the_end_of_the_turn():
    """A stream's head, or one event of it: it does not wait for more."""
    async def body():
        t, c = _pair()
        c.write(b"event: item\n\n")
        c.write(b"")  # nothing: not a write
        assert t.writes == [] and c.get_write_buffer_size() == 7 + 13
        await asyncio.sleep(0)
        assert t.writes == [b"event: item\n\n"]
        c.write(b"a")
        c.write(b"b")
        c.write(b"c")  # a third in the same turn: held, then sent at the turn's end
        await asyncio.sleep(0)
        assert t.writes == [b"event: item\n\n", b"ab", b"c"]
    _run(body)


def test_close_and_write_eof_send_what_is_held_first():
    async def body():
        t, c = _pair()
        c.write(b"last")
        c.write_eof()
        assert t.writes == [b"last"] and t.eof
        c.write(b"bye")
        c.close()
        assert t.writes == [b"last", b"bye"] and t.closed
        c.write(b"late")
        await asyncio.sleep(0)  # the real transport is closing: dropped, as it would be
        assert t.writes == [b"last", b"bye"]
    _run(body)


def test_the_rest_is_the_real_transports_and_the_protocol_gets_the_wrapper():
    async def body():
        t, c = _pair()
        assert c.get_extra_info("peername") == ("127.0.0.1", 1)
        assert c.is_closing() is False

        class Protocol:
            def __init__(self) -> None:
                self.loop = asyncio.get_running_loop()

            def connection_made(self, transport) -> None:
                self.transport = transport

        p = coalescing(Protocol)()
        p.connection_made(t)
        assert isinstance(p.transport, CoalescingTransport)
        assert type(p).__name__ == "CoalescingProtocol"
    _run(body)


def test_a_large_body_is_not_copied_to_join_it():
    async def body():
        t, c = _pair()
        big = b"x" * JOIN_LIMIT
        c.write(b"HTTP/1.1 200 OK\r\n\r\n")
        c.write(big)
        assert t.writes == [b"HTTP/1.1 200 OK\r\n\r\n", big]  # two writes, at once
    _run(body)
