"""The gateway's HTTP/1.1 server (workerpool/gateway/http11.py), on its own: a small ASGI
app on a loopback socket, driven with raw bytes so every framing rule is seen as sent."""

from __future__ import annotations

import asyncio
import gc
import socket

import pytest

pytest.importorskip("httptools", reason="the gateway needs the http extra")

from workerpool.gateway import http11
from workerpool.gateway.http11 import HttpServer


class App:
    """Echoes the body; ``/slow`` answers after ``delay``; ``/stream`` sends chunks without
    a length; ``/early`` answers 413 without reading the body; ``/wait`` waits for the
    client to leave; ``/boom`` raises."""

    def __init__(self) -> None:
        self.gone: list[str] = []
        self.received: list[dict] = []
        self.delay = 0.2

    async def __call__(self, scope, receive, send) -> None:
        path = scope["path"]
        if path == "/boom":
            raise RuntimeError("a bug")
        if path == "/early":
            await _reply(send, 413, b"too large")
            return
        if path == "/wait":
            exchange = scope["extensions"]["workerpool.connection"]
            left = asyncio.get_running_loop().create_future()
            exchange.when_gone(lambda: left.set_result(None))
            await left
            self.gone.append(path)
            self.received.append(await receive())
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if path == "/slow":
            await asyncio.sleep(self.delay)
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for part in (b"one", b"two"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        await _reply(send, 200, path.encode() + b":" + body)


async def _reply(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Whole:
    """A ``Whole`` handler for paths under ``/w``: answers ``whole:BODY`` after
    ``delay`` seconds from a timer's callback; ``/w/never`` is never answered (its client
    leaving is recorded), ``/w/boom`` raises."""

    def __init__(self) -> None:
        self.delay = 0.01
        self.calls: list[str] = []
        self.gone: list[str] = []

    def wants_whole(self, scope) -> bool:
        return scope["path"].startswith("/w")

    def answer_whole(self, exchange, body: bytes) -> None:
        path = exchange.scope["path"]
        self.calls.append(path)
        if path == "/w/boom":
            raise RuntimeError("a bug")
        exchange.when_gone(lambda: self.gone.append(path))
        if path != "/w/never":
            asyncio.get_running_loop().call_later(self.delay, lambda: exchange.respond(
                200, [(b"content-length", b"%d" % (len(body) + 6))], b"whole:" + body))


def serve(test, keep_alive: float = http11.KEEP_ALIVE,
          body_timeout: float = http11.BODY_TIMEOUT, whole: Whole | None = None):
    """Run ``await test(server, port, app)`` with a server on a free loopback port."""

    async def main() -> None:
        app = App()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        server = HttpServer(app, whole=whole, keep_alive=keep_alive, body_timeout=body_timeout)
        await server.start(sock)
        try:
            await test(server, sock.getsockname()[1], app)
        finally:
            await server.stop(1.0)
            sock.close()

    asyncio.run(main())


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    """One response: status, headers (lower-case names), body (by length or chunks)."""
    line = await asyncio.wait_for(reader.readline(), 5)
    assert line, "the connection closed before a response"
    status = int(line.split()[1])
    headers = {}
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readline()).strip(), 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readexactly(2)
        return status, headers, body
    return status, headers, await reader.read()  # delimited by the close


def post(path: str, body: bytes = b"", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 5) == b""


async def until(condition, seconds: float = 2.0) -> None:
    """Wait for ``condition()`` to hold, checking every 20 ms, for up to ``seconds``."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)


async def answered_then_closed(port: int, data: bytes) -> tuple[int, dict, bytes]:
    """Send ``data`` on a new connection: its one response, once the server has closed
    the connection after it (asserted)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    response = await read_response(reader)
    assert response[1]["connection"] == "close"
    assert await closed(reader)
    writer.close()
    return response


def test_keep_alive_answers_each_request_on_one_connection():
    async def test(server, port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(3):
            writer.write(post("/echo", b"x%d" % i))
            status, headers, body = await read_response(reader)
            assert (status, body) == (200, b"/echo:x%d" % i)
            assert "date" in headers and "connection" not in headers
        writer.close()

    serve(test)


async def collected_after(port: int, request: bytes, times: int = 200) -> int:
    """Objects the garbage collector finds after ``request`` was answered ``times``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def one() -> None:
        writer.write(request)
        await read_response(reader)

    await one()
    gc.collect()
    gc.disable()
    try:
        for _ in range(times):
            await one()
        return gc.collect()
    finally:
        gc.enable()
        writer.close()


@pytest.mark.parametrize("path", ["/echo", "/w"])
def test_a_request_leaves_no_reference_cycle_behind(path):
    """What a request allocates is freed when it ends, not by the garbage collector:
    cycles per request made collections, and their pauses, part of every tail latency.
    ``/w`` is answered whole, from a callback."""
    whole = Whole()
    whole.delay = 0

    async def test(server, port, app):
        # 9 a request (1,800) when the scope and its exchange held each other
        assert await collected_after(port, post(path, b"x")) < 50

    serve(test, whole=whole)


def test_pipelined_requests_are_answered_in_order():
    async def test(server, port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/slow", b"a") + post("/echo", b"b") + post("/slow", b"c"))
        got = [(await read_response(reader))[2] for _ in range(3)]
        assert got == [b"/slow:a", b"/echo:b", b"/slow:c"]
        writer.close()

    serve(test)


@pytest.mark.parametrize("head, interim, rest, body", [
    # The client holds its body until the app asks for it.
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n"
     b"\r\n", b"HTTP/1.1 100 Continue\r\n\r\n", b"body", b"/echo:body"),
    # Chunks in two reads, joined.
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
     b"", b"2\r\nde\r\n0\r\n\r\n", b"/echo:abcde"),
], ids=["100-continue", "chunked"])
def test_a_body_that_comes_after_its_head(head, interim, rest, body):
    async def test(server, port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        if interim:
            assert await asyncio.wait_for(reader.readexactly(len(interim)), 5) == interim
        else:
            await asyncio.sleep(0.05)
        writer.write(rest)
        assert (await read_response(reader))[::2] == (200, body)
        writer.close()

    serve(test)


@pytest.mark.parametrize("request_bytes, status, body", [
    # Answered without 100 Continue, the client may never send the body: nothing after it
    # on the connection could be framed.
    (b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: 99999\r\n"
     b"Expect: 100-continue\r\n\r\n", 413, b"too large"),
    # Another protocol asked for: answered in HTTP/1.1; what follows is not read.
    (b"GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"\r\n\x81\x05frame", 200, b"/echo:"),
    # The application failed before answering.
    (post("/boom"), 500, b"Internal Server Error"),
], ids=["held-body", "upgrade", "app-failed"])
def test_answers_after_which_the_connection_closes(request_bytes, status, body):
    async def test(server, port, app):
        assert (await answered_then_closed(port, request_bytes))[::2] == (status, body)

    serve(test)


def test_an_answer_before_a_sent_body_keeps_the_connection_and_drops_the_body():
    async def test(server, port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/early", b"z" * 300000) + post("/echo", b"next"))
        assert (await read_response(reader))[0] == 413
        assert (await read_response(reader))[::2] == (200, b"/echo:next")
        writer.close()

    serve(test)


@pytest.mark.parametrize("request_bytes, status", [
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST /echo HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nContent-Length: 2"
     b"\r\n\r\nhi", 400),
    (b"GET /echo HTTP/1.1\r\n" + b"X-Big: " + b"a" * (http11.MAX_HEAD_BYTES + 1) + b"\r\n\r\n",
     431),
    (b"GET /echo HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i
                                          for i in range(http11.MAX_HEADERS + 1)) + b"\r\n",
     431),
])
def test_an_unreadable_request_is_answered_with_a_json_error_and_closed(request_bytes, status):
    async def test(server, port, app):
        got, _, body = await answered_then_closed(port, request_bytes)
        assert got == status
        assert body.startswith(b'{"error":{"type":"ProtocolError"')

    serve(test)


def test_a_bad_request_is_refused_after_the_answers_to_those_before_it():
    async def test(server, port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/slow", b"a") + post("/echo", b"b") + b"GARBAGE\r\n\r\n")
        assert (await read_response(reader))[::2] == (200, b"/slow:a")
        assert (await read_response(reader))[::2] == (200, b"/echo:b")
        assert (await read_response(reader))[0] == 400
        assert await closed(reader)

    serve(test)


def test_an_upgrade_behind_one_in_flight_is_answered_after_it_then_closed():
    async def test(server, port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/slow", b"a") + b"GET /echo HTTP/1.1\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n\x81\x05frame")
        assert (await read_response(reader))[::2] == (200, b"/slow:a")
        status, headers, body = await read_response(reader)
        assert (status, headers["connection"], body) == (200, "close", b"/echo:")
        assert await closed(reader)

    serve(test)


def test_a_deep_pipeline_is_answered_up_to_its_limit_then_refused():
    async def test(server, port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = http11.MAX_PIPELINE + 1  # answered: the one in flight and MAX_PIPELINE behind
        writer.write(post("/slow", b"first") + post("/echo", b"x") * (n + 50))
        assert (await read_response(reader))[2] == b"/slow:first"
        for _ in range(n - 1):
            assert (await read_response(reader))[2] == b"/echo:x"
        status, headers, body = await read_response(reader)
        assert (status, headers["connection"]) == (400, "close")
        assert b"pipelined" in body
        assert await closed(reader)

    serve(test)


def test_a_response_without_a_length_is_chunked_and_head_gets_no_body():
    async def test(server, port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/stream"))
        _, headers, body = await read_response(reader)
        assert (headers["transfer-encoding"], body) == ("chunked", b"onetwo")
        writer.write(b"HEAD /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"content-length: 6" in head  # "/echo:" as a GET would have it
        writer.write(post("/echo", b"after"))  # nothing of HEAD's body is on the wire
        assert (await read_response(reader))[::2] == (200, b"/echo:after")
        writer.close()

    serve(test)


def test_http_1_0_is_answered_and_closed_and_a_stream_is_ended_by_the_close():
    async def test(server, port, app):
        for path, want in ((b"/echo", b"/echo:"), (b"/stream", b"onetwo")):
            status, headers, body = await answered_then_closed(
                port, b"POST " + path + b" HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            assert (status, body) == (200, want)
            assert "transfer-encoding" not in headers

    serve(test)


def test_a_client_that_leaves_is_told_to_the_app_at_once():
    async def test(server, port, app):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/wait"))
        await asyncio.sleep(0.1)
        writer.close()
        await until(lambda: app.gone)
        assert app.gone == ["/wait"]
        assert app.received == [{"type": "http.disconnect"}]
        assert not server.tasks

    serve(test)


def test_an_interrupt_inside_the_parser_is_not_taken_for_a_bad_request(monkeypatch):
    """A KeyboardInterrupt (or SystemExit) raised while a request is parsed stops the
    server as it would anywhere else; it is not answered as the client's 400."""
    async def test(server, port, app):
        def interrupted(self, url):
            raise KeyboardInterrupt

        monkeypatch.setattr(http11.HttpConnection, "on_url", interrupted)
        conn = http11.HttpConnection(server)
        writes: list[bytes] = []
        conn.transport = type("T", (), {"write": writes.append, "is_closing": lambda s: False,
                                        "pause_reading": lambda s: None})()
        with pytest.raises(KeyboardInterrupt):
            conn.data_received(post("/echo"))
        assert writes == [] and conn.refused is None

    serve(test)


def test_idle_connections_are_closed_after_the_keep_alive_time(monkeypatch):
    monkeypatch.setattr(http11, "SWEEP", 0.05)

    async def test(server, port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/echo"))
        await read_response(reader)
        assert await closed(reader)
        assert not server.connections

    serve(test, keep_alive=0.2)


def test_a_body_that_stops_arriving_closes_its_connection_and_the_app_sees_it(monkeypatch):
    monkeypatch.setattr(http11, "SWEEP", 0.05)

    async def test(server, port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /wait HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        assert await closed(reader)
        await until(lambda: app.gone)
        assert app.gone == ["/wait"]
        assert not server.connections

    serve(test, body_timeout=0.3)


def test_stop_finishes_answers_in_flight_and_closes_every_connection():
    async def test(server, port, app):
        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        idle_w.write(post("/echo"))
        await read_response(idle_r)
        busy_w.write(post("/slow", b"last"))
        await asyncio.sleep(0.05)
        await server.stop(5.0)
        status, headers, body = await read_response(busy_r)
        assert (status, headers["connection"], body) == (200, "close", b"/slow:last")
        assert await closed(busy_r) and await closed(idle_r)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    serve(test)


def test_stop_cancels_what_outlives_its_grace():
    async def test(server, port, app):
        app.delay = 30
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/slow"))
        await asyncio.sleep(0.05)
        await server.stop(0.2)
        assert await closed(reader)
        assert not server.tasks

    serve(test)


# -- requests answered whole, from callbacks (the Whole handler) ------------------------------------
def test_a_small_request_goes_whole_and_any_other_to_the_app():
    """Whole: a body of known length up to WHOLE_MAX_BYTES. A larger one, one in chunks,
    or one whose client waits for 100 Continue is read as it comes, by the app."""
    whole = Whole()

    async def test(server, port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/w", b"small"))
        assert (await read_response(reader))[::2] == (200, b"whole:small")
        writer.write(post("/echo", b"x"))  # not wanted by the handler
        assert (await read_response(reader))[::2] == (200, b"/echo:x")
        big = b"b" * (http11.WHOLE_MAX_BYTES + 1)
        writer.write(post("/w", big))
        assert (await read_response(reader))[::2] == (200, b"/w:" + big)
        writer.write(b"POST /w HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\n\r\n")
        assert (await read_response(reader))[::2] == (200, b"/w:abc")
        writer.write(post("/w", b"cont", "Expect: 100-continue\r\n"))  # sent at once all
        assert (await read_response(reader))[::2] == (200, b"/w:cont")  # the same
        writer.write(post("/w", b"again"))  # the same connection, whole again
        assert (await read_response(reader))[::2] == (200, b"whole:again")
        assert whole.calls == ["/w", "/w"] and server.whole_open == 0
        writer.close()

    serve(test, whole=whole)


def test_whole_and_app_answers_pipelined_go_out_in_request_order():
    """A request read while another is answered waits its turn as the app's (the Whole
    handler gets only a request it can answer at once)."""
    whole = Whole()
    whole.delay = 0.1

    async def test(server, port, app):
        app.delay = 0.05
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/w", b"1") + post("/slow", b"2") + post("/w", b"3"))
        bodies = [(await read_response(reader))[2] for _ in range(3)]
        assert bodies == [b"whole:1", b"/slow:2", b"/w:3"]
        writer.close()

    serve(test, whole=whole)


def test_a_client_leaving_a_whole_request_is_told_at_once():
    whole = Whole()

    async def test(server, port, app):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/w/never", b"x"))
        await until(lambda: whole.calls)
        assert server.whole_open == 1
        writer.close()
        await until(lambda: whole.gone)
        assert whole.gone == ["/w/never"] and server.whole_open == 0

    serve(test, whole=whole)


def test_a_whole_handler_that_raises_costs_its_request_a_500_and_the_connection():
    whole = Whole()

    async def test(server, port, app):
        status, _, body = await answered_then_closed(port, post("/w/boom", b"x"))
        assert (status, body) == (500, b"Internal Server Error")
        assert server.whole_open == 0
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/w", b"next"))
        assert (await read_response(reader))[2] == b"whole:next"
        writer.close()

    serve(test, whole=whole)


def test_a_connection_whose_writes_are_paused_gets_no_whole_request():
    """respond() does not wait for a slow reader; so while a connection's writes are
    paused its requests go to the app, whose send() waits: at most one whole response
    is ever held past the transport's limit."""
    whole = Whole()

    async def test(server, port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/w", b"1"))
        await read_response(reader)
        (conn,) = server.connections
        conn.pause_writing()
        writer.write(post("/w", b"2"))
        await until(lambda: conn.current is not None, 10)
        assert whole.calls == ["/w"]  # the second went to the app, which waits
        conn.resume_writing()
        assert (await read_response(reader))[2] == b"/w:2"
        writer.close()

    serve(test, whole=whole)


def test_stop_waits_for_whole_answers_then_closes_what_outlives_its_grace():
    whole = Whole()
    whole.delay = 0.3

    async def test(server, port, app):
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(post("/w", b"last"))
        w2.write(post("/w/never", b"x"))
        await until(lambda: len(whole.calls) == 2)
        stopping = asyncio.ensure_future(server.stop(2.0))
        status, headers, body = await read_response(r1)
        assert (status, headers["connection"], body) == (200, "close", b"whole:last")
        assert not stopping.done()  # /w/never still has its grace
        await stopping
        assert await closed(r2) and whole.gone == ["/w/never"] and server.whole_open == 0

    serve(test, whole=whole)


# -- the gateway's /v1 calls answered whole, against a stand-in router connection ------------------
class StandIn:
    """An AsyncClient's ``submit_nowait``: each call's Future is kept for the test to
    settle; ``broken`` makes the next call raise (a bug in the gateway's path)."""

    streams_overrun = 0

    def __init__(self) -> None:
        self.futures: list[asyncio.Future] = []
        self.broken = False

    def submit_nowait(self, method, payload, **fields) -> asyncio.Future:
        if self.broken:
            raise RuntimeError("a bug")
        fut = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut

    async def close(self) -> None:
        pass


def test_a_bug_on_the_whole_path_costs_its_call_a_500_not_the_gateway():
    from workerpool.gateway.app import Gateway, Settings

    async def main() -> None:
        stand_in = StandIn()
        gateway = Gateway(lambda: stand_in, Settings(router_connections=1))
        await gateway.start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        server = HttpServer(gateway, whole=gateway)
        await server.start(sock)
        try:
            reader, writer = await asyncio.open_connection(*sock.getsockname())
            writer.write(post("/v1/default/echo", b"1"))
            await until(lambda: stand_in.futures)
            stand_in.futures[0].set_result({"ok": 1})
            assert (await read_response(reader))[::2] == (200, b'{"ok":1}')
            writer.write(post("/v1/default/echo", b"2"))
            await until(lambda: len(stand_in.futures) == 2)
            stand_in.futures[1].cancel()  # not by the client leaving: a bug
            status, _, body = await read_response(reader)
            assert status == 500 and b"the gateway failed" in body
            stand_in.broken = True
            writer.write(post("/v1/default/echo", b"3"))
            status, _, body = await read_response(reader)
            assert status == 500 and b"the gateway failed" in body
            stand_in.broken = False
            writer.write(post("/v1/default/echo", b"4"))  # the same connection serves on
            await until(lambda: len(stand_in.futures) == 3)
            stand_in.futures[2].set_result(4)
            assert (await read_response(reader))[::2] == (200, b"4")
            assert gateway.answering == 0 and gateway.callers.in_flight == [0]
            text = gateway.metrics.render().decode()
            assert 'workerpool_gateway_requests_total{code="500",endpoint="v1"} 2.0' in text
            writer.close()
        finally:
            await server.stop(1.0)
            sock.close()

    asyncio.run(main())
