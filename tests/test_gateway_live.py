"""The HTTP gateway against a real pool, over real HTTP: httpx, curl, raw sockets.

One pool and one gateway for the module (tests that kill something start their own
gateway, or come last): services ``default`` (2 workers), ``tight`` (1 worker, rejects
when full), ``crashy`` (1 worker, for crashes) and ``dead`` (its setup fails).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from ipc import codec
from tests.conftest import Proc, Processes
from workerpool import Client

pytest.importorskip("httptools", reason="the gateway needs the http extra")

TOML = """
[[services]]
name = "default"
handler = "tests.handlers:HttpModel"
workers = 2

[[services]]
name = "tight"
handler = "tests.handlers:HttpModel"
workers = 1
capacity_policy = "reject"
prefetch = 0

[[services]]
name = "crashy"
handler = "tests.handlers:HttpModel"
workers = 1
prefetch = 0

[[services]]
name = "dead"
handler = "tests.handlers:BadSetup"
workers = 1
"""
MAX_BODY = 1 << 20
MAX_BUFFERED = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Env:
    procs: Processes
    pool: Proc
    gateway: Proc
    url: str
    http: httpx.Client

    def status(self) -> dict:
        with Client(self.pool.address) as c:
            return c.status(timeout=5)

    def service(self, name: str) -> dict:
        return next(s for s in self.status()["services"] if s["name"] == name)

    def start_gateway(self, *args: str) -> tuple[Proc, str]:
        port = free_port()
        proc = self.procs.spawn(["gateway", "--router", self.pool.address, "--listen",
                                 f"127.0.0.1:{port}", *args], self.pool.address,
                                "workerpool gateway ready")
        return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def gw():
    procs = Processes()
    try:
        pool = procs.pool_from_config(TOML)
        port = free_port()
        gateway = procs.spawn(["gateway", "--router", pool.address, "--listen",
                               f"127.0.0.1:{port}", "--max-body-bytes", str(MAX_BODY),
                               "--max-buffered", str(MAX_BUFFERED), "--timeout", "30"],
                              pool.address, "workerpool gateway ready")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield Env(procs, pool, gateway, f"http://127.0.0.1:{port}", http)
    finally:
        procs.cleanup()


def _error(r: httpx.Response) -> dict:
    assert r.headers["content-type"] == "application/json", r.text
    return r.json()["error"]


def _wait(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- calls ---------------------------------------------------------------------------------------
def test_json_and_msgpack_in_and_out(gw):
    r = gw.http.post("/v1/default/echo", json={"x": [[1, 2], [3, 4]], "s": "é"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"x": [[1, 2], [3, 4]], "s": "é"}
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    body, _ = codec.Encoder(inline_max=1 << 30).encode({"a": arr})
    r = gw.http.post("/v1/default/echo", content=body,
                     headers={"content-type": "application/msgpack"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/msgpack"
    np.testing.assert_array_equal(codec.loads(r.content)["a"], arr)
    r = gw.http.post("/v1/default/echo", content=body, headers={
        "content-type": "application/msgpack", "accept": "application/json"})
    assert r.json() == {"a": arr.tolist()}
    r = gw.http.post("/v1/default/count", json={"n": 3})  # a stream, called plainly: a list
    assert r.json() == [0, 1, 2]
    r = gw.http.post("/v1/default/sleep?timeout=5", json={"seconds": 0},
                     headers={"x-priority": "10", "x-idempotent": "true"})
    assert r.status_code == 200


def test_curl(gw):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (bin/system-packages installs it as root)")
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-d", '{"x": 1}',
                          f"{gw.url}/v1/default/echo"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert out.splitlines() == ['{"x":1}', "200"]
    out = subprocess.run(["curl", "-sN", "-H", "Accept: text/event-stream", "-d", '{"n": 2}',
                          f"{gw.url}/v1/default/count"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert out == ("event: item\ndata: 0\n\nevent: item\ndata: 1\n\n"
                   "event: end\ndata: null\n\n")


# -- the status table, as tested ------------------------------------------------------------------
def test_bad_requests_are_400_413_415_404_405(gw):
    r = gw.http.post("/v1/default/echo", content=b"{bad",
                     headers={"content-type": "application/json"})
    assert r.status_code == 400 and _error(r)["code"] == "bad-body"
    for url, headers in (("/v1/default/echo?timeout=0", {}), ("/v1/default/echo?timeout=x", {}),
                         ("/v1/default/echo", {"x-priority": "5000"}),
                         ("/v1/default/echo", {"x-idempotent": "maybe"})):
        r = gw.http.post(url, json=1, headers=headers)
        assert r.status_code == 400 and _error(r)["type"] == "ProtocolError", url
    r = gw.http.post("/v1/default/echo", content=b"x" * (MAX_BODY + 1))
    assert r.status_code == 413 and _error(r)["code"] == "body-too-large"

    def chunks():  # no Content-Length: refused as it is read
        for _ in range(4):
            yield b"1" * (MAX_BODY // 2)
    r = gw.http.post("/v1/default/echo", content=chunks())
    assert r.status_code == 413
    r = gw.http.post("/v1/default/echo", content=b"<x/>", headers={"content-type": "text/xml"})
    assert r.status_code == 415
    r = gw.http.get("/v1/default/echo")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = gw.http.get("/nothing/here")
    assert r.status_code == 404 and _error(r)["type"] == "NotFound"
    assert gw.http.post("/v1/default/echo", json=1).status_code == 200  # still serving


def test_a_call_is_answered_alike_read_whole_or_in_chunks(gw):
    """A body of known length up to 256 KiB is answered from callbacks (no task), one
    sent in chunks by the ASGI path: the same status, headers and body either way."""
    packed, _ = codec.Encoder(inline_max=1 << 30).encode({"a": np.arange(3.0)})
    cases = [("/v1/default/echo", b'{"x": [1, 2]}', {}),
             ("/v1/default/echo", packed, {"content-type": "application/msgpack"}),
             ("/v1/default/echo", packed, {"content-type": "application/msgpack",
                                           "accept": "application/json"}),
             ("/v1/default/echo", b"", {}),
             ("/v1/default/echo", b"{bad", {}),
             ("/v1/default/echo?timeout=x", b"1", {}),
             ("/v1/default/echo", b"1", {"x-priority": "5000"}),
             ("/v1/default/echo", b"<x/>", {"content-type": "text/xml"}),
             ("/v1/nope/echo", b"1", {}),
             ("/v1/default/nope", b"1", {}),
             ("/v1/default", b"1", {}),
             ("/v1/default/raise_error", b'{"message": "no"}', {}),
             ("/v1/default/sleep?timeout=0.1", b'{"seconds": 0.5}', {})]
    for url, body, headers in cases:
        whole = gw.http.post(url, content=body, headers=headers)
        chunked = gw.http.post(url, content=iter([body[:1], body[1:]]), headers=headers)
        assert whole.status_code == chunked.status_code, url
        for name in ("content-type", "retry-after", "allow"):
            assert whole.headers.get(name) == chunked.headers.get(name), (url, name)
        if whole.status_code == 200:
            assert whole.content == chunked.content, url
        else:  # the router's answer may depend on the moment: what it says (a time
            # waited, the workers seen), whether to retry (an unknown service is waited for
            # while the router's registration grace lasts), and which worker ran the call
            errors = [r.json()["error"] for r in (whole, chunked)]
            for err in errors:
                for moment in ("message", "retryable", "retry_after", "worker"):
                    err.pop(moment, None)
            assert errors[0] == errors[1], url
    assert whole.status_code == 504
    text = gw.http.get("/metrics").text
    assert 'workerpool_gateway_requests_total{code="504",endpoint="v1"} 2.0' in text


def test_unknown_service_and_method_are_404_saying_which(gw):
    r = gw.http.post("/v1/nope/echo", json=1)
    assert r.status_code == 404
    assert (_error(r)["type"], _error(r)["code"]) == ("ServiceUnavailableError", "unknown-service")
    r = gw.http.post("/v1/default/nope", json=1)
    assert r.status_code == 404 and _error(r)["type"] == "UnknownMethodError"


def test_worker_side_errors_500_502_504(gw):
    r = gw.http.post("/v1/default/raise_error", json={"message": "bad input"})
    err = _error(r)
    assert r.status_code == 500 and err["type"] == "HandlerError"
    assert err["remote_type"] == "ValueError" and "traceback" not in err
    r = gw.http.post("/v1/default/sleep?timeout=0.2", json={"seconds": 1})
    assert r.status_code == 504 and _error(r)["type"] == "RequestTimeoutError"
    r = gw.http.post("/v1/crashy/exit", json={})
    assert r.status_code == 502 and _error(r)["type"] == "WorkerCrashedError"
    r = gw.http.post("/v1/crashy/exit", json={}, headers={"x-idempotent": "true"})
    assert r.status_code == 502 and _error(r)["type"] == "PoisonedRequestError"


def test_overload_is_503_with_retry_after_and_no_live_worker_is_503(gw):
    done = []
    t = threading.Thread(target=lambda: done.append(
        gw.http.post("/v1/tight/sleep", json={"seconds": 1.5})))
    t.start()
    try:
        _wait(lambda: gw.service("tight")["in_flight"] == 1, what="tight busy")
        r = gw.http.post("/v1/tight/echo", json=1)
        assert r.status_code == 503 and _error(r)["type"] == "BackpressureError"
        assert int(r.headers["retry-after"]) >= 1
    finally:
        t.join(30)
    assert done[0].status_code == 200
    r = gw.http.post("/v1/dead/echo", json=1)
    assert r.status_code == 503
    assert (_error(r)["type"], _error(r)["code"]) == ("ServiceUnavailableError", "no-live-workers")


# -- health, metrics, description -----------------------------------------------------------------
def test_health_metrics_openapi(gw):
    assert gw.http.get("/health/live").json() == {"live": True}
    r = gw.http.get("/health/ready")  # `dead` has no worker: not ready, and the body says so
    assert r.status_code == 503
    services = r.json()["services"]
    assert services["default"]["workers"] == 2 and services["dead"]["workers"] == 0
    assert set(services["tight"]) == {"workers", "in_flight", "queued"}
    assert gw.http.post("/v1/default/echo", json=1).status_code == 200
    text = gw.http.get("/metrics").text
    assert 'workerpool_gateway_requests_total{code="200",endpoint="v1"}' in text
    doc = gw.http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/v1/{service}/{method}" in doc["paths"]


# -- streams --------------------------------------------------------------------------------------
def _events(lines) -> list[tuple[str, object]]:
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def test_stream_as_events(gw):
    with gw.http.stream("POST", "/v1/default/count", json={"n": 4},
                        headers={"accept": "text/event-stream"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.iter_lines())
    assert events == [("item", 0), ("item", 1), ("item", 2), ("item", 3), ("end", None)]
    r = gw.http.post("/v1/default/nope", json=1, headers={"accept": "text/event-stream"})
    assert r.status_code == 404  # refused before the stream began: a plain error reply


def test_client_leaving_mid_stream_cancels_at_the_router(gw):
    before = gw.service("default")["cancelled"]
    with gw.http.stream("POST", "/v1/default/ticks", json={"n": 400, "every": 0.02},
                        headers={"accept": "text/event-stream"}) as r:
        lines = r.iter_lines()
        assert _events(next(lines) for _ in range(5)) == [("item", 0), ("item", 1)]
    # The connection is closed: the gateway cancels, and the router counts it.
    st = _wait(lambda: (s := gw.service("default"))["cancelled"] > before and s, what="cancel")
    assert st["cancelled"] == before + 1
    _wait(lambda: gw.service("default")["in_flight"] == 0, what="nothing in flight")


def _metric(gw, name: str) -> float:
    for line in gw.http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_client_leaving_a_plain_call_cancels_it_at_the_router(gw):
    before = gw.service("crashy")["cancelled"]
    gone = _metric(gw, "workerpool_gateway_client_disconnects_total")
    port = int(gw.url.rsplit(":", 1)[1])
    body = b'{"seconds": 1.0}'
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/crashy/sleep HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                  % (len(body), body))
        _wait(lambda: gw.service("crashy")["in_flight"] == 1, what="the call to run")
    _wait(lambda: gw.service("crashy")["cancelled"] == before + 1, what="cancel at the router")
    assert _metric(gw, "workerpool_gateway_client_disconnects_total") == gone + 1
    _wait(lambda: gw.service("crashy")["in_flight"] == 0, what="the call to end")


def _hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_reader_that_does_not_read_costs_bounded_memory(gw):
    """96 MiB of items for a client that reads nothing: the gateway buffers MAX_BUFFERED
    of them, ends the stream (stream-overrun) and cancels it at the router."""
    pid = gw.gateway.popen.pid
    before_hwm, before = _hwm(pid), gw.service("default")["cancelled"]
    body = json.dumps({"n": 3072, "size": 32768}).encode()
    port = int(gw.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"POST /v1/default/blobs HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n"
                  b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                  % (len(body), body))
        assert s.recv(12) == b"HTTP/1.1 200"
        _wait(lambda: "workerpool_gateway_streams_overrun_total 1.0" in
              gw.http.get("/metrics").text, what="the stream to overrun: "
              + gw.http.get("/metrics").text[-3000:] + str(gw.service("default")))
        _wait(lambda: gw.service("default")["cancelled"] > before, what="cancel at the router")
    grown = _hwm(pid) - before_hwm
    assert grown < 48 * 2**20, f"gateway peak RSS grew {grown / 2**20:.0f} MiB"


# -- wrk -----------------------------------------------------------------------------------------
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"x": [1, 2, 3]}'
wrk.headers["Content-Type"] = "application/json"
"""


