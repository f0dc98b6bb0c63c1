"""BUNDLE (protocol.md 2.6) in both clients, against a ROUTER socket the test owns and
drives itself (no pool): what is ready at the same moment goes out as few messages as the
bounds allow, in order; a bundle of replies is handled message by message, each exactly
as if it had arrived alone; a malformed bundle is dropped whole and breaks nothing.
``batched``, the deciding half, is tested with plain values."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from ipc import codec, protocol
from ipc.protocol import Kind
from workerpool import AsyncClient, Client
from workerpool.client import reply_meta
from workerpool.client._base import batched
from workerpool.errors import HandlerError, ProtocolError, RouterRestartedError

META = protocol.pack_meta({"worker": "default/0"})


def _head(kind: Kind, rid: int, value: object = None, meta: bytes = META) -> bytes:
    [head] = protocol.encode(kind, rid, meta, codec.dumps(value)[0])
    return head


def _error(rid: int, message: str) -> bytes:
    return _head(Kind.ERROR, rid, {"type": "HandlerError", "message": message,
                                   "retryable": False})


def _pong(instance: str, unknown: list[int] = ()) -> bytes:
    return _head(Kind.HEARTBEAT, 0, {"router": instance, "unknown": list(unknown),
                                     "uptime": 1e9}, b"")


class FakeRouter:
    """A bound ROUTER socket: records what one client sends, message by message, and
    answers with whatever frames a test gives it."""

    def __init__(self, address: str) -> None:
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.peer: bytes | None = None
        self.messages: list[list] = []  # as received: a BUNDLE is one
        self.heads: list[bytes] = []  # every message, a bundle's each

    def close(self) -> None:
        self.sock.close(0)
        self._ctx.term()

    def take(self) -> bool:
        """Receive one waiting message, if any."""
        if not self.sock.poll(0):
            return False
        self.peer, *frames = self.sock.recv_multipart()
        self.messages.append(frames)
        kind = protocol.split(frames)[0]
        self.heads += protocol.unbundle(frames[0]) if kind is Kind.BUNDLE else [frames[0]]
        return True

    def received(self) -> list[tuple[Kind, int]]:
        """(kind, id) of each message received but pings, a bundle's each, in order."""
        return [(kind, rid) for kind, rid in map(protocol.unpack_header, self.heads)
                if kind is not Kind.HEARTBEAT]

    def requests(self) -> list[int]:
        return [rid for kind, rid in self.received() if kind is Kind.REQUEST]

    def sent_apart(self) -> int:
        """How many messages carried what ``received`` lists."""
        return sum(protocol.unpack_header(m[0])[0] is not Kind.HEARTBEAT
                   for m in self.messages)

    def wait(self, n: int, timeout: float = 10.0) -> list[int]:
        """The ids of the REQUESTs received once ``n`` messages (but pings) have been."""
        end = time.monotonic() + timeout
        while len(self.received()) < n and time.monotonic() < end:
            if not self.take():
                self.sock.poll(20)
        return self.requests()

    async def wait_async(self, n: int, timeout: float = 10.0) -> list[int]:
        """``wait`` for a client in this thread's event loop: the loop runs meanwhile."""
        end = time.monotonic() + timeout
        while len(self.received()) < n and time.monotonic() < end:
            if not self.take():
                await asyncio.sleep(0.005)
        return self.requests()

    def send(self, *frames: bytes) -> None:
        """Send each frame as one message to the client."""
        for frame in frames:
            self.sock.send_multipart([self.peer, frame])


@pytest.fixture
def router(tmp_path):
    r = FakeRouter(f"ipc://{tmp_path}/front")
    yield r
    r.close()


def _address(router: FakeRouter) -> str:
    return router.sock.getsockopt_string(zmq.LAST_ENDPOINT)


# -- batched: plain values -----------------------------------------------------------------
def test_batched_packs_runs_of_one_frame_messages_and_keeps_order():
    small = [protocol.encode(Kind.REQUEST, rid, b"", b"x") for rid in (1, 2, 3, 4)]
    cancel = protocol.encode(Kind.CANCEL, 9)
    big = protocol.encode(Kind.REQUEST, 5, b"", bytes(protocol.BODY_FRAME_MIN))
    out = batched([(1, small[0]), (2, small[1]), (0, cancel), (5, big), (3, small[2]),
                   (4, small[3])])
    assert [rids for _, rids in out] == [[1, 2], [5], [3, 4]]  # a CANCEL fails nothing
    first, middle, last = (frames for frames, _ in out)
    assert protocol.unbundle(first[0]) == [small[0][0], small[1][0], cancel[0]]
    assert middle == big  # two frames: on its own, between the bundles
    assert protocol.unbundle(last[0]) == [small[2][0], small[3][0]]
    assert batched([(7, small[0])]) == [(small[0], [7])]  # a lone message goes as itself
    assert batched([]) == []


