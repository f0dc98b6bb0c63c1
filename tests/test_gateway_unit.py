"""The gateway's decisions with plain values: the status table, bodies, events, KServe v2
translation, readiness and its cache, tokens, request fields. No sockets, no server."""

from __future__ import annotations

import asyncio
import json

import msgpack
import numpy as np
import pytest

from ipc import codec
from workerpool.errors import (
    BackpressureError,
    HandlerError,
    PoisonedRequestError,
    RequestTimeoutError,
    ServiceUnavailableError,
    UnknownMethodError,
    WorkerCrashedError,
)
from workerpool.gateway import bodies, health, kserve, sse, statuses
from workerpool.gateway.app import parse_timeout, request_fields
from workerpool.gateway.bodies import BodyError
from workerpool.gateway.tokens import TokenFileError, Tokens, bearer


# -- the status table ---------------------------------------------------------------------------
@pytest.mark.parametrize(("err", "status"), [
    (BackpressureError("full", code="service-full", retry_after=0.2), 503),
    (ServiceUnavailableError("no live", code="no-live-workers"), 503),
    (ServiceUnavailableError("unknown service 'x'", code="unknown-service"), 404),
    (ServiceUnavailableError("shutting down", code="shutting-down"), 503),
    (UnknownMethodError("no method"), 404),
    (RequestTimeoutError("deadline"), 504),
    (HandlerError("ValueError: x", remote_type="ValueError", traceback="Traceback..."), 500),
    (WorkerCrashedError("died"), 502),
    (PoisonedRequestError("poisoned"), 502),
])
def test_each_error_type_has_its_status(err, status):
    assert statuses.status_of(err.to_wire())[0] == status


def test_backpressure_gets_retry_after_in_whole_seconds_rounded_up():
    def after(value):
        return dict(statuses.status_of({"type": "BackpressureError", "retry_after": value})[1])
    assert after(0.001) == {"retry-after": "1"}
    assert after(1.0) == {"retry-after": "1"}
    assert after(1.2) == {"retry-after": "2"}
    assert after(59.999) == {"retry-after": "60"}
    assert after("x") == {} and after(float("nan")) == {} and after(True) == {}
    assert statuses.status_of({"type": "HandlerError", "retry_after": 3})[1] == []


def test_the_gateways_own_errors_and_unknown_types():
    assert statuses.status_of({"type": "PayloadError", "code": "body-too-large"})[0] == 413
    assert statuses.status_of({"type": "PayloadError", "code": "bad-body"})[0] == 400
    assert statuses.status_of({"type": "UnsupportedMediaType"})[0] == 415
    assert statuses.status_of({"type": "Unauthorized"})[0] == 401
    assert statuses.status_of({"type": "TooManyRequests", "code": "caller-limit",
                               "retry_after": 1.0}) == (429, [("retry-after", "1")])
    assert statuses.status_of({"type": "SomethingNewer"})[0] == 500
    assert statuses.status_of({})[0] == 500


def test_error_json_hides_the_traceback_and_keeps_the_rest():
    wire = HandlerError("ValueError: x", worker="default/0", remote_type="ValueError",
                        traceback="Traceback ...").to_wire()
    body = json.loads(statuses.error_json(wire))["error"]
    assert body == {"type": "HandlerError", "message": "ValueError: x", "retryable": False,
                    "worker": "default/0", "remote_type": "ValueError"}


# -- bodies -------------------------------------------------------------------------------------
def test_media_types():
    assert bodies.media_type(None) == bodies.JSON
    assert bodies.media_type("application/json; charset=utf-8") == bodies.JSON
    assert bodies.media_type("Application/MsgPack") == bodies.MSGPACK
    assert bodies.media_type("application/x-www-form-urlencoded") == bodies.JSON  # curl -d
    with pytest.raises(BodyError) as e:
        bodies.media_type("text/xml")
    assert statuses.status_of(e.value.error)[0] == 415
    assert bodies.accepted(None, bodies.MSGPACK) == bodies.MSGPACK
    assert bodies.accepted("text/html, application/msgpack;q=0.9", bodies.JSON) == bodies.MSGPACK
    assert bodies.accepted("*/*", bodies.JSON) == bodies.JSON


