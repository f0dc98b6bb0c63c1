"""How AsyncClient moves frames: its plain DEALER, watched by the event loop, against an
echo ROUTER in a thread (no pool, so every timing of a reply is the test's to choose).

ZeroMQ's FD signals a change only, and a send may consume the signal for replies that
are already waiting; the client must still deliver them. A send the socket refuses
(no connection yet) waits and goes out in order once the socket can take it.
"""

from __future__ import annotations

import asyncio
import threading
import time

import msgpack
import pytest
import zmq

from ipc import protocol
from ipc.protocol import Kind
from workerpool import AsyncClient
from workerpool.errors import ClientClosedError

SILENT = "silent"  # a method the echo router never answers


class EchoRouter:
    """A ROUTER in a thread: answers each REQUEST with RESULT and its own body, except
    SILENT ones; records the CANCELs it gets. A BUNDLE's requests are answered one by
    one."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.answered = 0
        self.cancels: list[int] = []
        self.bundles = 0  # BUNDLEs received
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EchoRouter:
        self._thread.start()
        assert self._bound.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A ROUTER drops what would pass its send high-water mark (1000 by default): a
        # client slow to read on a loaded machine lost replies, and its calls hung.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.bind(self.address)
        self._bound.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(20):
                    continue
                peer, *frames = sock.recv_multipart()
                if protocol.split(frames)[0] is Kind.BUNDLE:
                    self.bundles += 1
                    heads = protocol.unbundle(frames[0])
                else:
                    heads = [frames[0]]
                for head in heads:
                    self._answer(sock, peer, head)
        finally:
            sock.close(0)
            ctx.term()

    def _answer(self, sock: zmq.Socket, peer: bytes, head: bytes) -> None:
        kind, rid, meta, body, _ = protocol.split([head])
        if kind is Kind.CANCEL:
            self.cancels.append(rid)
        elif kind is Kind.REQUEST and msgpack.unpackb(meta)["method"] != SILENT:
            sock.send_multipart([peer, *protocol.encode(Kind.RESULT, rid, b"", body)])
            self.answered += 1


@pytest.fixture
def address(tmp_path):
    return f"ipc://{tmp_path}/front"


def test_replies_waiting_when_a_send_takes_the_fd_signal_are_delivered(address):
    """Replies arrive while the loop is busy; the next send consumes the FD's signal for
    them, so the loop would never wake for them: the client looks after each send."""
    with EchoRouter(address) as router:
        async def main():
            async with AsyncClient(address, timeout=30, shm=False) as ac:
                assert await ac.call("echo", 0) == 0
                futs = [await ac.submit("echo", i) for i in range(1, 100)]  # no yield
                await asyncio.sleep(0)  # this turn's requests go out (a bundle)
                deadline = time.monotonic() + 10
                while router.answered < 100 and time.monotonic() < deadline:
                    time.sleep(0.01)  # blocks the loop: the replies queue in the socket
                futs.append(await ac.submit("echo", 100))
                assert await asyncio.wait_for(asyncio.gather(*futs), 10) == list(range(1, 101))

        asyncio.run(main())


def test_many_concurrent_calls_with_replies_arriving_while_sending(address):
    """Thousands of calls from as many tasks, so replies come in while requests go out
    and one wake-up finds more replies than it handles at once."""
    n = 3000
    with EchoRouter(address):
        async def main():
            async with AsyncClient(address, timeout=30, shm=False) as ac:
                calls = [ac.call("echo", i) for i in range(n)]
                assert await asyncio.wait_for(asyncio.gather(*calls), 30) == list(range(n))
                assert len(ac._replies) == 0 and ac.unmatched_replies == 0

        asyncio.run(main())


def test_requests_sent_before_the_router_exists_go_out_in_order(address):
    """A socket that refuses to queue before it connects (ZMQ_IMMEDIATE): the requests
    wait in the client and go out in order once the router is there."""
    async def main():
        async with AsyncClient(address, timeout=30, shm=False) as ac:
            ac._sock.disconnect(address)
            ac._sock.setsockopt(zmq.IMMEDIATE, 1)
            ac._sock.connect(address)
            futs = [await ac.submit("echo", i) for i in range(5)]
            await asyncio.sleep(0)  # the turn ends: the first request, then a bundle of 4
            assert len(ac._unsent) == 2
            with EchoRouter(address):
                assert await asyncio.wait_for(asyncio.gather(*futs), 10) == list(range(5))
            assert not ac._unsent

    asyncio.run(main())


def test_cancel_and_close(address):
    """A cancelled Future sends CANCEL; close fails what is outstanding and the loop
    stops watching the socket."""
    with EchoRouter(address) as router:
        async def main():
            ac = AsyncClient(address, timeout=30, shm=False)
            cancelled = await ac.submit(SILENT)
            cancelled.cancel()
            assert await ac.call("echo", 1) == 1  # sent after the CANCEL, answered after it
            assert router.cancels == [cancelled.rid]
            outstanding = await ac.submit(SILENT)
            fd = ac._sock.getsockopt(zmq.FD)
            await ac.close()
            with pytest.raises(ClientClosedError, match="closed with this request outstanding"):
                await outstanding
            assert not asyncio.get_running_loop().remove_reader(fd)  # no longer watched
            with pytest.raises(ClientClosedError, match="client is closed"):
                await ac.submit("echo")

        asyncio.run(main())


def test_a_second_event_loop_is_refused(address):
    with EchoRouter(address):
        ac = AsyncClient(address, timeout=30, shm=False)
        assert asyncio.run(ac.call("echo", 1)) == 1
        with pytest.raises(RuntimeError, match="event loop of its first request"):
            asyncio.run(ac.call("echo", 2))
        asyncio.run(ac.close())  # its loop is gone: nothing to unregister there
