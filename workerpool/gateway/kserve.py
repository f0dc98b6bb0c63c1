"""KServe v2 (the Open Inference Protocol) in and out of plain values: no I/O.

::

    POST /v2/models/NAME/infer
      body: JSON header [+ binary tensors]  (Inference-Header-Content-Length = header bytes)
        -> parse_infer() -> InferRequest: {input name: value}, the outputs asked for
        -> the gateway calls service NAME, method ``infer``, with that dict
      {output name: value} <- the handler's reply
        -> infer_reply() -> (JSON header [+ binary tensors], header length or None)

A model is a service; its handler's ``infer`` takes ``{input_name: ndarray}`` and returns
``{output_name: array-like}`` (BYTES and BF16 tensors: below). Tensor data comes as JSON
lists (flat or nested, row-major) or, with the binary tensor extension, as raw
little-endian bytes after the JSON header, in the order of the inputs that say
``parameters.binary_data_size``. Outputs go back binary when the request asks so
(``parameters.binary_data`` on an output, or ``binary_data_output`` on the request),
else as JSON lists.

``BYTES`` and ``BF16`` data are coded in tensors.py: a BYTES tensor reaches the handler
as lists of ``bytes`` nested to its shape (the wire carries no object arrays), and a
handler returns one as nested lists of bytes or str; a BF16 tensor is a
``torch.bfloat16`` tensor both ways, and travels only as binary data, as in Triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ipc.arrays import MAX_NDIM
from workerpool.gateway import tensors
from workerpool.gateway.bodies import BodyError
from workerpool.gateway.statuses import error_map
from workerpool.gateway.tensors import BF16, BYTES, TensorError

INFER_METHOD = "infer"
"""The handler method a model's inference calls."""
METADATA_METHOD = "metadata"
"""A handler method that, when the service has it, describes the model's ``inputs`` and
``outputs`` for ``GET /v2/models/NAME`` (a map merged into the reply)."""
HEADER_LENGTH = "inference-header-content-length"

# KServe datatype -> numpy dtype string (little-endian, as the binary extension sends).
DATATYPES: dict[str, str] = {
    "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
_BY_KIND = {(v[1], int(v[2:])): k for k, v in DATATYPES.items()}  # (numpy kind, itemsize)
KNOWN = [*DATATYPES, BF16, BYTES]


def _bad(message: str) -> BodyError:
    return BodyError(error_map("PayloadError", message, code="bad-body"))


def _bad_result(message: str) -> BodyError:
    return BodyError(error_map("HandlerError", message, remote_type="BadInferResult"))


@dataclass
class InferRequest:
    """What a v2 infer request asks: its id, the inputs, and which outputs how."""

    id: str | None
    inputs: dict[str, Any]
    outputs: list[tuple[str, bool]] | None  # (name, binary); None: every output
    binary: bool  # the request's binary_data_output: the default for outputs not named
    timeout: float | None = None  # seconds, from the request's ``parameters.timeout`` (µs)
    parameters: dict[str, Any] = field(default_factory=dict)


def _header_length(value: str | None, size: int) -> int | None:
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) > size:
        raise _bad(f"Inference-Header-Content-Length {value[:40]!r} is not a length within "
                   f"the body's {size} bytes")
    return int(value)


def _shape(spec: dict, name: str) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(f"input {name!r}: shape must be a list of at most {MAX_NDIM} "
                   f"non-negative integers")
    return shape


def _datatype(spec: dict, name: str) -> str:
    kind = spec.get("datatype")
    if kind not in KNOWN:
        raise _bad(f"input {name!r}: unknown datatype {str(kind)[:40]!r} (one of "
                   f"{', '.join(KNOWN)})")
    return kind