def test_decoding_json_and_msgpack_with_arrays():
    assert bodies.decode(b"", bodies.JSON) is None
    assert bodies.decode(b'{"x": [[1, 2], [3, 4]]}', bodies.JSON) == {"x": [[1, 2], [3, 4]]}
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    body = bodies.encode({"a": arr}, bodies.MSGPACK)
    back = bodies.decode(body, bodies.MSGPACK)
    np.testing.assert_array_equal(back["a"], arr)
    big = np.zeros(1 << 16, np.uint8)  # over the codec's inline size: still inline here
    assert codec.loads(bodies.encode(big, bodies.MSGPACK)).shape == big.shape


@pytest.mark.parametrize("body", [b"{bad", b"\xff\xfe\xfd", b"[" * 100_000])
def test_malformed_json_is_400(body):
    with pytest.raises(BodyError) as e:
        bodies.decode(body, bodies.JSON)
    assert statuses.status_of(e.value.error)[0] == 400


def test_msgpack_that_is_not_a_payload_is_400():
    bad_ext = msgpack.packb(msgpack.ExtType(42, b"x"))
    frame_ref = msgpack.packb(msgpack.ExtType(1, msgpack.packb(
        {"k": "numpy", "dt": "<f4", "sh": [2], "n": 8, "b": 0})))
    shm_ref = msgpack.packb(msgpack.ExtType(1, msgpack.packb(
        {"k": "numpy", "dt": "<f4", "sh": [2], "n": 8, "m": ["wp-1-2-0000000000000000", 1]})))
    for body in (b"\xc1", bad_ext, frame_ref, shm_ref):
        with pytest.raises(BodyError) as e:
            bodies.decode(body, bodies.MSGPACK)
        assert statuses.status_of(e.value.error)[0] == 400, body


def test_results_as_json():
    out = json.loads(bodies.encode({"a": np.arange(4).reshape(2, 2), "b": np.float32(1.5),
                                    "c": b"\x00\x01", "d": (1, 2)}, bodies.JSON))
    assert out == {"a": [[0, 1], [2, 3]], "b": 1.5, "c": "AAE=", "d": [1, 2]}
    with pytest.raises(BodyError) as e:
        bodies.encode({"z": np.zeros(2, np.complex64)}, bodies.JSON)
    assert statuses.status_of(e.value.error)[0] == 500
    with pytest.raises(BodyError):
        bodies.encode(object(), bodies.JSON)


def test_too_large_is_413():
    assert statuses.status_of(bodies.too_large(11, 10).error)[0] == 413


# -- events ------------------------------------------------------------------------------------
def test_events():
    assert sse.wants_events("text/event-stream")
    assert sse.wants_events("application/json, Text/Event-Stream")
    assert not sse.wants_events(None) and not sse.wants_events("application/json")
    assert sse.item({"a": "x\ny"}) == b'event: item\ndata: {"a":"x\\ny"}\n\n'
    assert sse.item(np.arange(2)) == b"event: item\ndata: [0,1]\n\n"
    err = sse.error(BackpressureError("slow", code="stream-overrun").to_wire())
    assert err.startswith(b"event: error\ndata: {") and err.endswith(b"}\n\n")
    assert json.loads(err.split(b"data: ", 1)[1])["error"]["code"] == "stream-overrun"


# -- request fields -----------------------------------------------------------------------------
def _scope(query=b"", **headers):
    return {"query_string": query,
            "headers": [(k.replace("_", "-").lower().encode(), v.encode())
                        for k, v in headers.items()]}


def test_request_fields():
    assert request_fields(_scope()) == {}
    assert request_fields(_scope(b"timeout=2.5", X_Priority="7", X_Idempotent="True")) == {
        "timeout": 2.5, "priority": 7, "idempotent": True}
    for bad in (_scope(b"timeout=0"), _scope(b"timeout=abc"), _scope(b"timeout=1e9"),
                _scope(b"timeout=nan"), _scope(X_Priority="-1"), _scope(X_Priority="1001"),
                _scope(X_Priority="1.5"), _scope(X_Idempotent="yes")):
        with pytest.raises(BodyError) as e:
            request_fields(bad)
        assert statuses.status_of(e.value.error)[0] == 400
    assert parse_timeout("86400") == 86400.0


