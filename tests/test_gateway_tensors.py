"""KServe v2 BYTES and BF16 tensors with plain values: the element codings (tensors.py),
and requests and replies that carry them (kserve.py). No sockets, no server."""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest

from workerpool.gateway import kserve, statuses, tensors
from workerpool.gateway.bodies import BodyError
from workerpool.gateway.tensors import TensorError

ELEMENTS = [b"ab", b"", b"\xff\x00\x01", "é".encode(), b"x" * 300]


def _packed(items) -> bytes:
    """The binary BYTES coding, written out by hand: a u32 little-endian length each."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _status(exc: pytest.ExceptionInfo) -> int:
    return statuses.status_of(exc.value.error)[0]


def _request(*inputs, outputs=None, blobs=b"") -> tuple[bytes, str | None]:
    """A v2 request body with ``inputs`` (and ``outputs``) in its header, ``blobs`` after."""
    doc = {"inputs": list(inputs)}
    if outputs is not None:
        doc["outputs"] = outputs
    head = json.dumps(doc).encode()
    return head + blobs, str(len(head)) if blobs else None


def _binary(name, kind, shape, blob) -> dict:
    return {"name": name, "datatype": kind, "shape": shape,
            "parameters": {"binary_data_size": len(blob)}}


# -- BYTES: the coding ----------------------------------------------------------------------
def test_bytes_pack_and_unpack_round_trip():
    raw = tensors.pack_bytes(ELEMENTS)
    assert raw == _packed(ELEMENTS)
    assert tensors.unpack_bytes(raw, len(ELEMENTS)) == ELEMENTS
    assert tensors.unpack_bytes(memoryview(raw), len(ELEMENTS)) == ELEMENTS
    assert tensors.pack_bytes(["é", b"z"]) == _packed(["é".encode(), b"z"])  # text: UTF-8
    assert tensors.pack_bytes([]) == b"" and tensors.unpack_bytes(b"", 0) == []


def test_bytes_coding_matches_tritonclients_own():
    utils = pytest.importorskip("tritonclient.utils")
    arr = np.array([*ELEMENTS[:4], b"y"], dtype=np.object_).reshape(5, 1)
    theirs = utils.serialize_byte_tensor(arr).item()
    assert tensors.pack_bytes(tensors.flatten(arr.tolist())) == theirs
    assert tensors.unpack_bytes(theirs, 5) == utils.deserialize_bytes_tensor(theirs).tolist()


@pytest.mark.parametrize(("raw", "count", "says"), [
    (struct.pack("<I", 10) + b"abc", 1, "length 10 runs past the data"),
    (_packed([b"ab"]) + struct.pack("<I", 2**32 - 1) + b"z", 2, "runs past the data"),
    (_packed([b"ab"]) + b"\x01\x00", 2, "4-byte length is cut off"),
    (_packed([b"a", b"b"]), 3, "2 elements, but its shape holds 3"),
    (_packed([b"a", b"b"]), 1, "bytes are left after its 1 elements"),
    (b"\x00", 0, "left after its 0 elements"),
])
def test_bytes_that_do_not_match_are_refused(raw, count, says):
    with pytest.raises(TensorError, match=says):
        tensors.unpack_bytes(raw, count)


def test_nesting_to_a_shape_and_back():
    flat = [b"a", b"b", b"c", b"d", b"e", b"f"]
    assert tensors.nest(flat, [6]) == flat
    assert tensors.nest(flat, [2, 3]) == [[b"a", b"b", b"c"], [b"d", b"e", b"f"]]
    assert tensors.nest(flat, [3, 1, 2]) == [[[b"a", b"b"]], [[b"c", b"d"]], [[b"e", b"f"]]]
    assert tensors.nest([b"only"], []) == b"only"
    assert tensors.nest([], [0]) == [] and tensors.nest([], [0, 3]) == []
    assert tensors.nest([], [2, 0]) == [[], []]
    assert tensors.nest([], [2, 0, 3]) == [[], []]
    assert tensors.nest([], [2, 2, 0]) == [[[], []], [[], []]]
    for shape in ([6], [2, 3], [3, 1, 2], [1, 1, 6]):
        assert tensors.shape_of(tensors.nest(flat, shape)) == (shape, flat)
    assert tensors.shape_of(b"x") == ([], [b"x"])
    assert tensors.shape_of([("a", "b"), ["c", "d"]]) == ([2, 2], ["a", "b", "c", "d"])


def test_an_empty_tensor_with_too_many_lists_is_refused():
    tensors.nest([], [tensors.MAX_EMPTY_LISTS, 0])
    with pytest.raises(TensorError, match="no elements"):
        tensors.nest([], [tensors.MAX_EMPTY_LISTS + 1, 0])
    with pytest.raises(TensorError):
        tensors.nest([], [10**12, 10**12, 0])


def test_ragged_or_mixed_lists_are_not_a_bytes_tensor():
    with pytest.raises(TensorError, match="ragged"):
        tensors.shape_of([[b"a"], [b"b", b"c"]])
    with pytest.raises(TensorError, match="ragged"):
        tensors.shape_of([[b"a"], b"b"])
    with pytest.raises(TensorError, match="not int"):
        tensors.shape_of([b"a", 1])
    assert tensors.is_text([[b"a"]]) and tensors.is_text("s") and tensors.is_text([["s"]])
    assert not tensors.is_text([1, b"a"]) and not tensors.is_text([]) and not tensors.is_text(
        [[]])


def test_flatten_is_row_major_and_survives_deep_nesting():
    assert tensors.flatten([["a", "b"], ["c"], [], [["d"]]]) == ["a", "b", "c", "d"]
    assert tensors.flatten("a") == ["a"]
    deep: list = ["x"]
    for _ in range(5000):  # deeper than Python recurses
        deep = [deep]
    assert tensors.flatten(deep) == ["x"]


def test_text_of_an_element():
    assert tensors.text_of("é") == "é" and tensors.text_of("é".encode()) == "é"
    with pytest.raises(TensorError, match="not UTF-8"):
        tensors.text_of(b"\xff")


# -- BYTES in requests and replies ------------------------------------------------------------
def test_bytes_inputs_reach_the_handler_as_nested_bytes():
    blob = _packed(ELEMENTS[:4])
    body, hl = _request(
        _binary("b", "BYTES", [2, 2], blob),
        {"name": "j", "datatype": "BYTES", "shape": [2, 1], "data": [["é"], ["z"]]},
        {"name": "s", "datatype": "BYTES", "shape": [], "data": "one"},
        {"name": "e", "datatype": "BYTES", "shape": [2, 0], "data": []}, blobs=blob)
    inputs = kserve.parse_infer(body, hl).inputs
    assert inputs["b"] == [[b"ab", b""], [b"\xff\x00\x01", "é".encode()]]
    assert inputs["j"] == [["é".encode()], [b"z"]]  # JSON strings arrive as UTF-8 bytes too
    assert inputs["s"] == b"one" and inputs["e"] == [[], []]


@pytest.mark.parametrize(("spec", "blob", "says"), [
    # the length prefix of the second element runs past the input's bytes
    ({"shape": [2]}, _packed([b"ab"]) + struct.pack("<I", 9) + b"xy", "runs past the data"),
    ({"shape": [3]}, _packed([b"a", b"b"]), "2 elements, but its shape holds 3"),
    ({"shape": [1, 1]}, _packed([b"a", b"b"]), "bytes are left after its 1 elements"),
    # a binary_data_size short of the bytes sent: the rest belongs to no input
    ({"shape": [2], "size": 9}, _packed([b"a", b"b"]), "length 1 runs past the data"),
    ({"shape": [2], "size": 7}, _packed([b"a", b"b"]), "4-byte length is cut off"),
    ({"shape": [2], "size": 5}, _packed([b"a", b"b"]), "1 elements, but its shape holds 2"),
    ({"shape": [2], "size": 99}, _packed([b"a", b"b"]), "binary_data_size 99"),  # past body
    ({"shape": [2], "size": -1}, _packed([b"a", b"b"]), "binary_data_size -1"),
    ({"shape": [70000, 0]}, b"", "no elements"),
    ({"shape": [1] * 65}, _packed([b"a"]), "at most 64"),
])
def test_bad_binary_bytes_inputs_are_400(spec, blob, says):
    head = _binary("t", "BYTES", spec["shape"], blob)
    if "size" in spec:
        head["parameters"]["binary_data_size"] = spec["size"]
    body, _ = _request(head)
    with pytest.raises(BodyError, match=says) as e:
        kserve.parse_infer(body + blob, str(len(body)))
    assert _status(e) == 400


@pytest.mark.parametrize(("data", "shape", "says"), [
    (["a", "b"], [3], "2 values for shape"),
    ([["a"], ["b"], ["c"]], [2, 2], "3 values for shape"),
    (["a", 1], [2], "must be strings"),
    ([{"a": "b"}], [1], "must be strings"),
    (["\ud800"], [1], "not Unicode text"),  # a lone surrogate: JSON escapes it
])
def test_bad_json_bytes_inputs_are_400(data, shape, says):
    body, _ = _request({"name": "t", "datatype": "BYTES", "shape": shape, "data": data})
    with pytest.raises(BodyError, match=says) as e:
        kserve.parse_infer(body, None)
    assert _status(e) == 400


def test_bytes_outputs_as_json_and_binary():
    req = kserve.parse_infer(*_request(outputs=[
        {"name": "u", "parameters": {"binary_data": True}}, {"name": "j"}, {"name": "one"}]))
    result = {"u": [[b"\xff", b"ab"]], "j": [["é", "é".encode()]], "one": b"x"}
    reply, hl = kserve.infer_reply("m", req, result)
    doc = json.loads(reply[:hl])
    assert doc["outputs"] == [
        {"name": "u", "datatype": "BYTES", "shape": [1, 2],
         "parameters": {"binary_data_size": 11}},
        {"name": "j", "datatype": "BYTES", "shape": [1, 2], "data": ["é", "é"]},
        {"name": "one", "datatype": "BYTES", "shape": [], "data": ["x"]}]
    assert tensors.unpack_bytes(reply[hl:], 2) == [b"\xff", b"ab"]


def test_bytes_outputs_that_do_not_fit():
    req = kserve.parse_infer(*_request())  # every output, as JSON
    with pytest.raises(BodyError, match=r"not UTF-8.*binary_data") as e:
        kserve.infer_reply("m", req, {"u": [b"\xff"]})
    assert _status(e) == 400  # the caller can ask for it as binary data
    for bad in ([[b"a"], [b"b", b"c"]], [b"a", 2], [b"a", None]):
        with pytest.raises(BodyError, match="output 'u'") as e:
            kserve.infer_reply("m", req, {"u": bad})
        assert _status(e) == 500, bad


# -- BF16 -------------------------------------------------------------------------------------
BF16_VALUES = [1.0, -2.5, 0.5, 256.0, 3.0, -0.125]  # exact in bfloat16


def test_bf16_in_and_out_as_torch_bfloat16():
    torch = pytest.importorskip("torch")
    t = torch.tensor(BF16_VALUES, dtype=torch.bfloat16).reshape(2, 3)
    blob = t.view(torch.int16).numpy().astype("<i2").tobytes()
    body, hl = _request(_binary("h", "BF16", [2, 3], blob),
                        outputs=[{"name": "h2", "parameters": {"binary_data": True}}],
                        blobs=blob)
    req = kserve.parse_infer(body, hl)
    h = req.inputs["h"]
    assert h.dtype == torch.bfloat16 and list(h.shape) == [2, 3] and torch.equal(h, t)
    reply, hl = kserve.infer_reply("m", req, {"h2": h * 2})
    out = json.loads(reply[:hl])["outputs"][0]
    assert out == {"name": "h2", "datatype": "BF16", "shape": [2, 3],
                   "parameters": {"binary_data_size": 12}}
    back = torch.from_numpy(np.frombuffer(reply[hl:], "<i2").copy()).view(torch.bfloat16)
    assert back.tolist() == [v * 2 for v in BF16_VALUES]
    assert tensors.bf16_bytes(t.T) == t.T.contiguous().view(torch.int16).numpy().tobytes()


def test_bf16_only_as_binary_data():
    torch = pytest.importorskip("torch")
    body, _ = _request({"name": "h", "datatype": "BF16", "shape": [2], "data": [1.0, 2.0]})
    with pytest.raises(BodyError, match="BF16 data travels only as binary data") as e:
        kserve.parse_infer(body, None)
    assert _status(e) == 400
    req = kserve.parse_infer(*_request(outputs=[{"name": "h2"}]))
    with pytest.raises(BodyError, match=r"BF16.*binary_data") as e:
        kserve.infer_reply("m", req, {"h2": torch.ones(2, dtype=torch.bfloat16)})
    assert _status(e) == 400


@pytest.mark.parametrize("size", [5, 8, 0])
def test_bf16_with_a_wrong_binary_data_size_is_400(size):
    blob = b"\x80\x3f" * 3  # three elements, shape [3]: 6 bytes
    head = _binary("h", "BF16", [3], blob)
    head["parameters"]["binary_data_size"] = size
    body, _ = _request(head)
    with pytest.raises(BodyError) as e:
        kserve.parse_infer(body + blob, str(len(body)))
    assert _status(e) == 400


def test_bf16_without_torch_in_the_gateway_is_400_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    blob = b"\x80\x3f" * 2
    body, hl = _request(_binary("h", "BF16", [2], blob), blobs=blob)
    with pytest.raises(BodyError, match=r"torch.bfloat16.*torch is not installed") as e:
        kserve.parse_infer(body, hl)
    assert _status(e) == 400


def test_torch_outputs_numpy_cannot_hold_are_500_not_a_crash():
    torch = pytest.importorskip("torch")
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    req = kserve.parse_infer(*_request())
    with pytest.raises(BodyError, match="no KServe datatype") as e:
        kserve.infer_reply("m", req, {"f": torch.zeros(2, dtype=torch.float8_e4m3fn)})
    assert _status(e) == 500