def test_wrk(gw, tmp_path):
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (bin/system-packages installs it as root)")
    script = tmp_path / "post.lua"
    script.write_text(WRK_SCRIPT)
    out = subprocess.run(["wrk", "-t1", "-c8", "-d1s", "-s", str(script),
                          f"{gw.url}/v1/default/echo"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "Requests/sec" in out, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    done = int(out.split(" requests in ")[0].split()[-1])
    assert done > 0


# -- KServe v2 with Triton's own client ----------------------------------------------------------
def test_kserve_v2_with_tritonclient(gw):
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(gw.url.removeprefix("http://"))
    try:
        assert client.is_server_live()
        assert client.is_model_ready("default")
        assert not client.is_model_ready("dead")
        meta = client.get_model_metadata("default")
        assert meta["name"] == "default" and meta["inputs"][0]["name"] == "x"
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        for binary in (True, False):
            inp = httpclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            outs = [httpclient.InferRequestedOutput("y", binary_data=binary),
                    httpclient.InferRequestedOutput("total", binary_data=not binary)]
            res = client.infer("default", [inp], outputs=outs, request_id="r7")
            np.testing.assert_array_equal(res.as_numpy("y"), x * 2)
            assert res.as_numpy("total").tolist() == [28.0]
            assert res.get_response()["id"] == "r7"
        res = client.infer("default", [inp])  # no outputs named: all, in binary
        np.testing.assert_array_equal(res.as_numpy("y"), x * 2)
        with pytest.raises(InferenceServerException) as e:
            client.infer("nope", [inp])
        assert e.value.status() == "404"
    finally:
        client.close()


def test_kserve_bytes_tensors_with_tritonclient(gw):
    """BYTES in and out, binary and JSON: the handler gets lists of bytes nested to the
    shape (its ``lengths`` output has that shape), and returns nested bytes."""
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    text = np.array([[b"ab", "\u00e9".encode(), b""], [b"\xff\x00", b"xyz", b"q"]],
                    dtype=np.object_)
    client = httpclient.InferenceServerClient(gw.url.removeprefix("http://"))
    try:
        inp = httpclient.InferInput("text", [2, 3], "BYTES")
        inp.set_data_from_numpy(text)  # binary: length-prefixed elements
        res = client.infer("default", [inp])  # no outputs named: all, in binary
        assert res.as_numpy("upper").tolist() == [[b"AB", "\u00e9".encode(), b""],
                                                  [b"\xff\x00", b"XYZ", b"Q"]]
        assert res.as_numpy("lengths").tolist() == [[2, 2, 0], [2, 3, 1]]
        words = np.array([["a", "b\u00e9"]], dtype=np.object_)
        inp = httpclient.InferInput("text", [1, 2], "BYTES")
        inp.set_data_from_numpy(words, binary_data=False)  # JSON strings, both ways
        res = client.infer("default", [inp], outputs=[
            httpclient.InferRequestedOutput("upper", binary_data=False)])
        assert res.get_output("upper")["data"] == ["A", "B\u00e9"]
        assert res.as_numpy("upper").tolist() == [["A", "B\u00e9"]]
        inp = httpclient.InferInput("text", [2, 3], "BYTES")
        inp.set_data_from_numpy(text)
        with pytest.raises(InferenceServerException) as e:  # b"\xff\x00" is not text
            client.infer("default", [inp], outputs=[
                httpclient.InferRequestedOutput("upper", binary_data=False)])
        assert e.value.status() == "400" and "not UTF-8" in e.value.message()
    finally:
        client.close()


def test_kserve_bf16_tensors_with_tritonclient(gw):
    """BF16 as binary data both ways: ml_dtypes.bfloat16 at the client, torch.bfloat16 in
    the handler; asked for as JSON it is 400, as in Triton."""
    httpclient = pytest.importorskip("tritonclient.http")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    pytest.importorskip("torch", reason="BF16 reaches the handler as torch.bfloat16")
    from tritonclient.utils import InferenceServerException, triton_to_np_dtype

    if triton_to_np_dtype("BF16") != ml_dtypes.bfloat16:
        pytest.skip("this tritonclient predates BF16 as ml_dtypes.bfloat16")
    h = np.array([[1.0, -2.5, 0.5], [256.0, 3.0, -0.125]], dtype=ml_dtypes.bfloat16)
    client = httpclient.InferenceServerClient(gw.url.removeprefix("http://"),
                                              network_timeout=60)
    try:
        inp = httpclient.InferInput("h", [2, 3], "BF16")
        inp.set_data_from_numpy(h)
        res = client.infer("default", [inp], outputs=[
            httpclient.InferRequestedOutput("h2", binary_data=True)])
        out = res.as_numpy("h2")
        assert out.dtype == ml_dtypes.bfloat16 and out.shape == (2, 3)
        assert out.astype(np.float32).tolist() == (h.astype(np.float32) * 2).tolist()
        with pytest.raises(InferenceServerException) as e:
            client.infer("default", [inp], outputs=[
                httpclient.InferRequestedOutput("h2", binary_data=False)])
        assert e.value.status() == "400" and "binary data" in e.value.message()
    finally:
        client.close()


def _v2_post(gw, inputs: list, blob: bytes = b"") -> httpx.Response:
    head = json.dumps({"inputs": inputs}).encode()
    return gw.http.post("/v2/models/default/infer", content=head + blob, headers={
        "inference-header-content-length": str(len(head))})


def test_kserve_malformed_bytes_and_bf16_are_400(gw):
    def binary(name, kind, shape, size):
        return {"name": name, "datatype": kind, "shape": shape,
                "parameters": {"binary_data_size": size}}

    past = struct.pack("<I", 50) + b"abc"  # the length prefix runs past the data
    two = struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b"
    for inputs, blob, says in (
            ([binary("text", "BYTES", [1], len(past))], past, "runs past the data"),
            ([binary("text", "BYTES", [3], len(two))], two, "shape holds 3"),
            ([{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a", "b"]}], b"",
             "2 values for shape [3]"),
            ([{"name": "h", "datatype": "BF16", "shape": [2], "data": [1.0, 2.0]}], b"",
             "only as binary data"),
            ([binary("h", "BF16", [2], 3)], b"\x80\x3f" * 2, "binary_data_size 3")):
        r = _v2_post(gw, inputs, blob)
        assert r.status_code == 400, (says, r.text)
        assert r.json()["error"].startswith("PayloadError:") and says in r.json()["error"]
    r = _v2_post(gw, [binary("text", "BYTES", [2], len(two))], two)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == ["A", "B"]


# -- tokens and TLS ------------------------------------------------------------------------------
def test_bearer_tokens_and_tls(gw, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate to test TLS with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    token = "t0k3n-" + "a" * 32
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# the tests\n{token}\n")
    proc, where = gw.start_gateway("--tokens", str(tokens), "--tls-cert", str(cert),
                                   "--tls-key", str(key))
    with httpx.Client(base_url=f"https://{where}", timeout=30,
                      verify=ssl.create_default_context(cafile=str(cert))) as h:
        r = h.post("/v1/default/echo", json=1)
        assert r.status_code == 401 and _error(r)["type"] == "Unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = h.post("/v1/default/echo", json=1, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = h.post("/v1/default/echo", json=2, headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json() == 2
        assert h.get("/health/live").status_code == 200  # probes carry no token
        assert h.get("/metrics").status_code == 401
    proc.stop()


# -- processes that die --------------------------------------------------------------------------
def test_a_gateway_killed_with_requests_in_flight_leaves_nothing_on_the_router(gw):
    proc, where = gw.start_gateway()
    port = int(where.rsplit(":", 1)[1])
    socks = []
    body = b'{"seconds": 1.0}'
    for _ in range(6):  # 2 running, 2 held ahead, 2 queued
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/default/sleep HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                  % (len(body), body))
        socks.append(s)
    try:
        _wait(lambda: gw.service("default")["in_flight"] >= 2, what="requests in flight")
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(10)
        _wait(lambda: (s := gw.service("default"))["in_flight"] == 0 and s["queued"] == 0,
              timeout=20, what="the router to drop the dead gateway's requests")
        assert gw.status()["router"]["counters"]["clients_gone"] >= 1
    finally:
        for s in socks:
            s.close()


def test_router_restart_under_load_answers_502_or_503_never_hangs(gw):
    """Last: it restarts the module's router. Every call ends with a status, none waits
    past its timeout, and calls succeed again once the workers are back, on each of the
    gateway's router connections (one caller per loopback address, each on its own)."""
    per_caller: list[list[int]] = [[] for _ in range(4)]
    stop = threading.Event()

    def load(results: list[int], source: str) -> None:
        with httpx.Client(base_url=gw.url, timeout=30,
                          transport=httpx.HTTPTransport(local_address=source)) as h:
            while not stop.is_set():
                results.append(h.post("/v1/default/sleep?timeout=10",
                                      json={"seconds": 0.05}).status_code)

    threads = [threading.Thread(target=load, args=(r, f"127.0.0.{i + 1}"))
               for i, r in enumerate(per_caller)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: all(len(r) > 5 for r in per_caller), what="load")

        def connections_used() -> int:
            return sum(1 for line in gw.http.get("/metrics").text.splitlines()
                       if line.startswith("workerpool_gateway_router_connection_in_flight{")
                       and not line.endswith(" 0.0"))
        _wait(lambda: connections_used() >= 2, what="callers on several connections")
        os.kill(gw.status()["router"]["pid"], signal.SIGKILL)
        counts = [len(r) for r in per_caller]
        _wait(lambda: all(len(r) > n + 2 and r[-1] == 200 and r[-2] == 200
                          for r, n in zip(per_caller, counts, strict=True)),
              timeout=30, what="every caller's calls to succeed after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(40)
    assert not any(t.is_alive() for t in threads)
    results = {code for r in per_caller for code in r}
    assert results <= {200, 502, 503}, sorted(results)
    assert {502, 503} & results  # the requests the old router held