# -- KServe v2 ----------------------------------------------------------------------------------
def test_infer_json_tensors_round_trip():
    body = json.dumps({"id": "r1", "inputs": [
        {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
        {"name": "m", "shape": [2], "datatype": "BOOL", "data": [[True], [False]]}]}).encode()
    req = kserve.parse_infer(body, None)
    assert req.id == "r1" and req.outputs is None and not req.binary
    assert req.inputs["x"].dtype == np.float32 and req.inputs["x"].shape == (2, 2)
    assert req.inputs["m"].tolist() == [True, False]
    reply, hl = kserve.infer_reply("m", req, {"y": req.inputs["x"] * 2})
    assert hl is None
    assert json.loads(reply) == {"model_name": "m", "id": "r1", "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [2.0, 4.0, 6.0, 8.0]}]}


def test_infer_binary_tensors_round_trip():
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    b = np.ones(4, np.float16)
    head = json.dumps({"inputs": [
        {"name": "a", "shape": [2, 3], "datatype": "INT32",
         "parameters": {"binary_data_size": a.nbytes}},
        {"name": "b", "shape": [4], "datatype": "FP16",
         "parameters": {"binary_data_size": b.nbytes}}],
        "outputs": [{"name": "s", "parameters": {"binary_data": True}}, {"name": "t"}],
        "parameters": {"timeout": 2_000_000}}).encode()
    req = kserve.parse_infer(head + a.tobytes() + b.tobytes(), str(len(head)))
    np.testing.assert_array_equal(req.inputs["a"], a)
    np.testing.assert_array_equal(req.inputs["b"], b)
    assert req.outputs == [("s", True), ("t", False)] and req.timeout == 2.0
    reply, hl = kserve.infer_reply("m", req, {"s": a.sum(axis=1), "t": np.array([1.5]),
                                              "u": np.zeros(1)})
    doc = json.loads(reply[:hl])
    assert [o["name"] for o in doc["outputs"]] == ["s", "t"]  # only those asked for
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 16
    assert np.frombuffer(reply[hl:], "<i8").tolist() == [3, 12]
    assert doc["outputs"][1]["data"] == [1.5]


@pytest.mark.parametrize(("body", "hl"), [
    (b"{bad", None),
    (b'{"inputs": 3}', None),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a", 2]}]}', None),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP33", "data": [1, 2]}]}', None),
    (b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}', None),
    (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]}', None),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": ["q"]}]}', None),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",'
     b' "parameters": {"binary_data_size": 8}}]}1234', "81"),  # 4 bytes short
    (b'{"inputs": []}extra', "14"),  # bytes that belong to no input
    (b'{"inputs": []}', "99"),  # a header length past the body
])
def test_malformed_infer_requests_are_400(body, hl):
    with pytest.raises(BodyError) as e:
        kserve.parse_infer(body, hl)
    assert statuses.status_of(e.value.error)[0] == 400


def test_infer_results_that_do_not_fit():
    req = kserve.parse_infer(b'{"inputs": [], "outputs": [{"name": "nope"}]}', None)
    with pytest.raises(BodyError) as e:
        kserve.infer_reply("m", req, {"y": np.zeros(1)})
    assert statuses.status_of(e.value.error)[0] == 400
    req = kserve.parse_infer(b'{"inputs": []}', None)
    for result in ([1, 2], {"y": np.zeros(1, np.complex64)}, {"y": ["text", 1]}):
        with pytest.raises(BodyError) as e:
            kserve.infer_reply("m", req, result)
        assert statuses.status_of(e.value.error)[0] == 500


def test_model_metadata_and_v2_errors():
    assert kserve.model_metadata("m", None)["name"] == "m"
    meta = kserve.model_metadata("m", {"inputs": [{"name": "x"}], "name": "other"})
    assert meta["name"] == "m" and meta["inputs"] == [{"name": "x"}]
    assert json.loads(kserve.error_json({"type": "T", "message": "m"})) == {"error": "T: m"}


# -- readiness ---------------------------------------------------------------------------------
STATUS = {"services": [
    {"name": "a", "workers": 2, "in_flight": 1, "queued": 0, "methods": ["infer"]},
    {"name": "b", "workers": 0, "in_flight": 0, "queued": 3, "methods": []}]}


def test_readiness_needs_a_serving_worker_in_every_service():
    ready, body = health.readiness(STATUS)
    assert not ready
    assert body["services"]["b"] == {"workers": 0, "in_flight": 0, "queued": 3}
    assert health.readiness({"services": STATUS["services"][:1]})[0]
    assert not health.readiness({"services": []})[0]
    assert health.model_ready(STATUS, "a") and health.model_ready(STATUS, "b") is False
    assert health.model_ready(STATUS, "c") is None
    assert health.methods_of(STATUS, "a") == ["infer"] and health.methods_of(STATUS, "c") is None