def test_batched_splits_at_the_bundle_bounds():
    items = [(rid, protocol.encode(Kind.REQUEST, rid)) for rid in range(1, protocol.BUNDLE_MAX + 3)]
    out = batched(items)
    assert [len(rids) for _, rids in out] == [protocol.BUNDLE_MAX, 2]
    assert [rid for _, rids in out for rid in rids] == list(range(1, protocol.BUNDLE_MAX + 3))


# -- Client ---------------------------------------------------------------------------------
def test_submits_while_the_io_thread_is_busy_go_as_bundles_in_order(router):
    n = 600
    with Client(_address(router), timeout=30, shm=False) as c:
        with c._io_lock:  # the I/O thread waits for it: the submits gather in the outbox
            futs = [c.submit("echo", i) for i in range(n)]
        assert router.wait(n) == [f.rid for f in futs]  # each id once, in submit order
        # As few as BUNDLE_MAX allows: 9 full bundles and 24 in the last.
        assert router.sent_apart() == -(-n // protocol.BUNDLE_MAX)
        router.send(*protocol.pack([_head(Kind.RESULT, f.rid, i) for i, f in enumerate(futs)]))
        assert [f.result(10) for f in futs] == list(range(n))
        assert c.unmatched_replies == 0 and not c._replies


def test_a_cancel_follows_its_request_and_a_large_request_goes_alone_in_order(router):
    with Client(_address(router), timeout=30, shm=False) as c:
        with c._io_lock:
            a, b = c.submit("echo", 1), c.submit("echo", 2)
            a.cancel()
            big = c.submit("echo", bytes(protocol.BODY_FRAME_MIN))
            d = c.submit("echo", 4)
        router.wait(5)
        assert router.received() == [(Kind.REQUEST, a.rid), (Kind.REQUEST, b.rid),
                                     (Kind.CANCEL, a.rid), (Kind.REQUEST, big.rid),
                                     (Kind.REQUEST, d.rid)]
        first = router.messages[0]
        assert protocol.unpack_header(first[0]) == (Kind.BUNDLE, 3)
        assert any(len(m) == 2 for m in router.messages)  # the large one: body in frame 1
        c.close()


def test_a_bundle_of_replies_settles_each_request_once(router):
    with Client(_address(router), timeout=30, shm=False) as c:
        ok, fails, streamed, lost, kept = (c.submit("echo", i) for i in range(5))
        router.wait(5)
        router.send(_pong("A"))  # the router this client has been talking to
        router.send(*protocol.pack([
            _head(Kind.PARTIAL, streamed.rid, "a"),
            _head(Kind.RESULT, ok.rid, {"x": 1}),
            _head(Kind.PARTIAL, streamed.rid, "b"),
            _error(fails.rid, "boom"),
            _head(Kind.END, streamed.rid),
            _head(Kind.RESULT, ok.rid, "again"),  # a second reply: counted, not applied
            _pong("B", [lost.rid]),  # a new router: what it does not hold was lost
        ]))
        assert ok.result(10) == {"x": 1} and reply_meta(ok) == {"worker": "default/0"}
        assert isinstance(fails.exception(10), HandlerError)
        assert streamed.result(10) == ["a", "b"]
        assert isinstance(lost.exception(10), RouterRestartedError)
        time.sleep(0.05)
        assert not kept.done() and c.unmatched_replies == 1
        router.send(_head(Kind.RESULT, kept.rid, "late"))
        assert kept.result(10) == "late"


def _bad_bundle(count: int, body: bytes) -> bytes:
    return protocol.HEADER.pack(b"WP", protocol.VERSION, Kind.BUNDLE, count, 0, len(body)) + body


@pytest.mark.parametrize("count, cut", [(3, 0), (2, 1)], ids=["count", "cut-short"])
def test_a_malformed_bundle_is_dropped_whole_and_breaks_nothing(router, count, cut):
    with Client(_address(router), timeout=30, shm=False) as c:
        fut = c.submit("echo", 1)
        router.wait(1)
        inner = _head(Kind.RESULT, fut.rid, "from the bad bundle")
        router.send(_bad_bundle(count, (inner + inner)[:len(inner) * 2 - cut]))
        router.send(b"WP garbage")
        time.sleep(0.05)
        assert not fut.done()  # none of its messages was acted on
        router.send(*protocol.pack([_head(Kind.RESULT, fut.rid, "good"), _pong("A")]))
        assert fut.result(10) == "good" and c.unmatched_replies == 0
        assert c._watch.instance == "A"


# -- AsyncClient ----------------------------------------------------------------------------
def test_async_requests_of_one_turn_go_bundled_and_a_bundle_of_replies_resolves_them(router):
    n = 300

    async def main():
        async with AsyncClient(_address(router), timeout=30, shm=False) as ac:
            calls = asyncio.gather(*(ac.call("echo", i) for i in range(n)))
            rids = await router.wait_async(n)
            assert sorted(rids) == rids and len(set(rids)) == n  # once each, in order
            # The turn's first goes at once (a lone request does not wait), the rest bundled.
            assert router.sent_apart() == 1 + -(-(n - 1) // protocol.BUNDLE_MAX)
            streamed = await ac.submit("count")
            failed = await ac.submit("echo")
            await router.wait_async(n + 2)
            router.send(*protocol.pack(
                [_head(Kind.RESULT, rid, i) for i, rid in enumerate(rids)]
                + [_head(Kind.PARTIAL, streamed.rid, 0), _pong("A"),
                   _error(failed.rid, "boom"), _head(Kind.END, streamed.rid)]))
            assert await asyncio.wait_for(calls, 10) == list(range(n))
            assert await asyncio.wait_for(streamed, 10) == [0]
            with pytest.raises(HandlerError, match="boom"):
                await asyncio.wait_for(failed, 10)
            assert ac._watch.instance == "A" and ac.unmatched_replies == 0

    asyncio.run(main())


def test_async_lone_request_goes_at_once_and_a_malformed_bundle_breaks_nothing(router):
    async def main():
        async with AsyncClient(_address(router), timeout=30, shm=False) as ac:
            fut = await ac.submit("echo", 1)
            assert ac._turn_open and not ac._later  # sent, not held for the turn's end
            await router.wait_async(1)
            router.send(_bad_bundle(2, _head(Kind.RESULT, fut.rid, "bad")))
            await asyncio.sleep(0.05)
            assert not fut.done()
            router.send(protocol.pack([_head(Kind.RESULT, fut.rid, "good")])[0])
            assert await asyncio.wait_for(fut, 10) == "good"

    asyncio.run(main())


def test_a_cancel_in_the_same_turn_follows_its_request(router):
    async def main():
        async with AsyncClient(_address(router), timeout=30, shm=False) as ac:
            first, second = await ac.submit("echo", 1), await ac.submit("echo", 2)
            second.cancel()
            await router.wait_async(3)
            assert router.received() == [(Kind.REQUEST, first.rid), (Kind.REQUEST, second.rid),
                                         (Kind.CANCEL, second.rid)]
            assert router.sent_apart() == 2  # the first at once, then a bundle of two

    asyncio.run(main())


def test_a_malformed_reply_fails_its_request_at_once_and_is_counted(router):
    """A reply that does not decode but names its request fails that request with
    ProtocolError at once (it would otherwise wait out its timeout); one that names none
    (no header, a malformed BUNDLE) is only counted. ``malformed_replies`` counts all."""
    with Client(_address(router), shm=False, timeout=30) as c:
        a, b = c.submit("echo", 1), c.submit("echo", 2)
        ra, rb = router.wait(2)
        router.send(_head(Kind.RESULT, ra, 1)[:-1])  # shorter than its header says
        with pytest.raises(ProtocolError, match="malformed reply from the router") as info:
            a.result(5)
        assert info.value.code == "bad-length"
        router.send(b"WP", protocol.HEADER.pack(b"WP", protocol.VERSION, Kind.BUNDLE, 2, 0, 3)
                    + b"abc")
        router.send(_head(Kind.RESULT, rb, 2))
        assert b.result(5) == 2
        assert c.malformed_replies == 3 and c.unmatched_replies == 0


def test_the_async_client_counts_malformed_replies_too(router):
    async def main() -> None:
        async with AsyncClient(_address(router), shm=False, timeout=30) as c:
            task = asyncio.ensure_future(c.call("echo", 1))
            [rid] = await router.wait_async(1)
            router.send(_head(Kind.RESULT, rid, 1)[:-1])
            with pytest.raises(ProtocolError):
                await task
            assert c.malformed_replies == 1

    asyncio.run(main())