def _from_binary(name: str, kind: str, shape: list[int], count: int, raw: Any) -> Any:
    """An input's value from its ``binary_data_size`` bytes, which ``raw`` holds."""
    import numpy as np

    try:
        if kind == BYTES:
            return tensors.nest(tensors.unpack_bytes(raw, count), shape)
        itemsize = 2 if kind == BF16 else np.dtype(DATATYPES[kind]).itemsize
        if len(raw) != count * itemsize:
            raise TensorError(f"binary_data_size {len(raw)} is not the {count * itemsize} "
                              f"bytes its shape {shape} of {kind} takes")
        if kind == BF16:
            return tensors.bf16_tensor(raw, shape)
        return np.frombuffer(raw, dtype=DATATYPES[kind]).reshape(shape)
    except TensorError as exc:
        raise _bad(f"input {name!r} ({kind}): {exc}") from None


def _from_json(name: str, kind: str, shape: list[int], count: int, data: Any) -> Any:
    """An input's value from its JSON ``data`` (flat or nested, row-major)."""
    import numpy as np

    if kind == BF16:
        raise _bad(f"input {name!r}: BF16 data travels only as binary data "
                   f"(parameters.binary_data_size), not in JSON")
    if kind == BYTES:
        flat = tensors.flatten(data)
        if not all(isinstance(v, str) for v in flat):
            raise _bad(f"input {name!r}: BYTES data in JSON must be strings")
        if len(flat) != count:
            raise _bad(f"input {name!r}: {len(flat)} values for shape {shape}")
        try:
            return tensors.nest([v.encode() for v in flat], shape)
        except UnicodeEncodeError:  # JSON may escape a lone surrogate: "\ud800"
            raise _bad(f"input {name!r}: BYTES data holds a string that is not "
                       f"Unicode text") from None
        except TensorError as exc:
            raise _bad(f"input {name!r} ({kind}): {exc}") from None
    try:
        arr = np.asarray(data, dtype=DATATYPES[kind])
    except (TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"input {name!r}: data does not fit {kind}: {exc}") from None
    if arr.size != count:
        raise _bad(f"input {name!r}: {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    """The request in ``body`` (and the Inference-Header-Content-Length header's value).
    Raises BodyError (400) for anything malformed."""
    import json

    hl = _header_length(header_length, len(body))
    head, raw = (body, b"") if hl is None else (body[:hl], memoryview(body)[hl:])
    try:
        doc = json.loads(head)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"inference header is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise _bad("inference request must be an object with an 'inputs' list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object")
    inputs: dict[str, Any] = {}
    at = 0
    for spec in doc["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("each input must be an object with a 'name'")
        name = spec["name"]
        if name in inputs:
            raise _bad(f"input {name!r} is given twice")
        shape, kind = _shape(spec, name), _datatype(spec, name)
        count = math.prod(shape)
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 \
                    or at + size > len(raw):
                raise _bad(f"input {name!r}: binary_data_size {size!r} is not a length "
                           f"within the {len(raw) - at} bytes left after the header")
            inputs[name] = _from_binary(name, kind, shape, count, raw[at:at + size])
            at += size
        elif "data" in spec:
            inputs[name] = _from_json(name, kind, shape, count, spec["data"])
        else:
            raise _bad(f"input {name!r} has neither 'data' nor binary_data_size")
    if at != len(raw):
        raise _bad(f"{len(raw) - at} bytes after the inference header belong to no input")
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise _bad("'outputs' must be a list")
        outputs = []
        for spec in doc["outputs"]:
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise _bad("each requested output must be an object with a 'name'")
            binary = (spec.get("parameters") or {}).get("binary_data", False)
            outputs.append((spec["name"], binary is True))
    timeout = params.get("timeout")
    seconds = timeout / 1e6 if isinstance(timeout, int | float) and not isinstance(
        timeout, bool) and timeout > 0 else None
    rid = doc.get("id")
    return InferRequest(str(rid) if rid is not None else None, inputs, outputs,
                        params.get("binary_data_output") is True, seconds, params)


def datatype_of(arr: Any) -> str:
    """The KServe datatype of a numpy array; ValueError for one it has none for."""
    kind = _BY_KIND.get((arr.dtype.kind, arr.dtype.itemsize))
    if kind is None:
        raise ValueError(f"an output of dtype {arr.dtype} has no KServe datatype")
    return kind


def _output(value: Any) -> tuple[str, list[int], Any]:
    """(datatype, shape, data) of one of the handler's outputs; data is the flat list of
    elements for BYTES, the tensor for BF16, else a numpy array. TensorError or
    ValueError when it has no KServe form."""
    import numpy as np

    if tensors.is_text(value):
        return (BYTES, *tensors.shape_of(value))
    if tensors.is_bf16(value):
        return BF16, list(value.shape), value
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:  # torch dtypes numpy lacks
        raise ValueError(f"a {type(value).__name__} has no KServe datatype: {exc}") from None
    return datatype_of(arr), list(arr.shape), arr


def _blob(kind: str, data: Any) -> bytes:
    """An output's binary data, as ``_output`` gave it."""
    import numpy as np

    if kind == BYTES:
        return tensors.pack_bytes(data)
    if kind == BF16:
        return tensors.bf16_bytes(data)
    return np.ascontiguousarray(data, dtype=np.dtype(DATATYPES[kind])).tobytes()


def _json_data(name: str, kind: str, data: Any) -> list[Any]:
    """An output's flat JSON ``data``, as ``_output`` gave it. Raises BodyError (400) for
    one that travels only as binary data: BF16, or BYTES that are not UTF-8."""
    if kind == BF16:
        raise _bad(f"output {name!r} is BF16, which travels only as binary data: ask for "
                   f"it with parameters.binary_data")
    if kind == BYTES:
        try:
            return [tensors.text_of(item) for item in data]
        except TensorError as exc:
            raise _bad(f"output {name!r}: {exc}; ask for it with "
                       f"parameters.binary_data") from None
    return data.reshape(-1).tolist()


def infer_reply(model: str, req: InferRequest, result: Any) -> tuple[bytes, int | None]:
    """The reply body for ``result`` (the handler's ``{output name: array-like}``), and
    the length of its JSON header when binary tensors follow it (else None). Raises
    BodyError (500) when the result is not such a map or an output has no datatype, and
    (400) when the request named an output the handler did not return or asked for one
    in JSON that travels only as binary data."""
    import json

    if not isinstance(result, dict) or not all(isinstance(k, str) for k in result):
        raise _bad_result(f"model {model!r}: infer must return a map of output name to "
                          f"array, got {type(result).__name__}")
    wanted = req.outputs if req.outputs is not None else [(n, req.binary) for n in result]
    outputs, blobs = [], []
    for name, binary in wanted:
        if name not in result:
            raise _bad(f"model {model!r} has no output {name!r}; it returned: "
                       f"{', '.join(sorted(result)) or 'none'}")
        try:
            kind, shape, data = _output(result[name])
        except ValueError as exc:  # TensorError included
            raise _bad_result(f"model {model!r}, output {name!r}: {exc}") from None
        out: dict[str, Any] = {"name": name, "datatype": kind, "shape": shape}
        if binary:
            blob = _blob(kind, data)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = _json_data(name, kind, data)
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": model, "outputs": outputs}
    if req.id is not None:
        doc["id"] = req.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def model_metadata(model: str, described: Any) -> dict[str, Any]:
    """``GET /v2/models/NAME``: the name, platform, and what the handler's ``metadata``
    method returned (``inputs``, ``outputs``, ...) when it has one."""
    doc: dict[str, Any] = {"name": model, "versions": ["1"], "platform": "workerpool",
                           "inputs": [], "outputs": []}
    if isinstance(described, dict):
        doc.update({str(k): v for k, v in described.items() if k != "name"})
    return doc


def error_json(body: dict[str, Any]) -> bytes:
    """A v2 error reply: ``{"error": "<type>: <message>"}``, the protocol's one string."""
    import json

    return json.dumps({"error": f"{body.get('type')}: {body.get('message')}"}).encode()