def test_the_status_cache_asks_once_per_max_age_and_shares_one_request():
    calls = []

    async def fetch():
        calls.append(1)
        await asyncio.sleep(0)
        return {"n": len(calls)}

    async def main():
        cache = health.StatusCache(max_age=1.0)
        first = await asyncio.gather(*(cache.get(fetch, 10.0) for _ in range(50)))
        assert len(calls) == 1 and all(r == {"n": 1} for r in first)
        assert await cache.get(fetch, 10.9) == {"n": 1} and len(calls) == 1
        assert await cache.get(fetch, 11.0) == {"n": 2}

        async def failing():
            calls.append(1)
            raise ServiceUnavailableError("router gone")
        with pytest.raises(ServiceUnavailableError):
            await cache.get(failing, 20.0)
        with pytest.raises(ServiceUnavailableError):  # the error is cached too
            await cache.get(fetch, 20.5)
        assert len(calls) == 3

    asyncio.run(main())


# -- tokens ------------------------------------------------------------------------------------
def test_tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# ops\n\n  a" + "1" * 20 + "  \nb" + "2" * 20 + "\n")
    tokens = Tokens(str(path))
    assert tokens.allows("Bearer a" + "1" * 20, 0.0)
    assert tokens.allows("bearer  b" + "2" * 20, 0.0)
    assert not tokens.allows("Bearer a" + "1" * 19, 0.0)
    assert not tokens.allows(None, 0.0) and not tokens.allows("Basic xyz", 0.0)
    path.write_text("c" + "3" * 20 + "\n")  # revoked a and b; checked at the next interval
    assert tokens.allows("Bearer a" + "1" * 20, 1.0)
    assert not tokens.allows("Bearer a" + "1" * 20, 10.0)
    assert tokens.allows("Bearer c" + "3" * 20, 10.0)
    path.write_text("short\n")  # a bad edit keeps the last good set
    assert tokens.allows("Bearer c" + "3" * 20, 20.0)
    path.write_text("# every token revoked\n")  # emptied on purpose: no one gets in
    assert not tokens.allows("Bearer c" + "3" * 20, 30.0)
    path.write_text("d" + "4" * 20 + "\n")
    assert tokens.allows("Bearer d" + "4" * 20, 40.0)
    path.unlink()  # removed: the same
    assert not tokens.allows("Bearer d" + "4" * 20, 50.0)
    path.write_text("d" + "4" * 20 + "\n")
    assert tokens.allows("Bearer d" + "4" * 20, 60.0)
    assert bearer("Bearer   ") is None
    for text in ("", "# only a comment\n", "short\n"):
        path.write_text(text)
        with pytest.raises(TokenFileError):
            Tokens(str(path))
    with pytest.raises(TokenFileError):
        Tokens(str(tmp_path / "missing"))


def test_the_gateways_request_metrics_render_as_prometheus_reads_them():
    """Counted in plain Python on the request path, rendered at a scrape: the same names,
    labels and buckets as prometheus_client's own Counter and Histogram would show."""
    from prometheus_client.parser import text_string_to_metric_families

    from workerpool.gateway.metrics import SECONDS_BUCKETS, GatewayMetrics

    m = GatewayMetrics()
    for endpoint, code, seconds in (("v1", 200, 0.0004), ("v1", 200, 0.001), ("v1", 504, 3.0),
                                    ("health", 200, 0.0001), ("v1", 200, 500.0)):
        m.answered(endpoint, code, seconds)
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    totals = {(s.labels["endpoint"], s.labels["code"]): s.value
              for s in families["workerpool_gateway_requests"].samples}
    assert totals == {("v1", "200"): 3, ("v1", "504"): 1, ("health", "200"): 1}
    v1 = [s for s in families["workerpool_gateway_request_duration_seconds"].samples
          if s.labels["endpoint"] == "v1"]
    buckets = {s.labels["le"]: s.value for s in v1 if s.name.endswith("_bucket")}
    assert len(buckets) == len(SECONDS_BUCKETS) + 1
    # A value on a bound counts in that bucket; 500 s is above every bound.
    assert (buckets["0.0005"], buckets["0.001"], buckets["2.5"], buckets["5.0"],
            buckets["120.0"], buckets["+Inf"]) == (1, 2, 2, 3, 3, 4)
    count = next(s.value for s in v1 if s.name.endswith("_count"))
    total = next(s.value for s in v1 if s.name.endswith("_sum"))
    assert count == 4 and total == pytest.approx(503.0014)
